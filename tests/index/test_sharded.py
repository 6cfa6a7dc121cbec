"""ShardedIndex over real LMDB shards under a store root: merged top-k and radius equal brute force over the
union of the shards in the documented order (distance, then shard (topic, partition), then insertion seq);
a shard created while serving is found; a re-encode in one shard never shows a query a mix of generations."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import streamhash.index.radius as radius_mod
from streamhash.codes import hamming_brute
from streamhash.index.hamming import PAD_DISTANCE
from streamhash.index.radius import RadiusIndex
from streamhash.index.sharded import ShardedIndex
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot

BITS = 16  # 65536 codes, few distances: ties everywhere
# not in shard order on purpose: the merge orders by (topic, partition), partitions as numbers (2 before 10)
KEYS = [ShardKey("b", 0), ShardKey("a", 10), ShardKey("a", 2), ShardKey("a", 1)]


class Shards:
    """Writable shards under one root, handed to the ShardedIndex (one LMDB handle per environment and process)."""

    def __init__(self, path):
        self.root = StoreRoot(path)
        self.stores: dict[ShardKey, Store] = {}

    def add(self, key: ShardKey) -> Store:
        store = Store(self.root.shard_path(key), bits=BITS, shard=key.partition)
        self.stores[key] = store
        return store

    def index(self, **kw) -> ShardedIndex:
        return ShardedIndex(self.root, open_store=lambda key, _path: self.stores[key], **kw)

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


@pytest.fixture
def shards(tmp_path):
    s = Shards(tmp_path)
    yield s
    s.close()


def write(store, rng, ids, codes=None):
    codes = rng.integers(0, 256, (len(ids), BITS // 8), dtype=np.uint8) if codes is None else codes
    store.write_batch([ItemWrite(i, c.tobytes(), b"", "image/png", (n % 3,)) for n, (i, c) in enumerate(zip(ids, codes))])


def fill(shards: Shards, rng, n: int = 300) -> None:
    """Each shard: n items, then a third of them written again (new seqs, gaps where the old ones were)."""
    for key in KEYS:
        store = shards.add(key)
        ids = [f"{key.topic}{key.partition}-{i}" for i in range(n)]
        write(store, rng, ids, clustered(rng, n))
        write(store, rng, list(rng.choice(ids, n // 3, replace=False)), clustered(rng, n // 3))


CENTRES = np.random.default_rng(99).integers(0, 256, (6, BITS // 8), dtype=np.uint8)


def clustered(rng, n):
    """Codes near six centres: runs of equal distances at every k and radius."""
    flips = (rng.random((n, BITS // 8)) < 0.1).astype(np.uint8) * rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
    return CENTRES[rng.integers(0, len(CENTRES), n)] ^ flips


def union(shards: Shards, view):
    """(shard position, seq, id, code) of every item, from each shard's snapshot, in the view's shard order."""
    pos, seqs, ids, codes = [], [], [], []
    for v in view.shards:
        snap = shards.stores[v.shard.key].snapshot()
        pos += [v.pos] * len(snap.seqs)
        seqs.append(snap.seqs)
        ids += snap.ids
        codes.append(snap.codes)
    return np.array(pos), np.concatenate(seqs), ids, np.concatenate(codes)


def brute_order(dist, pos, seqs):
    """The documented order: distance, then shard, then seq."""
    return np.lexsort((seqs, pos, dist))


def test_merged_top_k_equals_brute_force_over_the_union(shards):
    rng = np.random.default_rng(0)
    fill(shards, rng)
    index = shards.index()
    view = index.view()
    assert [v.name for v in view.shards] == ["a/1", "a/2", "a/10", "b/0"]
    pos, seqs, ids, codes = union(shards, view)
    assert view.index_size == len(seqs) == 4 * 300
    queries = np.concatenate([CENTRES, codes[rng.choice(len(codes), 4)], rng.integers(0, 256, (4, 2), dtype=np.uint8)])
    dist = hamming_brute(queries, codes)
    for k in (1, 5, 37, 300, len(seqs) + 3):
        D, S, I = view.search([queries] * len(view), k)
        assert D.shape == S.shape == I.shape == (len(queries), k)
        for r in range(len(queries)):
            want = brute_order(dist[r], pos, seqs)[:k]
            m = len(want)
            np.testing.assert_array_equal(D[r, :m], dist[r][want])
            np.testing.assert_array_equal(S[r, :m], pos[want])
            np.testing.assert_array_equal(I[r, :m], seqs[want])
            assert (D[r, m:] == PAD_DISTANCE).all() and (S[r, m:] == -1).all() and (I[r, m:] == -1).all()
            if k == 37:
                assert [got[0] for got in view.resolve(S[r], I[r])] == [ids[w] for w in want]
    index.close()


def test_rank_answers_each_search_as_brute_force_over_the_union(shards):
    """View.rank, what every /search path calls: several searches in one call, each with its own k, its own
    code per shard (None: that shard does not rank it) and optionally a radius, come back as hits (id, labels,
    distance, shard name) in the documented order (distance, then shard, then seq) over the union."""
    rng = np.random.default_rng(7)
    fill(shards, rng, n=150)
    view = shards.index().view()
    pos, seqs, ids, codes = union(shards, view)
    labels = {i: list(store.get_item(i)["labels"]) for store in shards.stores.values() for i in store.snapshot().ids}
    base = np.concatenate([CENTRES[:3], rng.integers(0, 256, (2, 2), dtype=np.uint8)])
    # search r's code for shard p: its own per shard (models differ), and shard 1 leaves out the odd searches
    codes_by_search = [[None if (p == 1 and r % 2) else base[r] ^ np.uint8(5 * p) for p in range(len(view))]
                       for r in range(len(base))]
    ks = [1, 7, 40, 150, len(seqs) + 5]

    def want(r, radius=None):
        d = np.full(len(seqs), 10**6)
        for p in range(len(view)):
            if codes_by_search[r][p] is not None:
                d[pos == p] = hamming_brute(codes_by_search[r][p][None], codes[pos == p])[0]
        order = brute_order(d, pos, seqs)
        order = order[d[order] < (10**6 if radius is None else radius)][:ks[r]]
        return [(ids[w], int(d[w]), view.shards[pos[w]].name) for w in order]

    def got(hits):
        return [(h["id"], h["distance"], h["shard"]) for h in hits]

    ranked = view.rank(codes_by_search, ks)
    assert len(ranked) == len(base)
    for r, hits in enumerate(ranked):
        assert got(hits) == want(r)
        assert all(h["labels"] == labels[h["id"]] for h in hits)
        assert got(view.rank([codes_by_search[r]], [ks[r]])[0]) == want(r)  # alone: the same answer
    for radius in (0, 3, 6):
        for r, hits in enumerate(view.rank(codes_by_search, ks, radius)):
            assert got(hits) == want(r, radius)
    assert view.rank([[None] * len(view)], [5]) == [[]]  # no shard ranks it: no hits


def test_each_shard_ranks_its_own_queries_and_only_the_rows_asked(shards):
    """What a rolling re-encode needs: shard i ranks queries[i] (its own model's codes); ``ranked`` leaves rows out."""
    rng = np.random.default_rng(1)
    fill(shards, rng, n=200)
    view = shards.index().view()
    pos, seqs, _, codes = union(shards, view)
    base = rng.integers(0, 256, (6, 2), dtype=np.uint8)
    per_shard = [base ^ np.uint8(17 * i) for i in range(len(view))]
    ranked = [None, np.array([True, False] * 3), None, np.zeros(6, bool)]
    D, S, I = view.search(per_shard, 25, ranked)
    for r in range(6):
        d = np.full(len(seqs), 10**6)  # not ranked: never a hit
        for p in range(len(view)):
            if ranked[p] is None or ranked[p][r]:
                d[pos == p] = hamming_brute(per_shard[p][r:r + 1], codes[pos == p])[0]
        want = brute_order(d, pos, seqs)
        want = want[d[want] < 10**6][:25]
        np.testing.assert_array_equal(S[r, :len(want)], pos[want])
        np.testing.assert_array_equal(I[r, :len(want)], seqs[want])
        np.testing.assert_array_equal(D[r, :len(want)], d[want])
        assert 3 not in S[r]  # a shard ranking no row contributes nothing


@pytest.fixture
def force(monkeypatch):
    """force(strategy): the cost model answers ``strategy``; the tables are built inside the query."""
    real = RadiusIndex.range_search_tables

    def tables(self, queries, radius):
        self.wait = True
        return real(self, queries, radius)

    def force_(strategy):
        monkeypatch.setattr(radius_mod, "choose_radius_strategy", lambda *a, **k: strategy)
        monkeypatch.setattr(RadiusIndex, "range_search_tables", tables)

    return force_


@pytest.mark.parametrize("strategy", ["tables", "scan"])
def test_merged_radius_search_equals_brute_force_over_the_union(shards, force, strategy):
    rng = np.random.default_rng(2)
    fill(shards, rng)
    force(strategy)
    view = shards.index().view()
    pos, seqs, ids, codes = union(shards, view)
    queries = np.concatenate([CENTRES[:4], rng.integers(0, 256, (3, 2), dtype=np.uint8)])
    dist = hamming_brute(queries, codes)
    for radius in (0, 1, 3, 6, 17):
        ranked = [None, None, np.array([True, False] * 3 + [True]), None]
        lims, D, S, I = view.range_search([queries] * len(view), radius, ranked)
        assert len(lims) == len(queries) + 1 and lims[0] == 0 and lims[-1] == len(I)
        for r in range(len(queries)):
            hit = dist[r] < radius
            hit &= (pos != 2) | bool(ranked[2][r])
            want = brute_order(dist[r], pos, seqs)
            want = want[hit[want]]
            a, b = lims[r], lims[r + 1]
            np.testing.assert_array_equal(D[a:b], dist[r][want])
            np.testing.assert_array_equal(S[a:b], pos[want])
            np.testing.assert_array_equal(I[a:b], seqs[want])
            assert [got[0] for got in view.resolve(S[a:b], I[a:b])] == [ids[w] for w in want]


def test_a_shard_created_while_serving_is_found_and_followed(shards):
    rng = np.random.default_rng(3)
    for key in KEYS[:2]:
        write(shards.add(key), rng, [f"{key}-{i}" for i in range(50)])
    index = shards.index(rescan_s=0.05, refresh_interval_s=0.01).start()
    try:
        assert [s.name for s in index.shards] == ["a/10", "b/0"]
        late = ShardKey("a", 3)
        store = shards.add(late)  # data.mdb exists before the test's handle is registered: the scan retries
        write(store, rng, ["late-0"], np.zeros((1, 2), np.uint8))
        deadline = time.monotonic() + 10
        while [s.name for s in index.shards] != ["a/3", "a/10", "b/0"]:
            assert time.monotonic() < deadline, "the new shard was not found"
            time.sleep(0.02)
        write(store, rng, ["late-1"], np.zeros((1, 2), np.uint8))  # and its follower runs
        while index.view().index_size < 102:
            assert time.monotonic() < deadline, "the new shard's follower did not apply a write"
            time.sleep(0.02)
        view = index.view()
        D, S, I = view.search([np.zeros((1, 2), np.uint8)] * len(view), 2)
        assert [r[0] for r in view.resolve(S[0], I[0])] == ["late-0", "late-1"] and D[0].tolist() == [0, 0]
        assert index.find_item("late-1")[0].name == "a/3" and index.find_item("nope") is None
    finally:
        index.stop()


def test_a_reencode_in_one_shard_never_mixes_generations_within_a_query(shards):
    """Shard a/1 alternates between generations whose codes are all 0x0000 (odd) and all 0xFFFF (even) while
    queries run: every query sees, for that shard, all its items at one distance, the one of the generation
    its view names, and never a partly applied swap."""
    rng = np.random.default_rng(4)
    steady, moving = shards.add(ShardKey("a", 0)), shards.add(ShardKey("a", 1))
    write(steady, rng, [f"s{i}" for i in range(200)], np.zeros((200, 2), np.uint8))
    ids = [f"m{i}" for i in range(300)]
    write(moving, rng, ids, np.zeros((300, 2), np.uint8))
    index = shards.index(refresh_interval_s=0.001, notify=False).start()
    q = np.zeros((1, 2), np.uint8)
    seen, errors, done = set(), [], threading.Event()

    def query():
        while not done.is_set():
            view = index.view()
            v = view.shards[1]
            before = v.g.index.ntotal  # the follower may add items of this generation meanwhile, never remove
            D, S, I = view.search([q, q], 2000)
            mine = D[0][S[0] == 1]
            expect = 0 if v.g.generation % 2 else BITS
            if not before <= len(mine) <= v.g.index.ntotal or set(mine.tolist()) != {expect} \
                    or set(D[0][S[0] == 0].tolist()) != {0}:
                errors.append((v.g.generation, sorted(set(mine.tolist())), len(mine)))
            seen.add(v.g.generation)

    thread = threading.Thread(target=query)
    thread.start()
    try:
        for _ in range(6):
            gen, _ = moving.begin_generation()
            code = np.zeros(2, np.uint8) if gen % 2 else np.full(2, 255, np.uint8)
            moving.put_generation_codes(gen, ids, np.tile(code, (len(ids), 1)))
            moving.swap_generation(gen, gen, [], np.zeros((0, 2), np.uint8))
            moving.drop_generation(gen - 1)
            new = [f"m{len(ids) + i}" for i in range(20)]  # written into the new generation while queries run
            write(moving, rng, new, np.tile(code, (20, 1)))
            ids += new
            deadline = time.monotonic() + 10
            while index.view().shards[1].g.generation != gen or index.view().shards[1].g.index.ntotal != len(ids):
                assert time.monotonic() < deadline, "the follower did not swap"
                time.sleep(0.005)
            time.sleep(0.05)
    finally:
        done.set()
        thread.join()
        index.stop()
    assert not errors, errors[:5]
    assert seen >= {1, 7} and len(seen) >= 4, seen
