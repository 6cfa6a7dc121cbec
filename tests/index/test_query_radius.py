"""Radius search over a generation (RadiusIndex, what the query server ranks with): the in-memory multi-index
tables and the flat scan give the brute-force answer, in order."""

import numpy as np
import pytest

import streamhash.index.radius as radius_mod
from streamhash.codes import hamming_brute
from streamhash.index.live import LiveIndex
from streamhash.index.radius import RadiusIndex
from streamhash.index.sharded import Shard, View
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey


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
    """force(strategy) makes the cost model answer ``strategy`` and the tables build inside the query;
    returns the list of radii the tables answered."""
    calls = []
    real = RadiusIndex.range_search_tables

    def tables(self, queries, radius):
        self.wait = True
        found = real(self, queries, radius)
        if found is not None:
            calls.append(radius)
        return found

    def force_(strategy):
        monkeypatch.setattr(radius_mod, "choose_radius_strategy", lambda *a, **k: strategy)
        monkeypatch.setattr(RadiusIndex, "range_search_tables", tables)
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
        # the server's ranking (one shard): the same hits, as item ids
        view = View([Shard(ShardKey("t", 0), store, live)])
        hits = view.rank([[q]], [len(codes)], radius)[0]
        assert [(h["id"], h["distance"]) for h in hits] == [(f"i{n}", int(dist[n])) for n in want]
    assert len(calls) == (10 if strategy == "tables" else 0)  # 5 queries, each by RadiusIndex and by View.rank


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


def test_each_generation_has_its_own_tables_kept_in_step_with_the_follower(tmp_path, monkeypatch):
    """The tables belong to a generation's flat index: built once, followed through the LiveIndex's adds and
    overwrites (tail scan, rebuild), replaced with the index on a re-encode; the first query over a
    generation scans while they build in the background."""
    rng = np.random.default_rng(3)
    store = Store(tmp_path, bits=32)
    base = rng.integers(0, 256, (10, 4), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(clustered(rng, base, 3000))])
    live = LiveIndex(store)
    monkeypatch.setattr(radius_mod, "choose_radius_strategy", lambda *a, **k: "tables")
    g = live.current
    index = RadiusIndex.over_store(g.index, store, g.generation)
    first = index.range_search(base[:3], 5)
    assert index.last_strategy == "scan"  # no tables yet: the flat index answered, a build started
    index.tables.build()
    assert RadiusIndex.over_store(g.index, store, g.generation).tables is index.tables  # one per flat index
    for a, b in zip(index.range_search(base[:3], 5), first):
        np.testing.assert_array_equal(a, b)
    assert index.last_strategy == "tables"
    # the follower applies new items and overwrites: the tables answer for them at once
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(clustered(rng, base, 400))])
    store.write_batch([ItemWrite(f"new{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(clustered(rng, base, 300))])
    assert live.refresh() == 700
    seqs = np.array(sorted(int(s) for s in range(1, 3701) if s in g.index), np.int64)
    codes, _ = g.index.reconstruct_batch(seqs)
    index = RadiusIndex.over_store(g.index, store, g.generation)
    for radius in (1, 3, 6):
        lims, D, I = index.range_search(base[:4], radius)
        assert index.last_strategy == "tables"
        for j, (want_d, want_i) in enumerate(brute(base[:4], codes, seqs, radius)):
            np.testing.assert_array_equal(I[lims[j] : lims[j + 1]], want_i)
            np.testing.assert_array_equal(D[lims[j] : lims[j + 1]], want_d)
    # a re-encode swaps in a new flat index: new tables
    gen, _ = store.begin_generation()
    ids = [f"i{n}" for n in range(3000)] + [f"new{n}" for n in range(300)]
    new_codes = clustered(rng, base, len(ids))
    store.put_generation_codes(gen, ids, new_codes)
    store.swap_generation(gen, 2, ids, new_codes)
    live.refresh()
    g2 = live.current
    assert g2.generation == gen and g2.index is not g.index
    index2 = RadiusIndex.over_store(g2.index, store, g2.generation)
    assert index2.tables is not index.tables
    index2.wait = True
    for a, b in zip(index2.range_search(base[:3], 4), g2.index.range_search(base[:3], 4)):
        np.testing.assert_array_equal(a, b)
    assert index2.last_strategy == "tables"


def test_search_is_the_flat_index_and_queries_are_checked(tmp_path):
    rng = np.random.default_rng(4)
    store = Store(tmp_path, bits=32)
    codes = rng.integers(0, 256, (300, 4), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(codes)])
    g = LiveIndex(store).current
    index = RadiusIndex.over_store(g.index, store, g.generation)
    assert index.d == 32 and index.ntotal == 300 and index.m == 2  # 32 bits: two 16-bit substrings
    for a, b in zip(index.search(codes[:4], 7), g.index.search(codes[:4], 7)):
        np.testing.assert_array_equal(a, b)
    for bad in (codes[:2, :3], codes[:2].astype(np.int64), codes[0]):
        with pytest.raises(ValueError, match="queries must be uint8"):
            index.range_search(bad, 3)
