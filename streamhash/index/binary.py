"""The storage and the shared search logic of every Hamming backend: :class:`BinaryIndex`.

A backend (:mod:`.hamming`'s ``numpy`` and ``native``, :mod:`.torch_backend`'s ``torch``) is a
subclass implementing ``_topk`` and ``_range_rows`` over the storage kept here; users build one
with :func:`streamhash.index.hamming.make_index`.

Semantics shared by every backend:

* Results are ordered by distance, then by insertion order: the order of the *latest* add of an
  id. Re-adding an existing id overwrites its code and counts as a new insertion;
  :meth:`BinaryIndex.update_codes` replaces codes where they stand (the query server's index is keyed by
  each item's arrival seq, and a learned code keeps its item's place).
* ``search`` pads missing results (k larger than the index) with ``D = PAD_DISTANCE``
  (``2**31 - 1``) and ``I = -1``, exactly as FAISS ``IndexBinaryFlat`` does.
* ``range_search`` returns codes at distance strictly below ``radius`` (FAISS convention).
* Thread safety: searches take a shared lock and writes an exclusive one, so the query server
  may search from request threads while a follower thread adds or removes.

Storage: rows in insertion order (zero-padded to whole 64-bit words, or one 32-bit word for codes
of at most 32 bits where the backend scans those: :attr:`BinaryIndex.narrow`) in arrays that double
when full, so adds are amortised O(batch). Removal and overwrite mark the old row dead (a
tombstone the kernels skip); dead rows are compacted away, preserving order, once they are a
quarter of the rows, which keeps the extra scan work under 25 % and the compaction cost amortised
O(1) per removal. No per-id Python object is kept: while ids strictly increase with the row (the
store's seqs, the query server's case) the id column itself is the id -> row map (binary search,
or a dense int32 id -> row array), so an item costs the padded code + 8 (id) + 1 (tombstone)
+ ~4 (dense map) bytes. Ids that arrive out of order switch the index to an id -> row
:class:`~streamhash.hashmap.Int64Multimap` (16 more bytes an id).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from streamhash.hashmap import Int64Multimap
from streamhash.rwlock import RWLock

PAD_DISTANCE = np.iinfo(np.int32).max


class BinaryIndex(ABC):
    """An exact Hamming index over ``d``-bit codes with int64 ids (see the module docstring)."""

    backend = "abstract"
    _MIN_CAPACITY = 1024
    # Codes of at most 32 bits in one 32-bit word a row, not a 64-bit one half padding: half the bytes a
    # scan reads and half the popcounts (the default 32-bit codes ranked 1.9x faster, RESULTS "Serving").
    narrow = True

    @classmethod
    def available(cls) -> bool:
        """Whether this machine can run the backend (``auto`` takes the first available of :data:`.backends.AUTO`)."""
        return True

    def __init__(self, d: int, threads: int = 1):
        if d < 8 or d % 8:
            raise ValueError(f"d must be a positive multiple of 8 bits, got {d}")
        self.d = d
        self.code_size = d // 8
        self.word = np.dtype(np.uint32 if self.narrow and d <= 32 else np.uint64)  # one storage word
        self.words = -(-self.code_size // self.word.itemsize)  # words a row
        self.threads = max(1, int(threads))
        self._lock = RWLock()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._reset_storage()

    # ------------------------------------------------------------------ storage
    def _reset_storage(self) -> None:
        self._n = 0  # rows in use, live and dead
        self._ndead = 0
        self._live = 0  # _n - _ndead as of the last finished write (_settle): what ntotal reads, without the lock
        self._codes = np.zeros((self._MIN_CAPACITY, self.words), self.word)
        self._ids = np.zeros(self._MIN_CAPACITY, np.int64)
        self._dead = np.zeros(self._MIN_CAPACITY, np.uint8)
        self._layout = 0  # bumped when rows move (compaction) or codes change in place; lets mirrors notice
        self._dead_version = 0  # bumped when rows die
        self._ids_sorted = True  # ids strictly increase with row (true for the store's seqs): the rows are the map
        self._rows_by_id: Int64Multimap | None = None  # id -> row once an id came out of order
        # id - _map_base -> row (-1: absent), kept while ids are sorted and dense (the store's seqs):
        # an O(1) gather for reconstruct_batch, where a binary search over 1M ids cost ~10 us a query.
        # int32 rows: half the bytes, and 2**31 rows would be 16 GiB of codes in one index.
        self._row_map: np.ndarray | None = None
        self._map_base = 0

    @property
    def ntotal(self) -> int:
        # One attribute, written whole by a writer holding the lock: every response reads it once per shard,
        # and taking the lock for it cost ~3% of a search's CPU.
        return self._live

    def _grow(self, need: int) -> None:
        cap = len(self._ids)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("_codes", "_ids", "_dead"):
            old = getattr(self, name)
            new = np.zeros((cap,) + old.shape[1:], old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _rows_for(self, ids: np.ndarray) -> np.ndarray:
        """The live row of each id, -1 where absent (caller holds a lock)."""
        out = np.full(len(ids), -1, np.int64)
        if not self._ids_sorted:
            which, rows = self._rows_by_id.find(ids)
            out[which] = rows
            return out
        row_map = self._ensure_row_map()
        if row_map is not None:  # dense sorted ids: a direct gather
            rel = ids - self._map_base
            ok = (rel >= 0) & (rel < len(row_map))
            out[ok] = row_map[rel[ok]]
        elif self._n:  # sorted ids: binary search on the id column
            rows = np.minimum(np.searchsorted(self._ids[: self._n], ids), self._n - 1)
            found = (self._ids[rows] == ids) & (self._dead[rows] == 0)
            out[found] = rows[found]
        return out

    def _kill(self, rows: np.ndarray) -> None:
        if len(rows):
            self._dead[rows] = 1
            if self._row_map is not None:
                self._row_map[self._ids[rows] - self._map_base] = -1
            if self._rows_by_id is not None:
                self._rows_by_id.remove(self._ids[rows], rows)
            self._ndead += len(rows)
            self._dead_version += 1

    def _unsort(self) -> None:
        """An id came out of order: from now on an explicit id -> row map answers lookups."""
        live = np.flatnonzero(self._dead[: self._n] == 0)
        self._rows_by_id = Int64Multimap()
        self._rows_by_id.add(self._ids[live], live)
        self._ids_sorted, self._row_map = False, None

    def _settle(self) -> None:
        """The end of every write (the lock held): compact when worth it, then publish the live count, so that
        ntotal never sees a write half done (rows killed, their replacements not yet added)."""
        self._maybe_compact()
        self._live = self._n - self._ndead

    def _maybe_compact(self) -> None:
        if self._ndead and (self._ndead == self._n or (self._ndead > 64 and 4 * self._ndead > self._n)):
            keep = self._dead[: self._n] == 0
            m = int(keep.sum())
            if self._rows_by_id is not None:
                self._rows_by_id.remap_values(np.cumsum(keep) - 1)
            for name in ("_codes", "_ids"):
                arr = getattr(self, name)
                arr[:m] = arr[: self._n][keep]
            self._dead[: self._n] = 0
            self._n, self._ndead = m, 0
            self._layout += 1
            self._row_map = None  # rows moved; rebuilt on the next lookup

    def _words(self, codes: np.ndarray, what: str) -> np.ndarray:
        """(n, d/8) uint8 -> (n, words) storage words, zero-padded so padding bits never add distance."""
        codes = np.asarray(codes)
        if codes.dtype != np.uint8 or codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise ValueError(f"{what} must be uint8 of shape (n, {self.code_size}), got {codes.dtype} {codes.shape}")
        row = self.words * self.word.itemsize
        if self.code_size == row:
            return np.ascontiguousarray(codes).view(self.word)
        out = np.zeros((len(codes), row), np.uint8)
        out[:, : self.code_size] = codes
        return out.view(self.word)

    def _words_and_ids(self, codes: np.ndarray, ids) -> tuple[np.ndarray, np.ndarray]:
        """A write's codes as storage words and its ids as int64, one of each."""
        words = self._words(codes, "codes")
        ids = np.asarray(ids, np.int64).reshape(-1)
        if len(ids) != len(words):
            raise ValueError(f"{len(words)} codes but {len(ids)} ids")
        return words, ids

    # ------------------------------------------------------------------ writes
    def add_with_ids(self, codes: np.ndarray, ids: np.ndarray, *, replacing=None) -> None:
        """Append codes under ids; an id already present (or repeated in the batch) keeps its last code.

        ``replacing``: ids removed in the same step, so a search sees the old entries or the new ones, never
        neither (an item re-coded under a new id, as the store's seqs do, must not vanish for a moment).
        """
        words, ids = self._words_and_ids(codes, ids)
        increasing = bool((np.diff(ids) > 0).all())  # the store's seqs: no duplicates, nothing to sort
        if not increasing:
            order = np.argsort(ids, kind="stable")  # (np.unique is ~15x slower in numpy 2.4)
            srt = ids[order]
            if (srt[1:] == srt[:-1]).any():  # keep the last occurrence of each id, in batch order
                keep = np.sort(order[np.append(srt[1:] != srt[:-1], True)])
                words, ids = words[keep], ids[keep]
        n = len(ids)
        gone = np.unique(np.asarray(replacing, np.int64).reshape(-1)) if replacing is not None else ids[:0]
        if n == 0 and len(gone) == 0:
            return
        with self._lock.write():
            if len(gone):
                rows = self._rows_for(gone)
                self._kill(rows[rows >= 0])
            if n == 0:
                self._settle()
                return
            # ids above every stored one (the store's seqs) are new: no lookup, the id column stays sorted
            appending = self._ids_sorted and increasing and (self._n == 0 or ids[0] > self._ids[self._n - 1])
            if not appending:
                old = self._rows_for(ids)
                self._kill(old[old >= 0])
                if self._ids_sorted:
                    self._unsort()
            self._grow(self._n + n)
            rows = slice(self._n, self._n + n)
            self._codes[rows] = words
            self._ids[rows] = ids
            self._dead[rows] = 0
            if self._rows_by_id is not None:
                self._rows_by_id.add(ids, np.arange(self._n, self._n + n))
            else:
                self._extend_row_map(ids, self._n)
            self._n += n
            self._settle()

    def update_codes(self, codes: np.ndarray, ids) -> np.ndarray:
        """Replace the codes of ids already present, each in its row (its place in ties); returns which were found.

        The memory-hash tables and a device mirror over these rows rebuild on their next use (as after a compaction).
        """
        words, ids = self._words_and_ids(codes, ids)
        with self._lock.write():
            rows = self._rows_for(ids)
            found = rows >= 0
            if found.any():
                self._codes[rows[found]] = words[found]
                self._layout += 1
        return found

    def remove_ids(self, ids) -> int:
        """Remove ids (unknown ones are ignored); return how many were removed."""
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        with self._lock.write():
            rows = self._rows_for(ids)
            rows = rows[rows >= 0]
            self._kill(rows)
            self._settle()
        return len(rows)

    def _extend_row_map(self, ids: np.ndarray, first_row: int) -> None:
        """Record rows of freshly appended ids, growing the map by doubling; drop it if ids stop being dense."""
        m = self._row_map
        if m is None:
            return
        span = int(ids[-1]) - self._map_base + 1
        if span > 4 * (self._n + len(ids)) + 1024:
            self._row_map = None
            return
        if span > len(m):
            grown = np.full(max(span, 2 * len(m)), -1, np.int32)
            grown[: len(m)] = m
            self._row_map = m = grown
        m[ids - self._map_base] = np.arange(first_row, first_row + len(ids))

    def _ensure_row_map(self) -> np.ndarray | None:
        """The id -> row map, built from the rows when missing (caller holds a lock)."""
        if self._row_map is None and self._ids_sorted and self._n:
            ids = self._ids[: self._n]
            base, span = int(ids[0]), int(ids[-1] - ids[0]) + 1
            if span <= 4 * self._n + 1024:
                m = np.full(max(span, 1024), -1, np.int32)
                live = np.flatnonzero(self._dead[: self._n] == 0)
                m[ids[live] - base] = live
                self._map_base, self._row_map = base, m
        return self._row_map

    def reset(self) -> None:
        with self._lock.write():
            self._reset_storage()

    # ------------------------------------------------------------------ reads
    def reconstruct(self, id_: int) -> np.ndarray:
        """The code stored under ``id_`` (uint8, d/8 bytes); KeyError if absent."""
        with self._lock.read():
            row = int(self._rows_for(np.array([id_], np.int64))[0])
            if row < 0:
                raise KeyError(id_)
            return self._codes[row : row + 1].view(np.uint8)[0, : self.code_size].copy()

    def reconstruct_batch(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """Codes (len(ids), d/8) uint8 of many ids and a found mask (rows of absent ids are zero)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        out = np.zeros((len(ids), self.code_size), np.uint8)
        with self._lock.read():
            rows = self._rows_for(ids)
            found = rows >= 0
            out[found] = self._codes[rows[found]].view(np.uint8)[:, : self.code_size]
        return out, found

    def __contains__(self, id_: int) -> bool:
        with self._lock.read():
            return bool(self._rows_for(np.array([id_], np.int64))[0] >= 0)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k nearest codes per query: D int32 (nq, k), I int64 (nq, k); padded with PAD_DISTANCE / -1."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._words(queries, "queries")
        with self._lock.read():
            return self._search_ids(q, int(k))

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes at distance < radius: (lims int64 (nq+1,), D int32, I int64), query i in [lims[i], lims[i+1])."""
        q = self._words(queries, "queries")
        radius = min(int(radius), self.d + 1)  # every distance is <= d
        if radius <= 0:
            return np.zeros(len(q) + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        with self._lock.read():
            lims, D, R = self._range_rows(q, radius)
            I = self._ids[R]
        return lims, D, I

    def _dead_arg(self):
        return self._dead if self._ndead else None

    def _search_ids(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k as (distance, id); a backend that can write ids itself overrides it."""
        D, R = self._search_rows(q, k)
        return D, np.where(R >= 0, self._ids[np.maximum(R, 0)], -1)

    def _one_call(self, nq: int) -> bool:
        """Whether a search of nq queries runs as one ``_topk`` call (no thread pool, or too small to split)."""
        return self._pool is None or self._n * nq < (1 << 16)

    def _search_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k as (distance, row) over all rows, split across threads when asked to."""
        n, nq = self._n, len(q)
        if self._one_call(nq):
            return self._topk(q, k, 0, n)
        if nq >= self.threads:  # split the queries
            parts = np.array_split(np.arange(nq), self.threads)
            res = list(self._pool.map(lambda p: self._topk(q[p], k, 0, n), parts))
            return np.concatenate([r[0] for r in res]), np.concatenate([r[1] for r in res])
        # Few queries: split the rows. Parts are in row order, so a stable sort by distance of
        # their concatenation keeps the insertion-order tie-break (padding sorts last).
        bounds = np.linspace(0, n, self.threads + 1).astype(np.int64)
        res = list(self._pool.map(lambda i: self._topk(q, k, int(bounds[i]), int(bounds[i + 1])), range(self.threads)))
        D, R = np.concatenate([r[0] for r in res], axis=1), np.concatenate([r[1] for r in res], axis=1)
        order = np.argsort(D, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(D, order, 1), np.take_along_axis(R, order, 1)

    @abstractmethod
    def _topk(self, q: np.ndarray, k: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (D int32, rows int64), padded, over live rows in [r0, r1) for uint64 queries q."""

    @abstractmethod
    def _range_rows(self, q: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lims, D, rows) of live rows at distance < radius, sorted by (distance, row) per query."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, ntotal={self.ntotal}, threads={self.threads})"


def padded(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``_topk``'s output before it is filled: every distance PAD_DISTANCE, every row -1."""
    return np.full((nq, k), PAD_DISTANCE, np.int32), np.full((nq, k), -1, np.int64)
