"""LiveIndex over a real LMDB store: follows writes, overwrites, learned-code updates and generation
swaps, and answers exactly what brute force over the store's current items answers."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index import live as live_mod
from streamhash.index.hamming import PAD_DISTANCE
from streamhash.index.live import LiveIndex
from streamhash.index.store import ItemWrite, Store

BITS = 32


def write(store, rng, ids, labels=None, codes=None):
    codes = rng.integers(0, 256, (len(ids), BITS // 8), dtype=np.uint8) if codes is None else codes
    labels = labels or [(int(rng.integers(0, 5)),) for _ in ids]
    return store.write_batch([ItemWrite(i, c.tobytes(), b"x", "image/png", lab) for i, c, lab in zip(ids, codes, labels)])


def check_against_store(live: LiveIndex, store: Store, rng, ks=(1, 7, 10_000)):
    """Search results, ids and labels equal brute force over the store's snapshot, ties by arrival."""
    snap = store.snapshot()
    g = live.current
    assert (g.generation, g.index.ntotal, g.last_seq) == (snap.generation, len(snap.seqs), int(snap.seqs.max()))
    queries = np.concatenate([snap.codes[:3], rng.integers(0, 256, (3, BITS // 8), dtype=np.uint8)])
    dist = hamming_brute(queries, snap.codes)
    for k in ks:
        D, I = g.index.search(queries, k)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]  # snapshot rows are in arrival order
        m = order.shape[1]
        np.testing.assert_array_equal(D[:, :m], np.take_along_axis(dist, order, 1))
        np.testing.assert_array_equal(I[:, :m], snap.arrivals[order])
        assert (D[:, m:] == PAD_DISTANCE).all() and (I[:, m:] == -1).all()
    want = dict(zip(snap.arrivals.tolist(), zip(snap.ids, snap.labels)))
    probe = list(want) + [0, int(snap.seqs.max()) + 1]
    assert g.resolve(probe) == [want.get(s) for s in probe]
    assert int(snap.arrivals[0]) in g.index and 0 not in g.index


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "db", bits=BITS)
    yield s
    s.close()


def test_follows_writes_overwrites_and_learned_codes(store):
    rng = np.random.default_rng(0)
    write(store, rng, [f"a{i}" for i in range(300)])
    live = LiveIndex(store)  # built from a snapshot
    check_against_store(live, store, rng)
    for step in range(6):
        fresh = [f"s{step}-{i}" for i in range(int(rng.integers(1, 80)))]
        again = [f"a{i}" for i in rng.choice(300, 40, replace=False)]  # re-sent messages, new labels
        write(store, rng, fresh + again)
        learned = list(rng.choice(fresh, min(len(fresh), 10), replace=False))
        store.put_codes(learned, rng.integers(0, 256, (len(learned), BITS // 8), dtype=np.uint8))
        assert live.refresh() > 0
        check_against_store(live, store, rng)
    assert live.refresh() == 0


def test_a_query_never_sees_a_re_coded_item_missing(store):
    """A learned code (or an overwrite) gives the item a new seq; the follower once removed the old seq and
    added the new one in two steps, and a query between them found the index short (2,400 -> 2,344 in
    the learning integration test, the 56 learned codes of one round); ``ntotal`` read the index's two counters while a write was
    between them."""
    import threading

    rng = np.random.default_rng(3)
    ids = [f"a{i}" for i in range(500)]
    write(store, rng, ids)
    live = LiveIndex(store)
    sizes, done = [], threading.Event()

    def watch():
        while not done.is_set():
            sizes.append(live.current.index.ntotal)
            time.sleep(0)  # yield the GIL: the refreshes must run between the looks

    t = threading.Thread(target=watch)
    t.start()
    try:
        for _ in range(30):
            store.put_codes(ids[:200], rng.integers(0, 256, (200, BITS // 8), dtype=np.uint8))
            live.refresh()
    finally:
        done.set()
        t.join()
    assert len(sizes) > 100 and set(sizes) == {500}


def test_ties_break_by_insertion_order_and_overwrite_moves_an_item_last(store):
    rng = np.random.default_rng(1)
    same = np.zeros((5, BITS // 8), np.uint8)
    write(store, rng, ["e", "d", "c", "b", "a"], codes=same)
    live = LiveIndex(store)
    write(store, rng, ["c"], codes=same[:1])  # now the newest
    live.refresh()
    D, I = live.current.index.search(same[:1], 7)
    assert [x and x[0] for x in live.current.resolve(I[0, :5])] == ["e", "d", "b", "a", "c"]
    assert D[0].tolist() == [0] * 5 + [PAD_DISTANCE] * 2 and I[0, 5:].tolist() == [-1, -1]


def test_generation_swap_rebuilds_beside_the_live_one(store):
    rng = np.random.default_rng(2)
    ids = [f"x{i}" for i in range(200)]
    write(store, rng, ids)
    live = LiveIndex(store)
    old = live.current
    gen, _ = store.begin_generation()
    store.put_generation_codes(gen, ids, rng.integers(0, 256, (200, BITS // 8), dtype=np.uint8))
    store.swap_generation(gen, 7, [], np.zeros((0, BITS // 8), np.uint8))
    live.refresh()
    assert live.current is not old and live.current.generation == gen and live.current.model_version == 7
    check_against_store(live, store, rng)
    write(store, rng, ["x3", "new"])
    live.refresh()
    check_against_store(live, store, rng)


def test_hits_overwritten_after_the_search_still_resolve(store):
    """Between a search and the follower applying a write, a hit's seq is gone from the store:
    its id is found among the pending writes, its labels are the current ones."""
    rng = np.random.default_rng(3)
    write(store, rng, [f"h{i}" for i in range(50)])
    live = LiveIndex(store)
    g = live.current
    _, I = g.index.search(np.zeros((1, BITS // 8), np.uint8), 50)
    before = g.resolve(I[0])
    write(store, rng, [f"h{i}" for i in range(0, 50, 2)], labels=[(9,)] * 25)  # not applied yet
    after = g.resolve(I[0])
    assert [a[0] for a in after] == [b[0] for b in before]
    assert [a[1] for a in after] == [(9,) if int(b[0][1:]) % 2 == 0 else b[1] for b in before]
    live.refresh()
    check_against_store(live, store, rng)


def test_overwrites_are_exact_when_id_hashes_collide(store, monkeypatch):
    """With a 2-value hash nearly every id collides: an overwrite must still remove exactly the seq
    the overwritten item had, never one of another item sharing its hash."""
    monkeypatch.setattr(live_mod, "id_hashes", lambda ids: np.array([len(i) % 2 for i in ids], np.int64))
    rng = np.random.default_rng(4)
    ids = [f"c{i}" for i in range(120)]
    write(store, rng, ids)
    live = LiveIndex(store)
    for _ in range(4):
        write(store, rng, list(rng.choice(ids, 30, replace=False)) + [f"n{rng.integers(1_000_000)}"])
        live.refresh()
        check_against_store(live, store, rng)


def test_holds_at_most_64_bytes_an_item_beyond_the_code(store):
    """What the query server grows by per item, traced (numpy arrays included), built from the store
    and following it."""
    import gc
    import tracemalloc

    rng = np.random.default_rng(5)
    n = 30_000  # just under a power of two: capacity doubling adds little
    for a in range(0, n, 5000):
        write(store, rng, [f"img-{i:07d}" for i in range(a, a + 5000)])
    warm = LiveIndex(store)  # first-use imports and caches are not per item
    write(store, rng, ["img-0000000"])
    warm.refresh()
    del warm
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    live = LiveIndex(store)
    built = tracemalloc.get_traced_memory()[0] - base
    write(store, rng, [f"img-{i:07d}" for i in range(0, n, 3)])  # overwrites: seqs move, the map follows
    live.refresh()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert live.current.index.ntotal == n
    assert built / n - BITS // 8 <= 64 and grown / n - BITS // 8 <= 64, (built / n, grown / n)


def wait_visible(live: LiveIndex, item_id: str, within_s: float) -> float | None:
    """Seconds until ``item_id`` is searchable in the follower, or None after ``within_s``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < within_s:
        g = live.current
        if g.last_seq and any(r and r[0] == item_id for r in g.resolve([g.last_seq])):
            return time.perf_counter() - t0
        time.sleep(0.002)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_commit_wakes_the_follower_long_before_the_poll_interval(store):
    rng = np.random.default_rng(6)
    write(store, rng, ["first"])
    live = LiveIndex(store, refresh_interval_s=10.0, fallback_interval_s=10.0).start()
    try:
        assert live.notifying
        time.sleep(0.05)  # the follower's first refresh is done: it now waits on the notification
        for i in range(5):
            write(store, rng, [f"n{i}"])
            took = wait_visible(live, f"n{i}", 0.5)
            assert took is not None, f"n{i} not visible within 0.5 s of its commit"
        write(store, rng, [f"burst{i}" for i in range(50)])  # commits in a burst: one wake, all applied
        for i in range(20):
            write(store, rng, [f"b{i}"])
        assert wait_visible(live, "b19", 0.5) is not None
        check_against_store(live, store, rng)
    finally:
        t0 = time.perf_counter()
        live.stop()
        assert time.perf_counter() - t0 < 0.5 and not live._thread.is_alive()


def test_without_notification_the_poll_still_follows(store):
    rng = np.random.default_rng(7)
    write(store, rng, ["first"])
    live = LiveIndex(store, refresh_interval_s=0.05, notify=False).start()
    try:
        assert not live.notifying
        write(store, rng, ["polled"])
        assert wait_visible(live, "polled", 2.0) is not None
    finally:
        live.stop()


def test_falls_back_to_polling_when_inotify_is_unavailable(store, monkeypatch):
    from streamhash.index import notify

    def broken(path):
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(notify, "InotifyWaiter", broken)
    rng = np.random.default_rng(8)
    write(store, rng, ["first"])
    live = LiveIndex(store, refresh_interval_s=0.05, fallback_interval_s=10.0).start()
    try:
        assert not live.notifying
        write(store, rng, ["polled"])
        assert wait_visible(live, "polled", 2.0) is not None  # the 50 ms poll, not the 10 s fallback
    finally:
        live.stop()


@pytest.mark.parametrize("notify", [True, False])
def test_stop_returns_promptly_with_long_intervals(store, notify):
    write(store, np.random.default_rng(9), ["first"])
    live = LiveIndex(store, refresh_interval_s=30.0, fallback_interval_s=30.0, notify=notify).start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    live.stop()
    assert time.perf_counter() - t0 < 0.5 and not live._thread.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_a_stream_of_commits_is_applied_at_most_once_per_gap(store):
    """Under ingest a shard is committed to every few ms: the follower reads the store at most once every
    min_gap_s (each read takes the GIL and the index's write lock from searches), and still shows every item."""
    rng = np.random.default_rng(10)
    write(store, rng, ["first"])
    live = LiveIndex(store, refresh_interval_s=10.0, fallback_interval_s=10.0, min_gap_s=0.05).start()
    try:
        time.sleep(0.1)  # the first refresh is done
        reads = []
        read = store._env.read
        store._env.read = lambda fn: reads.append(time.monotonic()) or read(fn)
        t0 = time.monotonic()
        for i in range(100):
            write(store, rng, [f"s{i}"])
            time.sleep(0.002)
        took = time.monotonic() - t0
        assert wait_visible(live, "s99", 1.0) is not None
        check_against_store(live, store, rng)
        during = [t for t in reads if t <= t0 + took]
        assert len(during) <= took / 0.05 + 2, f"{len(during)} store reads in {took:.3f} s of commits"
        time.sleep(0.3)  # past the re-checks: a wake-up with nothing committed opens no transaction
        n = len(reads)
        assert live.refresh() == 0 and len(reads) == n
    finally:
        live.stop()


def test_removed_items_leave_the_index_and_a_rebuild_agrees(store):
    """Tombstones: a refresh drops each removed id's seq (a removal and a rewrite of one id in one refresh: the
    rewrite stays); searches equal brute force over the store's live items; a rebuild from the store agrees."""
    rng = np.random.default_rng(3)
    write(store, rng, [f"a{i}" for i in range(200)])
    live = LiveIndex(store)
    store.write_batch([], deletes=[f"a{i}" for i in range(0, 200, 3)])
    write(store, rng, ["a3", "a6", "new"])  # two removed ids written again, in the same refresh window
    store.write_batch([], deletes=["a9"])
    live.refresh()
    snap = store.snapshot()
    g = live.current
    assert g.index.ntotal == len(snap.seqs) == 200 - 67 + 3 and "a0" not in snap.ids and "a3" in snap.ids
    queries = rng.integers(0, 256, (5, BITS // 8), dtype=np.uint8)
    D, I = g.index.search(queries, 50)
    dist = hamming_brute(queries, snap.codes)
    order = np.argsort(dist, axis=1, kind="stable")[:, :50]
    np.testing.assert_array_equal(D, np.take_along_axis(dist, order, 1))
    np.testing.assert_array_equal(I, snap.seqs[order])
    assert set(g.resolve(I.ravel().tolist())) - {None} <= set(zip(snap.ids, snap.labels))
    rebuilt = LiveIndex(store).current
    np.testing.assert_array_equal(rebuilt.index.search(queries, 50)[1], I)


def test_a_learned_code_keeps_its_item_among_its_ties(store):
    """Ties break in arrival order: a learned code replaces the item's code where it stands, in the followed index
    and in one built again from the store (issue 24: a learned code once sent its item behind every inferred code
    at the same distance)."""
    code = np.zeros((1, BITS // 8), np.uint8)
    ids = [f"a{i}" for i in range(6)]
    write(store, np.random.default_rng(0), ids, codes=np.repeat(code, 6, 0))
    live = LiveIndex(store)
    store.put_codes(["a1", "a4"], np.repeat(code, 2, 0))
    assert live.refresh() == 2
    for g in (live.current, LiveIndex(store).current):
        D, I = g.index.search(code, 6)
        assert [r[0] for r in g.resolve(I[0].tolist())] == ids and (D == 0).all()
    far = np.full((1, BITS // 8), 255, np.uint8)
    store.put_codes(["a2"], far)
    live.refresh()
    D, I = live.current.index.search(code, 6)
    assert [r[0] for r in live.current.resolve(I[0].tolist())] == ["a0", "a1", "a3", "a4", "a5", "a2"]
    assert D[0].tolist() == [0] * 5 + [BITS]
