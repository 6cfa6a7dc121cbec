"""``streamhash eval --dataset cifar10``'s stream (streamhash/eval/cifar.py) on a few hundred images of the shared
CIFAR-10 tarball: stored inputs are the product network's own (HashNet.prepare), cached and read back without
running the backbone again, and the learner trains the network's tail and head on them to better retrieval."""

from pathlib import Path

import numpy as np
import pytest

from streamhash.data.cifar10 import load_split
from streamhash.eval import cifar
from streamhash.eval.metrics import retrieval_metrics
from streamhash.learn.dihn import DIHNLearner
from streamhash.model.hashnet import HashNet

TARBALL = Path(__file__).resolve().parents[3] / "shared" / "data" / "cifar10-jpg.tar.gz"
pytestmark = pytest.mark.skipif(not TARBALL.exists(), reason=f"the shared CIFAR-10 tarball is not at {TARBALL}")
BITS = 16


@pytest.fixture(scope="module")
def data():
    return load_split("test", TARBALL, per_class=30)  # 300 images


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("home")


def stream_of(data, home, **kw):
    return cifar.make_cifar_stream("class-incremental", home, data=data, bits=BITS, queries_per_class=5, chunks=2, **kw)


def test_stored_inputs_are_the_networks_own_and_cached(data, home, monkeypatch):
    s = stream_of(data, home)
    net = cifar.network(BITS)
    assert s.model == cifar.MODEL and net.frozen
    assert s.images.shape == (300, *net.stored_shape) and s.images.dtype == np.float16
    rows = np.array([0, 7, 299])
    np.testing.assert_allclose(s.images[rows].astype(np.float32), net.prepare(data.images[rows]).astype(np.float32),
                               rtol=1e-3, atol=1e-3)
    calls = []
    monkeypatch.setattr(HashNet, "prepare", lambda self, images: calls.append(len(images)))
    again = stream_of(data, home)
    assert calls == []  # every row cached: the backbone does not run again
    np.testing.assert_array_equal(np.asarray(again.images), np.asarray(s.images))
    assert len(list((home / "cache").glob("cifar10-efficientnet_lite0-*.npy"))) == 2  # the inputs and the mask


def test_a_quick_stream_computes_only_its_rows_and_a_later_one_the_rest(data, tmp_path):
    keep = np.flatnonzero(np.arange(300) % 3 == 0)  # 100 images, 10 of each class
    data = type(data)(data.images[keep], data.labels[keep], data.classes)
    part = stream_of(data, tmp_path, retrieval_limit=20)
    used = np.unique(np.concatenate([part.queries, part.d0, *part.chunks]))
    unused = np.setdiff1d(np.arange(100), used)
    assert len(used) == 70 and not np.asarray(part.images[unused]).any() and np.asarray(part.images[used]).any()
    whole = stream_of(data, tmp_path)
    assert np.asarray(whole.images).any(axis=tuple(range(1, whole.images.ndim))).all()
    np.testing.assert_array_equal(np.asarray(whole.images[used]), np.asarray(part.images[used]))


def test_the_learner_trains_the_networks_tail_and_head_on_stored_inputs(data, home):
    s = stream_of(data, home)
    net = cifar.network(BITS, seed=1)
    tail_params = [n for n, p in net.named_parameters() if p.requires_grad and n.startswith("backbone.")]
    assert tail_params, "the cut's tail learns"
    learner = DIHNLearner(net, omega=100, epochs=1, iters=2, seed=1)
    fetch = lambda ids: s.images[np.asarray(ids, np.int64)]  # noqa: E731

    def mean_ap():
        db = np.concatenate([s.d0, *s.chunks])
        return retrieval_metrics(net.encode(s.images[s.queries]), s.labels[s.queries], net.encode(s.images[db]),
                                 s.labels[db], BITS)["map"]

    before = mean_ap()
    for part in (s.d0, *s.chunks):
        learner.add_items(part.tolist(), net.encode(s.images[part]), s.labels[part], frozen=False)
        learner.learn_round(fetch)
    assert mean_ap() > before + 0.1


def test_the_eval_runs_the_photo_network_end_to_end(data, home):
    from streamhash.config import LearnSettings
    from streamhash.eval.harness import EvalConfig, run

    s = stream_of(data, home)
    cfg = EvalConfig(bits=BITS, methods=("streamhash", "lsh"), learn=LearnSettings(omega=100, epochs=1, iters=2))
    out = run(s, cfg, log=lambda *a: None)
    assert out["database"] == 250 and set(out["methods"]) == {"streamhash", "lsh"}
    assert out["methods"]["streamhash"]["map"] > out["methods"]["lsh"]["map"]
