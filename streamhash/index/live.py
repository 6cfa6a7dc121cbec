"""The query side's in-memory index, kept in step with the LMDB store.

A follower thread reads the store's ``changes`` from the last seq it applied (O(new items), never
a scan) and applies them to a :class:`~streamhash.index.hamming.BinaryIndex` keyed by seq.
A generation change (a re-encode) builds the new generation's index from a snapshot *beside* the
live one and swaps a single reference, so every query runs against exactly one generation and
reports it. Memory per item, measured at 1M items of 32 bits: ~150 bytes in the Hamming index
(the code padded to a 64-bit word, id, insertion stamp, tombstone, and the id -> stamp dict that
dominates) plus ~240 bytes for the seq -> id, seq -> labels and id -> seq maps, plus the id strings
themselves: about 450 MB per million items. The dicts, not the codes, are the cost; numpy-backed
maps would cut it to ~50 bytes per item.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from streamhash import metrics as m
from streamhash.index.hamming import BinaryIndex, make_index
from streamhash.index.store import Store

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Everything a query needs, from one generation of the store; swapped as a whole."""

    generation: int
    model_version: int
    index: BinaryIndex
    ids: dict[int, str] = field(default_factory=dict)  # seq -> item id
    labels: dict[int, tuple[int, ...] | None] = field(default_factory=dict)  # seq -> labels
    seq_of: dict[str, int] = field(default_factory=dict)  # item id -> seq
    last_seq: int = 0


class LiveIndex:
    def __init__(self, store: Store, *, backend: str = "auto", threads: int = 1, refresh_interval_s: float = 0.05):
        self.store = store
        self.backend, self.threads = backend, threads
        self.refresh_interval_s = refresh_interval_s
        self.current: Generation = self._build()
        self._publish(self.current)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _new_index(self) -> BinaryIndex:
        return make_index(self.store.bits, backend=self.backend, threads=self.threads)

    def _build(self) -> Generation:
        """A full generation from one snapshot; later changes are applied by :meth:`refresh`."""
        snap = self.store.snapshot()
        g = Generation(snap.generation, snap.model_version, self._new_index())
        if len(snap.seqs):
            g.index.add_with_ids(snap.codes, snap.seqs)
            seqs = snap.seqs.tolist()
            g.ids = dict(zip(seqs, snap.ids))
            g.labels = dict(zip(seqs, snap.labels))
            g.seq_of = dict(zip(snap.ids, seqs))
            g.last_seq = seqs[-1]
        return g

    def refresh(self) -> int:
        """Apply new store changes; rebuild on a generation change. Returns the number applied."""
        g = self.current
        gen, model_version, changes = self.store.changes_since(g.last_seq)
        if gen != g.generation:
            t0 = time.perf_counter()
            new = self._build()
            self.current = new  # one reference swap: queries see the old or the new generation, never both
            log.info("swapped to generation %d (model %d, %d items) in %.2fs",
                     new.generation, new.model_version, new.index.ntotal, time.perf_counter() - t0)
            self._publish(new)
            return new.index.ntotal
        if model_version != g.model_version:
            # A DIHN round: same codes, a newer compatible query encoder. One attribute write.
            g.model_version = model_version
            self._publish(g)
        if not changes:
            return 0
        with m.INDEX_REFRESH_SECONDS.time():
            stale = [g.seq_of[c.id] for c in changes if c.id in g.seq_of]
            if stale:
                g.index.remove_ids(np.array(stale, np.int64))
                for s in stale:
                    g.ids.pop(s, None)
                    g.labels.pop(s, None)
            seqs = np.array([c.seq for c in changes], np.int64)
            codes = np.frombuffer(b"".join(c.code for c in changes), np.uint8).reshape(len(changes), -1)
            g.index.add_with_ids(codes, seqs)
            for c in changes:
                g.ids[c.seq], g.labels[c.seq], g.seq_of[c.id] = c.id, c.labels, c.seq
            g.last_seq = int(seqs[-1])
        now = time.time()
        for c in changes:
            if c.ts is not None:  # learned-code updates are not new messages
                m.FRESHNESS_SECONDS.observe(max(0.0, now - c.ts))
        self._publish(g)
        return len(changes)

    def _publish(self, g: Generation) -> None:
        m.INDEX_ITEMS.labels(process="query").set(g.index.ntotal)
        m.INDEX_GENERATION.labels(process="query").set(g.generation)
        m.MODEL_VERSION.labels(process="query").set(g.model_version)

    def start(self) -> "LiveIndex":
        self._thread = threading.Thread(target=self._follow, name="live-index", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.refresh_interval_s):
            try:
                self.refresh()
            except Exception:  # keep serving the last good state; the error is logged with its cause
                log.exception("index refresh failed; retrying")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
