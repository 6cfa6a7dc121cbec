"""Radius search over a generation (RadiusIndex, what the query server ranks with): multi-index tables and
flat scan give the brute-force answer, in order."""

import numpy as np
import pytest

import streamhash.index.radius as radius_mod
import streamhash.services.query as query
from streamhash.codes import hamming_brute
from streamhash.index.live import LiveIndex
from streamhash.index.radius import RadiusIndex
from streamhash.index.store import ItemWrite, Store


def clustered(rng, base, n):
    """Codes near a few centres: many items within small radii of each other, many ties."""
    flips = (rng.random((n, base.shape[1])) < 0.04).astype(np.uint8) * rng.integers(0, 256, (n, base.shape[1]), dtype=np.uint8)
    return base[rng.integers(0, len(base), n)] ^ flips


def brute(queries, codes, seqs, radius):
    """Per query, (D, seqs) of the codes at distance < radius, sorted by (distance, seq)."""
    out = []
    for dist in hamming_brute(queries, codes):
        hit = np.flatnonzero(dist < radius)
        hit = hit[np.lexsort((seqs[hit], dist[hit]))]
        out.append((dist[hit], seqs[hit]))
    return out


@pytest.fixture
def force(monkeypatch):
    """force(strategy) makes the cost model answer ``strategy``; returns the list of tables lookups made."""
    calls = []

    real = Store.table_candidates

    def candidates(store, generation, queries, radius):
        calls.append(generation)
        return real(store, generation, queries, radius)

    def force_(strategy):
        monkeypatch.setattr(radius_mod, "choose_radius_strategy", lambda *a, **k: strategy)
        monkeypatch.setattr(Store, "table_candidates", candidates)
        return calls

    return force_


@pytest.mark.parametrize("strategy", ["tables", "scan"])
@pytest.mark.parametrize("radius", [1, 3, 6, 12])
def test_radius_search_matches_brute_force(tmp_path, force, strategy, radius):
    rng = np.random.default_rng(radius)
    store = Store(tmp_path, bits=32)
    base = rng.integers(0, 256, (20, 4), dtype=np.uint8)
    codes = clustered(rng, base, 3000)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(codes)])
    live = LiveIndex(store)
    calls = force(strategy)
    g = live.current
    for q in base[:5]:
        _, D, I = RadiusIndex.over_store(g.index, store, g.generation).range_search(q[None], radius)
        dist = hamming_brute(q[None], codes)[0]
        want = np.flatnonzero(dist < radius)
        want = want[np.lexsort((want, dist[want]))]  # (distance, insertion order)
        np.testing.assert_array_equal(I, want + 1)  # seqs start at 1
        np.testing.assert_array_equal(D, dist[want])
        # the server's ranking: the same hits, as item ids
        hits = query._rank(store, g, q, k=len(codes), radius=radius)
        assert [(h.id, h.distance) for h in hits] == [(f"i{n}", int(dist[n])) for n in want]
    assert len(calls) == (10 if strategy == "tables" else 0)


@pytest.mark.parametrize("strategy", ["tables", "scan"])
def test_batches_overwrites_removals_and_unapplied_items(tmp_path, force, strategy):
    """Many queries at once, over a generation whose items were overwritten (new seqs, old ones gone), and
    items the store holds but the in-memory index has not applied yet: those are not visible."""
    rng = np.random.default_rng(7)
    store = Store(tmp_path, bits=40)
    base = rng.integers(0, 256, (12, 5), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(clustered(rng, base, 2000))])
    redo = rng.choice(2000, 600, replace=False)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in zip(redo, clustered(rng, base, 600))])
    live = LiveIndex(store)
    g = live.current
    seqs = np.array(sorted(int(s) for s in range(1, 2601) if s in g.index), np.int64)
    codes, held = g.index.reconstruct_batch(seqs)
    assert held.all() and len(seqs) == 2000  # each overwrite left one live seq
    store.write_batch([ItemWrite(f"new{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(clustered(rng, base, 300))])
    calls = force(strategy)
    queries = np.concatenate([base[:6], clustered(rng, base, 6)])
    index = RadiusIndex.over_store(g.index, store, g.generation)
    # past d every code matches; probing that would enumerate every substring value, so only the scan is asked
    for radius in (0, 1, 2, 5, 9) + ((41, 60) if strategy == "scan" else ()):
        lims, D, I = index.range_search(queries, radius)
        assert lims.dtype == np.int64 and D.dtype == np.int32 and I.dtype == np.int64 and len(lims) == len(queries) + 1
        for j, (want_d, want_i) in enumerate(brute(queries, codes, seqs, radius)):
            np.testing.assert_array_equal(I[lims[j] : lims[j + 1]], want_i)
            np.testing.assert_array_equal(D[lims[j] : lims[j + 1]], want_d)
    assert len(calls) == (5 if strategy == "tables" else 0)


def test_a_replaced_generation_is_scanned(tmp_path, monkeypatch):
    """Tables are looked up only for the store's live generation; for any other the flat index answers."""
    rng = np.random.default_rng(3)
    store = Store(tmp_path, bits=32)
    codes = rng.integers(0, 256, (500, 4), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(codes)])
    g = LiveIndex(store).current
    assert store.table_candidates(g.generation + 1, codes[:2], 5) is None
    assert store.table_candidates(g.generation, codes[:2], 5) is not None
    monkeypatch.setattr(radius_mod, "choose_radius_strategy", lambda *a, **k: "tables")
    got = RadiusIndex(g.index, lambda *a: None, generation=g.generation, m=store.tables.m).range_search(codes[:3], 9)
    want = g.index.range_search(codes[:3], 9)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_search_is_the_flat_index_and_queries_are_checked(tmp_path):
    rng = np.random.default_rng(4)
    store = Store(tmp_path, bits=32)
    codes = rng.integers(0, 256, (300, 4), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(codes)])
    g = LiveIndex(store).current
    index = RadiusIndex.over_store(g.index, store, g.generation)
    assert index.d == 32 and index.ntotal == 300 and index.m == store.tables.m
    for a, b in zip(index.search(codes[:4], 7), g.index.search(codes[:4], 7)):
        np.testing.assert_array_equal(a, b)
    for bad in (codes[:2, :3], codes[:2].astype(np.int64), codes[0]):
        with pytest.raises(ValueError, match="queries must be uint8"):
            index.range_search(bad, 3)
