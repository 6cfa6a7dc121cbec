"""The query side's in-memory index, kept in step with the LMDB store.

A follower thread reads the store's ``changes`` from the last seq it applied (O(new items), never
a scan) and applies them to a :class:`~streamhash.index.hamming.BinaryIndex` keyed by each item's arrival
seq: an arrival is appended, a learned code replaces the item's code in its row, so ties break in arrival order.
A generation change (a re-encode) builds the new generation's index from a snapshot *beside* the
live one and swaps a single reference, so every query runs against exactly one generation and
reports it.

Memory: numpy arrays only, no Python object per item. A generation holds the codes (padded to
64-bit words), the seqs, a tombstone byte and a dense seq -> row map in the Hamming index, plus
the 64-bit hash of each item id -> its seq (:class:`~streamhash.hashmap.Int64Multimap`, 16
bytes) so an overwrite finds the seq it replaces: ~35 bytes an item beyond the packed code
(``benchmarks/bench_memory.py``; the seq -> id / labels / id -> seq dicts held before cost ~450).
Item ids and labels are read back from the store for the k hits of a query
(:meth:`Generation.resolve`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np

from streamhash import metrics as m
from streamhash.hashmap import Int64Multimap
from streamhash.index.hamming import BinaryIndex, make_index
from streamhash.index.notify import Waiter, make_waiter
from streamhash.index.store import Change, Store

log = logging.getLogger(__name__)

Resolved = tuple[str, tuple[int, ...] | None]  # (item id, labels)


def id_hashes(ids: Sequence[str]) -> np.ndarray:
    """64-bit hashes of item ids: keys of the id -> seq map (the process-salted str hash is fine,
    the map never leaves the process)."""
    return np.fromiter(map(hash, ids), np.int64, len(ids))


class Generation:
    """Everything a query needs, from one generation of the store; swapped as a whole."""

    def __init__(self, store: Store, generation: int, model_version: int, index: BinaryIndex):
        self.store = store
        self.generation, self.model_version, self.index = generation, model_version, index
        self.last_seq = 0
        self.seq_of_hash = Int64Multimap()  # id hash -> arrival seq of every item in the index

    def resolve(self, seqs: Sequence[int]) -> list[Resolved | None]:
        """(id, labels) of the items that arrived under these seqs in this generation; None for a seq not in it.

        Ids come from the store's ``changes``. A seq still searched here may already be gone
        from the store, its item written again by a message the follower has not applied yet: its id is then
        the one among those pending items whose hash maps to the seq here (a wrong id would need a
        64-bit hash collision among the pending items).
        """
        seqs = [int(s) for s in seqs]
        after = self.last_seq  # before reading: whatever the follower applies later stays pending
        out = self.store.items_at(seqs)
        lost = [i for i, r in enumerate(out) if r is None and seqs[i] in self.index]
        if lost:
            pending = self.store.ids_after(after)
            which, owners = self.seq_of_hash.find(id_hashes(pending))
            owner = dict(zip(owners.tolist(), (pending[w] for w in which.tolist())))
            found = [(i, owner[seqs[i]]) for i in lost if seqs[i] in owner]
            labels = self.store.labels_of([item_id for _, item_id in found])
            for (i, item_id), lab in zip(found, labels):
                out[i] = (item_id, lab)
        return out


class LiveIndex:
    """Follows the store on a thread (:meth:`start`).

    With ``notify`` (the default) the follower is woken by the kernel when a commit writes the store
    (inotify on its directory, :mod:`streamhash.index.notify`), so freshness does not depend on an
    interval nor on how busy the machine is, and it polls only every ``fallback_interval_s`` as a
    safety net. Without a notification (``notify=False``, or inotify unavailable) it polls every
    ``refresh_interval_s``.

    Under ingest a shard is committed to every few ms, and each commit's page writes raise several
    notifications: the follower refreshes at most once every ``min_gap_s`` (what commits meanwhile is
    applied in one go, a few ms later), and a wake-up with nothing committed since its last read costs a
    look at LMDB's meta page, not a transaction (:meth:`Store.changes_if_committed`). Every refresh
    takes the GIL and the index's write lock from the searches.
    """

    def __init__(self, store: Store, *, backend: str = "auto", threads: int = 1, refresh_interval_s: float = 0.05,
                 notify: bool = True, fallback_interval_s: float = 1.0, min_gap_s: float = 0.005):
        self.store = store
        self.backend, self.threads = backend, threads
        self.refresh_interval_s = refresh_interval_s
        self.notify, self.fallback_interval_s = notify, fallback_interval_s
        self.min_gap_s = min_gap_s
        self._seen_txnid = -1  # the LMDB snapshot the last refresh read (-1: none since the generation was built)
        self.current: Generation = self._build()
        self._publish(self.current)
        self._stop = threading.Event()
        self._waiter: Waiter | None = None
        self._thread: threading.Thread | None = None

    def _new_index(self) -> BinaryIndex:
        return make_index(self.store.bits, backend=self.backend, threads=self.threads)

    def _build(self) -> Generation:
        """A full generation from one snapshot; later changes are applied by :meth:`refresh`."""
        g = Generation(self.store, 0, 0, self._new_index())

        def add(seqs: np.ndarray, codes: np.ndarray, ids: list) -> None:
            g.index.add_with_ids(codes, seqs)
            g.seq_of_hash.add(id_hashes(ids), seqs)

        g.generation, g.model_version, g.last_seq = self.store.read_generation(add)
        return g

    def refresh(self) -> int:
        """Apply new store changes; rebuild on a generation change. Returns the number applied."""
        g = self.current
        got = self.store.changes_if_committed(g.last_seq, self._seen_txnid)
        if got is None:
            return 0
        txnid, gen, model_version, changes = got
        if gen != g.generation:
            t0 = time.perf_counter()
            new = self._build()
            self.current = new  # one reference swap: queries see the old or the new generation, never both
            self._seen_txnid = -1
            log.info("swapped to generation %d (model %d, %d items) in %.2fs",
                     new.generation, new.model_version, new.index.ntotal, time.perf_counter() - t0)
            self._publish(new)
            return new.index.ntotal
        if model_version != g.model_version:
            # A DIHN round: same codes, a newer compatible query encoder. One attribute write.
            g.model_version = model_version
            self._publish(g)
        if not changes:
            self._seen_txnid = txnid
            return 0
        with m.INDEX_REFRESH_SECONDS.time():
            last = changes[-1].seq
            removed = [c.id for c in changes if c.deleted]
            if removed:  # first: a write read in this refresh is live now, so it came after any removal of its id
                self._remove(g, removed)
                changes = [c for c in changes if not c.deleted]
            learned = [c for c in changes if c.arrived is not None]
            arrived = [c for c in changes if c.arrived is None] if learned else changes
            if arrived:
                self._add(g, arrived)
            if learned:
                self._recode(g, learned)
            g.last_seq = last
        self._seen_txnid = txnid  # only once applied: a refresh that failed reads the same snapshot again
        now = time.time()
        for c in changes:
            if c.ts is not None:  # learned-code updates are not new messages
                m.FRESHNESS_SECONDS.observe(max(0.0, now - c.ts))
        self._publish(g)
        return len(changes) + len(removed)

    def _add(self, g: Generation, changes) -> None:
        """New and rewritten items (a rewrite's old seq leaves the index in the same step)."""
        hashes = id_hashes([c.id for c in changes])
        which, old = g.seq_of_hash.find(hashes)
        # Each match is the seq an overwritten item had, unless another item shares the id's
        # 64-bit hash: that one still has its seq in the store, an overwritten one does not.
        stale = ~self.store.seqs_live(old) if len(old) else np.zeros(0, bool)
        seqs = np.array([c.seq for c in changes], np.int64)
        codes = np.frombuffer(b"".join(c.code for c in changes), np.uint8).reshape(len(changes), -1)
        # one step: a query sees an overwritten (or re-coded) item under its old seq or its new one, never missing
        g.index.add_with_ids(codes, seqs, replacing=old[stale])
        g.seq_of_hash.add(hashes, seqs)
        if len(old):
            g.seq_of_hash.remove(hashes[which[stale]], old[stale])

    def _recode(self, g: Generation, changes) -> None:
        """Learned codes of items that arrived before: each replaces its item's code where it stands. The store logs
        one only for an item whose arrival a follower at this seq has read; one found missing all the same is
        added (at the end of the ties) rather than lost."""
        codes = np.frombuffer(b"".join(c.code for c in changes), np.uint8).reshape(len(changes), -1)
        found = g.index.update_codes(codes, np.array([c.arrived for c in changes], np.int64))
        if not found.all():
            lost = [c for c, f in zip(changes, found) if not f]
            log.warning("%d learned codes of items the index lacked, e.g. %s: added", len(lost), [c.id for c in lost[:3]])
            self._add(g, [Change(c.arrived, c.id, c.code, c.labels, c.ts) for c in lost])

    def _remove(self, g: Generation, ids: list[str]) -> None:
        """Drop removed items: the seqs their ids map to that the store no longer holds (an id sharing a 64-bit
        hash with a live item keeps that item's)."""
        hashes = id_hashes(ids)
        which, old = g.seq_of_hash.find(hashes)
        if not len(old):
            return
        gone = ~self.store.seqs_live(old)
        g.index.remove_ids(old[gone])
        g.seq_of_hash.remove(hashes[which[gone]], old[gone])

    def _publish(self, g: Generation) -> None:
        m.INDEX_ITEMS.labels(process="query").set(g.index.ntotal)
        m.INDEX_GENERATION.labels(process="query").set(g.generation)
        m.MODEL_VERSION.labels(process="query").set(g.model_version)

    @property
    def notifying(self) -> bool:
        """Whether the follower is woken by commit notifications (else it polls)."""
        return self._waiter is not None and self._waiter.notifying

    def start(self) -> "LiveIndex":
        # Watch before the first refresh: a commit between the two is then seen by one or the other.
        self._waiter = make_waiter(self.store.path, notify=self.notify)
        self._thread = threading.Thread(target=self._follow, args=(self._waiter,), name="live-index", daemon=True)
        self._thread.start()
        return self

    # After a notification, re-check at 2, 4, 8 ... ms (at least min_gap_s, capped at refresh_interval_s) for
    # this long. LMDB writes a commit's meta page (the write that notifies) *before* it publishes the new
    # txn id to readers in lock.mdb, so a refresh woken at once can miss the commit that woke it, and no
    # further event comes; the re-checks catch it within milliseconds instead of at the fallback poll.
    SETTLE_S = 0.25

    def _follow(self, waiter: Waiter) -> None:
        recheck, notified_at, last = 0.0, -1e9, -1e9
        try:
            while not self._stop.is_set():
                early = self.min_gap_s - (time.monotonic() - last)
                if early > 0 and self._stop.wait(early):  # woken again within min_gap_s: let commits gather
                    break
                last = time.monotonic()
                try:
                    self.refresh()
                except Exception:  # keep serving the last good state; the error is logged with its cause
                    log.exception("index refresh failed; retrying")
                    self._stop.wait(1.0)
                if not waiter.notifying:
                    timeout = self.refresh_interval_s
                elif time.monotonic() - notified_at < self.SETTLE_S:
                    recheck = min(recheck * 2, self.refresh_interval_s)
                    timeout = recheck
                else:
                    timeout = max(self.refresh_interval_s, self.fallback_interval_s)
                if waiter.wait(timeout) and waiter.notifying:  # a commit, the timeout, or stop()
                    recheck, notified_at = max(0.001, self.min_gap_s), time.monotonic()
        finally:
            waiter.close()

    def stop(self) -> None:
        self._stop.set()
        if self._waiter is not None:
            self._waiter.interrupt()
        if self._thread is not None:
            self._thread.join(timeout=5)
