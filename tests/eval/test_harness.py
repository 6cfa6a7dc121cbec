"""The eval harness: the streams are what the protocols say, and every method's stored codes are what
its policy says (checked by re-encoding by hand), on small synthetic streams."""

import numpy as np
import pytest

from streamhash.codes import stale
from streamhash.config import LearnSettings
from streamhash.eval.harness import EvalConfig, run
from streamhash.eval.methods import Incremental
from streamhash.eval.shard import EvalShard
from streamhash.model.state import initial_net
from streamhash.config import ModelSettings
from streamhash.eval.metrics import retrieval_metrics
from streamhash.eval.protocols import make_stream
from tests.conftest import synthetic_images

SMALL = dict(omega=200, epochs=1, iters=1, reservoir_size=100, mi_bootstrap=20)


@pytest.fixture(scope="module")
def data():
    return synthetic_images(3000, noise=60, seed=3)


def small_stream(protocol, data, **kw):
    images, labels = data
    return make_stream(protocol, images, labels, queries_per_class=10, stream=1200, chunk_size=400, chunks=2, **kw)


def test_partial_labels_is_class_ordered_and_a_quarter_labeled(data):
    s = small_stream("partial-labels", data)
    order = np.concatenate([s.d0, *s.chunks])
    assert len(order) == 1200 and len(np.unique(order)) == 1200
    assert not np.isin(order, s.queries).any()
    assert (s.labels[order[:600]] < 5).all() and (s.labels[order[600:]] >= 5).all()
    assert 0.2 < s.labeled[order].mean() < 0.3
    assert s.everything is None and s.train_initial


def test_online_database_is_all_of_r_at_every_step(data, monkeypatch):
    s = small_stream("online", data)
    images, labels = data
    assert len(s.everything) == len(labels) - len(s.queries)
    cfg = EvalConfig(protocol="online", bits=16, methods=("never_reencode", "lsh"), learn=LearnSettings(**SMALL))
    seen = []
    import streamhash.eval.harness as h

    def spy(q, ql, db, dbl, bits, topk):
        seen.append(len(db))
        return retrieval_metrics(q, ql, db, dbl, bits, topk=topk)

    monkeypatch.setattr(h, "retrieval_metrics", spy)
    run(s, cfg, log=lambda *a: None)  # D0 is the first chunk: learned by the first round
    assert len(seen) == 2 * (1 + len(s.chunks)) and set(seen) == {len(s.everything)}


def test_domain_shift_gives_the_second_dataset_classes_of_its_own(data):
    images, labels = data
    digits = synthetic_images(400, noise=30, seed=1007, size=28)
    s = make_stream("domain-shift", images, labels, digits=digits, queries_per_class=10, stream=800, chunk_size=300)
    order = np.concatenate([s.d0, *s.chunks])
    second = order >= len(images)
    assert (s.labels[order[second]] >= 10).all() and (s.labels[order[~second]] < 10).all()
    assert second[-1] and not second[:400].any()  # Fashion-MNIST first, then the digits
    assert ((s.labels[s.queries] >= 10).sum()) == 100


@pytest.mark.parametrize("policy", ["streamhash", "selective_every_round", "full_every_round", "never_reencode"])
def test_stored_codes_follow_the_policy(data, policy, tmp_path):
    """After each round: learned codes are the round's, and the codes a re-encode replaces are exactly
    the stale inferred ones (all of them for full_every_round), re-encoded with the current network."""
    s = small_stream("partial-labels", data)
    settings = LearnSettings(**SMALL, mi_threshold=-10.0 if policy == "streamhash" else 0.0)  # make it fire
    shard = EvalShard(tmp_path / "shard", 16, s.images, s.labels, s.labeled)
    m = Incremental(policy, s, 16, shard, settings, initial_net(ModelSettings(bits=16)).to_bytes(), 0)
    chunks = [s.d0, *s.chunks]
    for step, chunk in enumerate(chunks, 1):
        before = dict(zip(*shard.snapshot()[:2]))
        m.arrive(chunk, step * len(chunk), step == len(chunks))
        ids, codes, learned = shard.snapshot()
        now = m.encode(ids)
        if policy == "never_reencode":
            keep = np.array([i in before for i in ids]) & ~learned
            if keep.any():
                np.testing.assert_array_equal(codes[keep], np.stack([before[i] for i in ids[keep]]))
            assert m.reencodes == 0
        elif policy == "full_every_round":
            np.testing.assert_array_equal(codes, now)
            assert not learned.any()
        else:
            np.testing.assert_array_equal(codes[~learned], now[~learned])
            # learned codes were not touched by the re-encode: they equal what the learner holds
            np.testing.assert_array_equal(codes[learned], m.hasher.learner.codes([str(i) for i in ids[learned]]))
            assert m.reencodes == step
        # the learner was told: the codes it trains against are the ones stored
        np.testing.assert_array_equal(m.hasher.learner.codes([str(i) for i in ids]), codes)
    shard.close()


def test_full_retrain_gets_the_learners_cpu_seconds_and_every_method_reports(data):
    s = small_stream("partial-labels", data)
    cfg = EvalConfig(protocol="partial-labels", bits=16, learn=LearnSettings(**SMALL))
    out = run(s, cfg, log=lambda *a: None)
    ms = out["methods"]
    assert set(ms) == {"streamhash", "selective_every_round", "full_every_round", "never_reencode", "full_retrain", "lsh"}
    assert out["budget"]["full_retrain_cpu_seconds"] == ms["streamhash"]["cpu_seconds"]
    assert ms["full_retrain"]["alternations"] >= 1
    assert ms["never_reencode"]["reencodes"] == ms["lsh"]["reencodes"] == 0
    assert ms["selective_every_round"]["reencodes"] == 1 + len(s.chunks)  # D0 is the first round's chunk
    assert ms["full_retrain"]["images_reencoded"] == out["database"] == 1200
    # selective never re-encodes a learned code, full does: full re-encodes more images
    assert ms["full_every_round"]["images_reencoded"] > ms["selective_every_round"]["images_reencoded"] > 0
    for m in ms.values():
        assert 0 <= m["map"] <= 1 and m["seconds"] >= 0 and m["cpu_seconds"] >= 0
        assert 0 <= m["inferred_top10"] <= 1 and len(m["curve"]) == 1 + len(s.chunks)


def test_the_retrain_on_the_same_labels_holds_out_what_the_learner_held_out(data, monkeypatch):
    """full_retrain_same_labels trains on the labeled items the streamhash learner trained on: its hold-out is the
    learner's (codes learned, images never in Omega), full_retrain's is empty."""
    from streamhash.learn.dihn import DIHNLearner

    held_by, real = {}, DIHNLearner.learn_round

    def spy(self, *a, **kw):
        if kw.get("iters") == 10**6:  # a retrain's one round
            held_by[len(held_by)] = set(self.held_ids)
        return real(self, *a, **kw)

    monkeypatch.setattr(DIHNLearner, "learn_round", spy)
    s = small_stream("partial-labels", data)
    cfg = EvalConfig(protocol="partial-labels", bits=16, learn=LearnSettings(**SMALL),
                     methods=("streamhash", "full_retrain", "full_retrain_same_labels"))
    captured = {}
    out = run(s, cfg, log=lambda *a: None, final=lambda name, m: captured.setdefault(name, m))
    learner_held = set(captured["streamhash"].hasher.learner.held_ids)
    assert learner_held and held_by == {0: set(), 1: learner_held}  # full_retrain, then the same-labels one
    ms = out["methods"]
    assert out["budget"]["full_retrain_same_labels_cpu_seconds"] == ms["streamhash"]["cpu_seconds"]
    assert out["budget"]["full_retrain_same_labels_alternations"] >= 1


def test_final_hook_sees_the_index_the_last_evaluation_ranked(data):
    """``run(final=...)`` hands over each method before its shard closes; ``served`` gives what the last
    evaluation ranked (benchmarks/learned_ties.py re-ranks it), in arrival order: re-scoring it gives the reported mAP."""
    from streamhash.eval.harness import served

    s = small_stream("partial-labels", data)
    cfg = EvalConfig(protocol="partial-labels", bits=16, methods=("streamhash", "never_reencode"),
                     learn=LearnSettings(**SMALL))
    seen = {}

    def final(name, m):
        ids, codes, learned, q = served(m, s)
        seen[name] = (retrieval_metrics(q, s.labels[s.queries], codes, s.labels[ids], 16, topk=cfg.topk)["map"],
                      len(ids), int(learned.sum()))
        # ties break in the order the stream brought the items, learned codes and re-encodes notwithstanding
        np.testing.assert_array_equal(ids, np.concatenate(s.arrivals()))

    out = run(s, cfg, log=lambda *a: None, final=final)
    assert set(seen) == {"streamhash", "never_reencode"}
    for name, (map_, n, n_learned) in seen.items():
        assert map_ == pytest.approx(out["methods"][name]["map"], abs=1e-12)
        assert n == 1200 and 0 < n_learned < n  # the whole stream, some codes learned, the rest inferred
