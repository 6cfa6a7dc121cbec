"""The second stage of a search (streamhash.index.rerank) against brute force."""

from __future__ import annotations

from types import SimpleNamespace

import warnings

import numpy as np
import pytest

from streamhash.index.rerank import VOTERS, Rerank, order, similarities, vectors


def brute_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def pooled(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64).reshape(x.shape[0], -1).mean(axis=1) if x.ndim == 3 else x


@pytest.mark.parametrize("shape", [(64,), (8, 3, 3)])
@pytest.mark.parametrize("seed", range(5))
def test_order_is_brute_force_sort(shape, seed):
    rng = np.random.default_rng(seed)
    n = 200
    query = rng.standard_normal(shape).astype(np.float16)
    stored = [rng.standard_normal(shape).astype(np.float16) for _ in range(n)]
    for i in rng.choice(n, 15, replace=False):  # no feature, or one of another shape: after the scored ones
        stored[i] = None if i % 2 else rng.standard_normal((5,)).astype(np.float16)
    dist = rng.integers(0, 4, n)
    sims = similarities(query, stored)

    def key(i):
        s = stored[i]
        if s is None or s.shape != query.shape:
            return (dist[i], 1, 0.0, i)
        return (dist[i], 0, -brute_cosine(pooled(query), pooled(s)), i)

    want = sorted(range(n), key=key)
    assert order(dist, sims).tolist() == want
    for i in range(n):
        k = key(i)
        if k[1] == 0:
            assert sims[i] == pytest.approx(-k[2], abs=1e-5)
        else:
            assert np.isnan(sims[i])


@pytest.mark.parametrize("seed", range(5))
def test_vote_order_is_brute_force_sort(seed):
    """Labels given: distance, then the votes of the VOTERS most similar labelled candidates of that distance (a
    candidate: its best label's votes; unlabelled: the most any label got), then similarity, NaN last."""
    rng = np.random.default_rng(seed)
    n = 300
    dist = rng.integers(0, 3, n)
    sims = rng.standard_normal(n)
    sims[rng.choice(n, 20, replace=False)] = np.nan
    labels = [None if rng.random() < 0.1 else sorted({int(y) for y in rng.integers(0, 4, rng.integers(1, 3))})
              for _ in range(n)]

    def votes(i):
        voters = sorted((j for j in range(n) if dist[j] == dist[i] and labels[j] and not np.isnan(sims[j])),
                        key=lambda j: (-sims[j], j))[:VOTERS]
        count = {y: sum(y in labels[j] for j in voters) for y in range(4)}
        return max(count[y] for y in labels[i]) if labels[i] else max(count.values())

    want = sorted(range(n), key=lambda i: (dist[i], -votes(i), np.isnan(sims[i]), -np.nan_to_num(sims[i]), i))
    assert order(dist, sims, labels).tolist() == want


def test_the_vote_keeps_the_class_of_the_look_alikes_together():
    """One distance, two classes: the cosine alone interleaves them; most of the most similar are class 1, so
    class 1 comes first, each class in similarity order (an unlabelled item with the winners)."""
    sims = np.linspace(1.0, 0.0, 2 * VOTERS)
    labels = [[1] if i % 3 else [2] for i in range(2 * VOTERS)]
    labels[-1] = None
    got = order([0] * len(sims), sims, labels).tolist()
    assert order([0] * len(sims), sims).tolist() == list(range(len(sims)))
    assert got == [i for i in range(len(sims)) if labels[i] != [2]] + [i for i in range(len(sims)) if labels[i] == [2]]


def test_vectors_of_a_read_only_array_do_not_warn():
    """LMDB hands out read-only buffers; torch.from_numpy warned on them (once a process)."""
    x = np.arange(12, dtype=np.float16).reshape(2, 2, 3)
    x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vectors(x)
    assert np.allclose(got, vectors(x.copy()))


def test_vectors_unit_rows_and_zero_rows():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float16)
    assert vectors(x).tolist() == [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    act = np.ones((2, 4, 3, 3), np.float16)
    assert vectors(act).shape == (2, 4)
    assert np.allclose(np.linalg.norm(vectors(act), axis=1), 1.0)


def _view(features: dict[str, dict[str, np.ndarray]], read: list | None = None):
    """A stand-in view: shard name -> its store's features by id (the server test runs a real one); ``read``
    collects the ids asked for."""
    def shard(name):
        store = SimpleNamespace(features=lambda ids: [(read.append(i) if read is not None else None,
                                                      features[name].get(i))[1] for i in ids])
        return SimpleNamespace(shard=SimpleNamespace(store=store))
    return SimpleNamespace(by_name=lambda name: shard(name) if name in features else None)


def test_apply_reorders_ties_keeps_distances_and_cuts_to_k():
    rng = np.random.default_rng(1)
    q = rng.standard_normal(16).astype(np.float16)
    feats = {"t/0": {}, "t/1": {}}
    hits = []
    for i in range(30):
        name = f"t/{i % 2}"
        feats[name][f"i{i}"] = rng.standard_normal(16).astype(np.float16)
        hits.append({"id": f"i{i}", "distance": 0 if i < 20 else 3, "labels": [1], "shard": name})
    plan = Rerank.plan(q, k=5, candidates=30)
    assert plan.candidates == 30
    read = []
    out, fields = plan.apply(hits, _view(feats, read), 5)
    assert sorted(read) == sorted(h["id"] for h in hits[:20])  # past the 5th hit's distance nothing is read
    assert fields == {"reranked": True, "rerank_note": None}
    want = sorted(hits[:20], key=lambda h: -brute_cosine(q, feats[h["shard"]][h["id"]]))[:5]
    assert [h["id"] for h in out] == [h["id"] for h in want]
    assert all(h["distance"] == 0 for h in out)
    sims = [h["similarity"] for h in out]
    assert sims == sorted(sims, reverse=True)


def test_plan_without_feature_or_switched_off_keeps_hamming_order():
    hits = [{"id": str(i), "distance": i // 3, "labels": None, "shard": "t/0"} for i in range(9)]
    for plan in (Rerank.plan(None, 4, 200, "a search by code_hex has nothing to re-rank by"),
                 Rerank.plan(np.ones(4, np.float16), 4, 0)):
        assert plan.candidates == 4
        out, fields = plan.apply(hits, _view({}), 4)
        assert out == hits[:4]
        assert fields["reranked"] is False and fields["rerank_note"]
    assert Rerank.plan(np.ones(4), 500, 200).candidates == 500  # never fewer candidates than asked for
