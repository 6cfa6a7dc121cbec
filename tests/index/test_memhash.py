"""In-memory multi-index tables (MemHash): exact against brute force, native and numpy, kept in step with the flat index."""

from __future__ import annotations

import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index import memhash
from streamhash.index.backends import make_index
from streamhash.index.memhash import MemHash, memhash_for, substring_values
from streamhash.index.multihash import Substrings
from tests.index.backend_checks import limit_to

BACKENDS = ["numpy"] + (["native"] if memhash._native is not None else [])


@pytest.fixture(params=["native", "native:popcnt", "native:generic", "numpy"])
def probe(request, monkeypatch):
    """Run the probe through the C routine (under each of its scans) or its numpy twin."""
    if request.param == "numpy":
        monkeypatch.setattr(memhash, "_native", None)
    elif memhash._native is None:
        pytest.skip("the native kernel is not built here")
    elif ":" in request.param:
        limit_to(request, request.param.partition(":")[2])
    return request.param


def clustered(rng, n, bits, centres=10, p=0.05):
    base = rng.random((centres, bits)) < 0.5
    return np.packbits(base[rng.integers(0, centres, n)] ^ (rng.random((n, bits)) < p), axis=1)


def clustered_flat(rng, backend, n, bits=32):
    """A flat index of ``n`` clustered codes under ids 1..n (as the store's seqs): (index, codes, ids)."""
    flat = make_index(bits, backend)
    codes = clustered(rng, n, bits)
    seqs = np.arange(1, n + 1, dtype=np.int64)
    flat.add_with_ids(codes, seqs)
    return flat, codes, seqs


def brute(queries, codes, ids, radius):
    """Per query (D, ids) at distance < radius, by (distance, insertion order = position in codes)."""
    out = []
    for dist in hamming_brute(queries, codes):
        hit = np.flatnonzero(dist < radius)
        hit = hit[np.lexsort((hit, dist[hit]))]
        out.append((dist[hit], ids[hit]))
    return out


def check(got, want):
    lims, D, I = got
    assert lims.dtype == np.int64 and D.dtype == np.int32 and I.dtype == np.int64 and len(lims) == len(want) + 1
    for j, (wd, wi) in enumerate(want):
        np.testing.assert_array_equal(I[lims[j] : lims[j + 1]], wi)
        np.testing.assert_array_equal(D[lims[j] : lims[j + 1]], wd)


def test_substring_values_match_the_integer_split():
    rng = np.random.default_rng(0)
    for bits, m in [(16, 1), (24, 2), (40, 3), (64, 4), (64, 5), (72, 4), (128, 2), (128, 8), (136, 3)]:
        t = Substrings(bits, m)
        codes = rng.integers(0, 256, (50, bits // 8), dtype=np.uint8)
        got = substring_values(codes, t.bounds)
        assert got.tolist() == [t.values(c.tobytes()) for c in codes], (bits, m)


@pytest.mark.parametrize("bits,m", [(16, 1), (24, 2), (32, 2), (40, 3), (64, 4), (64, 5), (72, 4), (128, 8), (64, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_brute_force(probe, backend, bits, m):
    """Every radius the probe count allows, clustered codes (many ties), both directory layouts."""
    rng = np.random.default_rng(bits * 10 + m)
    n = 20_000 if (bits, m) == (64, 4) else 2_500  # 1M-like full 16-bit directories, and small (binary search)
    codes = clustered(rng, n, bits)
    ids = np.arange(n, dtype=np.int64) * 3 + 7
    flat = make_index(bits, backend)
    flat.add_with_ids(codes, ids)
    mh = MemHash(flat, m)
    queries = np.concatenate([codes[:6], clustered(rng, 6, bits), rng.integers(0, 256, (2, bits // 8), dtype=np.uint8)])
    for radius in range(12):
        if mh.n_probes(radius) > 20_000:
            continue
        check(mh.range_search(queries, radius, wait=True), brute(queries, codes, ids, radius))
        one = mh.range_search(queries[:1], radius)  # the single-query path (plain-int substrings)
        check(one, brute(queries[:1], codes, ids, radius))
    assert mh.builds == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_kept_in_step_with_adds_removes_overwrites_and_compaction(probe, backend):
    rng = np.random.default_rng(5)
    bits, m = 32, 2
    flat, codes, seqs = clustered_flat(rng, backend, 3000, bits)
    mh = memhash_for(flat, m)
    assert memhash_for(flat, m) is mh and memhash_for(flat, m + 1) is not mh
    queries = np.concatenate([codes[:5], clustered(rng, 5, bits)])
    live = dict(zip(seqs.tolist(), codes))

    def expect(radius):
        order = sorted(live)  # seqs increase with insertion: insertion order
        return brute(queries, np.array([live[s] for s in order]), np.array(order), radius)

    assert mh.range_search(queries, 5) is None or mh.builds  # nothing built yet: None (a background build starts)
    mh.build()
    builds = mh.builds
    # appended rows (the tail) are scanned until the next build
    more = clustered(rng, 500, bits)
    new = np.arange(3001, 3501, dtype=np.int64)
    flat.add_with_ids(more, new)
    live.update(zip(new.tolist(), more))
    for radius in (1, 3, 6):
        check(mh.range_search(queries, radius), expect(radius))
    assert mh.builds == builds  # 500 rows: within the tail limit
    # removals (tombstones) are skipped
    gone = rng.choice(np.arange(1, 3501), 400, replace=False)
    flat.remove_ids(gone)
    for s in gone.tolist():
        live.pop(s)
    for radius in (1, 3, 6):
        check(mh.range_search(queries, radius), expect(radius))
    # a long tail triggers a rebuild (wait=True: inside the query)
    big = clustered(rng, 3000, bits)
    new = np.arange(3501, 6501, dtype=np.int64)
    flat.add_with_ids(big, new)
    live.update(zip(new.tolist(), big))
    check(mh.range_search(queries, 4, wait=True), expect(4))
    assert mh.builds == builds + 1 and mh._snap.n == flat._n
    # enough removals compact the flat index: rows move, the tables are rebuilt
    layout = flat._layout
    gone = np.array(sorted(live))[::2]
    flat.remove_ids(gone)
    for s in gone.tolist():
        live.pop(s)
    assert flat._layout != layout
    assert mh.range_search(queries, 4) is None  # stale: scan meanwhile (a background build starts)
    check(mh.range_search(queries, 4, wait=True), expect(4))


def test_background_build_then_tables(monkeypatch):
    rng = np.random.default_rng(9)
    flat = make_index(32, "numpy")
    codes = clustered(rng, 2000, 32)
    flat.add_with_ids(codes, np.arange(2000))
    mh = MemHash(flat, 2)
    assert mh.range_search(codes[:3], 4) is None
    import time

    deadline = time.time() + 30
    while mh._snap is None and time.time() < deadline:
        time.sleep(0.01)
    check(mh.range_search(codes[:3], 4), brute(codes[:3], codes, np.arange(2000), 4))


def test_unsorted_ids_and_overwrites_keep_the_flat_order():
    """Out-of-order ids and re-added ids: the tables path returns exactly the flat index's answer."""
    rng = np.random.default_rng(11)
    flat = make_index(24, "numpy")
    codes = clustered(rng, 1500, 24)
    flat.add_with_ids(codes, rng.permutation(5000)[:1500])
    flat.add_with_ids(clustered(rng, 200, 24), rng.permutation(5000)[:200])  # some overwrite
    mh = MemHash(flat, 2)
    for radius in (1, 2, 4, 6):
        got = mh.range_search(codes[:8], radius, wait=True)
        for a, b in zip(got, flat.range_search(codes[:8], radius)):
            np.testing.assert_array_equal(a, b)


def test_bucket_entries_and_skew():
    rng = np.random.default_rng(2)
    flat = make_index(32, "numpy")
    uniform = rng.integers(0, 256, (20000, 4), dtype=np.uint8)
    flat.add_with_ids(uniform, np.arange(20000))
    mh = MemHash(flat, 2)
    mh.build()
    assert 0.8 < mh.skew < 1.25  # uniform codes
    q = uniform[:50]
    t = Substrings(32, 2)
    assert t.probe_radii(1) == [0, -1] and t.probe_radii(2) == [0, 0]  # strict radius 1: one table suffices
    sub, qs = substring_values(uniform, t.bounds), substring_values(q, t.bounds)
    np.testing.assert_array_equal(mh.bucket_entries(q, 1), [(sub[:, 0] == a).sum() for a, _ in qs])
    np.testing.assert_array_equal(mh.bucket_entries(q, 2), [(sub[:, 0] == a).sum() + (sub[:, 1] == b).sum() for a, b in qs])
    clustered_flat = make_index(32, "numpy")
    clustered_flat.add_with_ids(clustered(rng, 20000, 32), np.arange(20000))
    assert MemHash(clustered_flat, 2).build().skew > 10


@pytest.mark.parametrize("backend", BACKENDS)
def test_learned_codes_replaced_in_place_rebuild_the_tables(backend):
    """A learned code replaces an item's code in its row (update_codes): tables built over the old codes would miss
    the item where its new code falls, so they count as stale until rebuilt."""
    rng = np.random.default_rng(8)
    bits, m = 32, 2
    flat, codes, seqs = clustered_flat(rng, backend, 2000, bits)
    mh = memhash_for(flat, m)
    mh.build()
    queries = clustered(rng, 6, bits)
    moved = seqs[::7]
    codes[::7] = np.repeat(queries[:1], len(moved), 0)  # every moved item lands on the first query
    assert flat.update_codes(codes[::7], moved).all()
    assert mh.range_search(queries, 2) is None  # stale: scan meanwhile (a background build starts)
    got = mh.range_search(queries, 2, wait=True)
    check(got, brute(queries, codes, seqs, 2))
    assert set(moved.tolist()) <= set(got[2][got[0][0]:got[0][1]].tolist())
