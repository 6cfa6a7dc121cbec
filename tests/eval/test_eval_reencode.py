"""The eval's re-encode is the worker's: the same network over the same stored items gives the same shard."""

import threading
from types import SimpleNamespace

import numpy as np

from streamhash.config import ModelSettings
from streamhash.eval.shard import EvalShard, ids_of
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.model.state import initial_net
from streamhash.services.worker.reencode import Reencoder
from tests.conftest import synthetic_images


def shard_with_history(path, images, labels, labeled, net0) -> EvalShard:
    """300 items inferred by version 1, a third of the labeled ones learned (version 2), 50 sent again."""
    shard = EvalShard(path, 16, images, labels, labeled)
    idx = np.arange(300)
    shard.write(idx, net0.encode(images[idx]), 1)
    learned = np.flatnonzero(labeled[:300])[::3]
    shard.learned(ids_of(learned), np.random.default_rng(1).integers(0, 256, (len(learned), 2), dtype=np.uint8), 2)
    shard.write(idx[250:], net0.encode(images[250:300]), 2)  # inferred by version 2 already: kept
    return shard


def test_eval_reencode_gives_the_workers_codes(tmp_path):
    images, labels = synthetic_images(300, seed=5)
    labeled = np.random.default_rng(0).random(300) < 0.5
    net0, net = initial_net(ModelSettings(bits=16)), HashNet(HashNetConfig(bits=16, seed=7))
    ours = shard_with_history(tmp_path / "eval", images, labels, labeled, net0)
    theirs = shard_with_history(tmp_path / "worker", images, labels, labeled, net0)
    n = ours.reencode(net, 2)

    idle = threading.Event()
    idle.set()
    target = SimpleNamespace(version=2, generation=2, raw=net.to_bytes())
    done = []
    worker = Reencoder({"s": theirs.store}, lambda: target, {2: net}, theirs.spec, idle, done.append)
    worker.build("s")
    assert done == ["s"]

    a, b = ours.snapshot(), theirs.snapshot()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    ids, codes, learned = a
    stale = ~learned & (ids < 250)
    assert n == stale.sum() > 0  # only the stale inferred codes were encoded
    np.testing.assert_array_equal(codes[stale], net.encode(images[ids[stale]]))
    assert ours.store.read_meta()["generation"] == theirs.store.read_meta()["generation"] == 2
    ours.close()
    theirs.close()
