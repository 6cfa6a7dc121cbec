"""In-memory multi-index hash tables over a :class:`~streamhash.index.hamming.BinaryIndex`'s rows.

The radius-search path of the query server, composed over the flat index exactly as FAISS's
``IndexBinaryMultiHash`` composes over its flat storage: the tables hold *row numbers* of the flat
index, candidates are verified against the flat index's own code words (no second copy of the
codes), dead rows are skipped with the flat index's tombstones, and results carry its ids.

Layout (one immutable :class:`_Tables` snapshot, swapped as a whole): for each of the ``m``
substrings (bounds and probe radii from :class:`~streamhash.index.multihash.Substrings`, the
refined pigeonhole bound), the live rows sorted by (substring value, row) as ``uint32`` plus a
bucket directory over the value's top ``b`` bits (CSR offsets, ``2**b + 1`` int64). With
``b == w`` (16-bit substrings at 1M items) a probe is two directory loads; with ``b < w`` (wide
substrings, or few items) the full values are kept beside the rows and binary-searched inside the
bucket. Memory: 4 bytes a row per table (+ 8 with values) + the directories: 16 B an item plus
2 MiB at 64 bits, m = 4.

Keeping in step with the flat index without touching its write path: rows are only ever appended
(an overwrite or removal tombstones the old row), so a snapshot built over rows ``[0, n)`` stays
exact for as long as the flat index's ``_layout`` (bumped by compaction, and by learned codes replaced in
place: :meth:`~streamhash.index.binary.BinaryIndex.update_codes`) is unchanged: rows
appended since are scanned by the flat kernel in the same native call (the *tail*), and the
snapshot is rebuilt in a background thread once the tail passes ``max(2048, n / 64)`` rows (at
1M rows: at most ~16k rows, ~1 µs of AVX-512 scan a query). A query that finds no valid snapshot
(the first one over a generation, or the first after a compaction) starts the build and returns
None: the caller answers it by a flat scan, so no query ever waits for a build unless it asks to
(``wait=True``: tests, benchmarks).

Reads of the flat index's storage (``_codes``, ``_dead``, ``_ids``, ``_n``, ``_layout``) happen
under its read lock, as its own searches do; the torch backend follows the same rows the same way.

>>> import numpy as np
>>> from streamhash.index.backends import make_index
>>> flat = make_index(16, "numpy")
>>> flat.add_with_ids(np.array([[0, 0], [0, 3], [255, 255], [0, 1]], np.uint8), np.array([10, 11, 12, 13]))
>>> mh = MemHash(flat, m=2)
>>> [x.tolist() for x in mh.range_search(np.array([[0, 0]], np.uint8), 3, wait=True)]
[[0, 3], [0, 1, 2], [10, 13, 11]]
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from streamhash.index.hamming import BinaryIndex
from streamhash.index.multihash import Substrings, flip_masks

try:
    from streamhash.index import _hamming as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None

log = logging.getLogger(__name__)

MAX_DIR_BITS = 24  # a directory of at most 2**24 + 1 offsets (128 MiB) per table
MAX_PROBES = 1 << 20  # probing more substring values than this is never cheaper than a scan


def substring_values(codes: np.ndarray, bounds: list[int]) -> np.ndarray:
    """(n, m) uint64: substring ``j`` of each packed code (bits ``[bounds[j], bounds[j+1])``, MSB first).

    >>> substring_values(np.array([[0xAB, 0xCD]], np.uint8), [0, 4, 12, 16]).tolist()
    [[10, 188, 13]]
    """
    codes = np.asarray(codes, np.uint8)
    n, cb = codes.shape
    padded = np.zeros((n, cb + 9), np.uint8)
    padded[:, :cb] = codes
    out = np.empty((n, len(bounds) - 1), np.uint64)
    for j, (a, b) in enumerate(pairwise(bounds)):
        s, o = a // 8, np.uint64(a % 8)
        hi = np.ascontiguousarray(padded[:, s : s + 8]).view(">u8")[:, 0].astype(np.uint64)  # 8 bytes from s
        win = hi << o
        if o:
            win |= padded[:, s + 8].astype(np.uint64) >> (np.uint64(8) - o)
        out[:, j] = win >> np.uint64(64 - (b - a))  # the 64 bits from the substring's first bit, top (b - a) kept
    return out


@dataclass(frozen=True)
class _Tables:
    """One immutable build over rows [0, n) of the flat index at ``layout``."""

    layout: int
    n: int
    first_id: int
    last_id: int
    tw: np.ndarray  # int32 (m,) substring widths
    tb: np.ndarray  # int32 (m,) directory bits
    dir: np.ndarray  # int64, every table's directory, absolute offsets into rows
    dir_off: np.ndarray  # int64 (m + 1,) where table j's directory starts in dir
    rows: np.ndarray  # uint32, per table the live rows sorted by (value, row)
    vals: np.ndarray | None  # uint64 parallel to rows, when some table has b < w
    seg: np.ndarray  # int64 (m + 1,) table j's entries are rows[seg[j]:seg[j + 1]]
    skew: float  # mean bucket entries a data-like query reads at radius 0, over the uniform n / 2**w
    build_s: float


class MemHash:
    """Multi-index hash tables (``m`` substrings) over ``flat``'s rows; see the module docstring."""

    def __init__(self, flat: BinaryIndex, m: int):
        self._flat = weakref.ref(flat)  # the registry below maps flat -> this: no strong ref back
        self.d, self.m = flat.d, m
        self.code_size, self.words = flat.code_size, flat.words
        self.layout = Substrings(flat.d, m)  # bounds, widths, probe radii, cost-model counts
        self._snap: _Tables | None = None
        self._plans: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
        self._build_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._building = False
        self.builds = 0  # completed builds, for tests and logs

    @property
    def flat(self) -> BinaryIndex:
        flat = self._flat()
        if flat is None:  # pragma: no cover - a RadiusIndex holds the flat index while it queries
            raise RuntimeError("the flat index is gone")
        return flat

    @property
    def skew(self) -> float:
        """Measured bucket skew of the last build (1.0 before any): the cost model's ``skew``."""
        return self._snap.skew if self._snap is not None else 1.0

    # ------------------------------------------------------------------ building
    def _valid(self, snap: _Tables, flat: BinaryIndex) -> bool:
        """Whether ``snap``'s rows are still ``flat``'s rows (caller holds flat's lock)."""
        if snap.layout != flat._layout or snap.n > flat._n:
            return False
        return snap.n == 0 or (int(flat._ids[0]) == snap.first_id and int(flat._ids[snap.n - 1]) == snap.last_id)

    def _tail_limit(self, snap: _Tables) -> int:
        return max(2048, snap.n // 64)

    def build(self) -> _Tables:
        """Build the tables over every row the flat index holds now (unless a fresh build is current)."""
        import time

        flat = self.flat
        with self._build_lock:
            snap = self._snap
            with flat._lock.read():
                if snap is not None and self._valid(snap, flat) and flat._n - snap.n <= self._tail_limit(snap) // 2:
                    return snap  # someone built while we waited
                t0 = time.perf_counter()
                layout, n = flat._layout, flat._n
                live = np.flatnonzero(flat._dead[:n] == 0) if flat._ndead else None
                words = flat._codes[:n] if live is None else flat._codes[live]
                codes = np.array(words).view(np.uint8)[:, : self.code_size]  # a copy: built outside the lock
                first_id = int(flat._ids[0]) if n else 0
                last_id = int(flat._ids[n - 1]) if n else 0
            snap = self._build(codes, live, layout, n, first_id, last_id, t0)
            self._snap = snap
            self.builds += 1
            log.debug("memhash: %d tables over %d rows in %.3fs", self.m, n, snap.build_s)
            return snap

    def _build(self, codes, live, layout, n, first_id, last_id, t0) -> _Tables:
        import time

        lay = self.layout
        count = len(codes)
        vals = substring_values(codes, lay.bounds)
        rowids = np.arange(count, dtype=np.uint32) if live is None else live.astype(np.uint32)
        tw = np.array(lay.widths, np.int32)
        tb = np.array([min(w, max(8, count.bit_length() + 1), MAX_DIR_BITS) for w in lay.widths], np.int32)
        need_vals = bool((tb < tw).any())
        dirs, rows, svals, skews = [], [], [], []
        for j, (w, b) in enumerate(zip(lay.widths, tb.tolist())):
            v = vals[:, j]
            if w <= 16:  # numpy's stable sort is a radix sort for 16-bit keys
                v = v.astype(np.uint16 if w > 8 else np.uint8)
            elif w <= 32:
                v = v.astype(np.uint32)
            order = np.argsort(v, kind="stable")
            sv = v[order]
            top = (sv.astype(np.uint64) >> np.uint64(w - b)).astype(np.int64)
            d = np.zeros((1 << b) + 1, np.int64)
            np.cumsum(np.bincount(top, minlength=1 << b), out=d[1:])
            dirs.append(d + j * count)
            rows.append(rowids[order])
            if need_vals:
                svals.append(sv.astype(np.uint64))
            if count > 1:
                # A data-like query's own bucket holds sum(c^2) / n entries, itself included; uniform codes
                # give 1 + (n - 1) / 2**w. The excess over that is the cost model's skew (at least 1).
                if b == w:
                    c = np.diff(d).astype(np.float64)
                else:
                    edges = np.flatnonzero(np.diff(sv.astype(np.uint64)) != 0)
                    c = np.diff(np.concatenate(([0], edges + 1, [count]))).astype(np.float64)
                skews.append(max(1.0, (float((c * c).sum()) / count - 1.0) / ((count - 1) / 2.0**w)))
        dir_off = np.zeros(self.m + 1, np.int64)
        np.cumsum([len(x) for x in dirs], out=dir_off[1:])
        return _Tables(
            layout=layout, n=n, first_id=first_id, last_id=last_id, tw=tw, tb=tb,
            dir=np.concatenate(dirs), dir_off=dir_off,
            rows=np.concatenate(rows) if rows else np.zeros(0, np.uint32),
            vals=np.concatenate(svals) if need_vals else None,
            seg=np.arange(self.m + 1, dtype=np.int64) * count,
            skew=float(np.mean(skews)) if skews else 1.0,
            build_s=time.perf_counter() - t0,
        )

    def _start_build(self) -> None:
        """Build in a background thread unless one is running."""
        with self._state_lock:
            if self._building:
                return
            self._building = True
        flat = self.flat  # held by the thread for the build's duration

        def run():
            try:
                if self._flat() is flat:
                    self.build()
            except Exception:  # the queries keep scanning; the next one tries again
                log.exception("memhash: background build failed")
            finally:
                self._building = False

        threading.Thread(target=run, name="memhash-build", daemon=True).start()

    def current(self, *, wait: bool = False) -> _Tables | None:
        """A snapshot valid for the flat index's rows now; None (a build started) when there is none and
        ``wait`` is false. A snapshot whose tail grew long is still returned, and a rebuild started."""
        flat = self.flat
        snap = self._snap
        with flat._lock.read():
            valid = snap is not None and self._valid(snap, flat)
            tail = flat._n - snap.n if valid else 0
        if valid:
            if tail > self._tail_limit(snap):
                if wait:
                    return self.build()
                self._start_build()
            return snap
        if wait:
            return self.build()
        self._start_build()
        return None

    # ------------------------------------------------------------------ queries
    def plan(self, radius: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """(flip masks of every table, concatenated; (m + 1,) offsets; probe radius per table) for ``radius``."""
        plan = self._plans.get(radius)
        if plan is None:
            pr = self.layout.probe_radii(radius)
            masks = [flip_masks(w, r) if r >= 0 else np.zeros(0, np.uint64) for w, r in zip(self.layout.widths, pr)]
            off = np.zeros(self.m + 1, np.int64)
            np.cumsum([len(x) for x in masks], out=off[1:])
            plan = (np.concatenate(masks).astype(np.uint64), off, pr)
            if len(self._plans) < 256:
                self._plans[radius] = plan
        return plan

    def n_probes(self, radius: int) -> int:
        return self.layout.n_probes(radius)

    def bucket_entries(self, queries: np.ndarray, radius: int) -> np.ndarray:
        """Per query, the bucket entries the tables path reads at ``radius`` (the cost model's candidates),
        over the current build; for diagnostics and benchmarks."""
        snap = self.current(wait=True)
        masks, moff, _ = self.plan(min(int(radius), self.d + 1)) if radius > 0 else (None, np.zeros(self.m + 1, np.int64), None)
        qsub = self._query_substrings(np.asarray(queries, np.uint8))
        out = np.zeros(len(queries), np.int64)
        for j in range(self.m):
            if moff[j + 1] == moff[j]:
                continue
            probes = qsub[:, j, None] ^ masks[moff[j] : moff[j + 1]][None, :]
            s0, s1 = snap.seg[j], snap.seg[j + 1]
            if snap.vals is None:
                d = snap.dir[snap.dir_off[j] : snap.dir_off[j + 1]]
                out += (d[probes + np.uint64(1)] - d[probes]).sum(1)
            else:
                v = snap.vals[s0:s1]
                out += (np.searchsorted(v, probes, "right") - np.searchsorted(v, probes, "left")).sum(1)
        return out

    def _query_substrings(self, queries: np.ndarray) -> np.ndarray:
        if len(queries) <= 4:  # plain ints beat a dozen numpy calls on one row
            split = self.layout.shifts
            out = []
            for q in queries:
                v = int.from_bytes(q.tobytes(), "big")
                out.append([(v >> shift) & mask for shift, mask in split])
            return np.array(out, np.uint64).reshape(len(queries), self.m)
        return substring_values(queries, self.layout.bounds)

    def range_search(self, queries: np.ndarray, radius: int, *, wait: bool = False):
        """(lims, D int32, I int64) of the codes at distance < ``radius``, sorted by (distance, row) per query,
        which is the flat index's order; None when no tables are built yet (see :meth:`current`).

        ``queries``: uint8 (nq, d/8), checked by the caller."""
        nq = len(queries)
        radius = min(int(radius), self.d + 1)
        if radius <= 0 or nq == 0:
            return np.zeros(nq + 1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64)
        masks, moff, _ = self.plan(radius)
        if int(moff[-1]) > MAX_PROBES:
            return None
        qsub = self._query_substrings(queries)
        flat = self.flat
        qw = flat._words(queries, "queries")
        for _ in range(2):
            snap, found, stale = self._snap, None, True
            with flat._lock.read():  # one acquisition: validity, tail length and the probe itself
                if snap is not None and self._valid(snap, flat):
                    n = flat._n
                    stale = n - snap.n > self._tail_limit(snap)
                    if not (stale and wait):
                        dead = flat._dead if flat._ndead else None
                        if _native is not None:
                            lims, D, R = _native.mih_range(
                                flat._codes, self.words, flat.word.itemsize, self.d, qw, nq, radius, dead, qsub, self.m,
                                snap.tw, snap.tb, snap.dir, snap.dir_off, snap.rows, snap.vals, masks, moff, snap.n, n)
                            D, R = np.frombuffer(D, np.int32), np.frombuffer(R, np.int64)
                            lims = np.frombuffer(lims, np.int64)
                        else:
                            lims, D, R = _probe_numpy(snap, flat._codes, dead, qw, qsub, radius, masks, moff, n)
                        found = lims, D, flat._ids[R]
            if stale:  # missing, compacted, or a long tail: build now or in the background
                if not wait:
                    self._start_build()
                    return found
                self.build()
                continue
            return found
        return found  # pragma: no cover - a compaction raced both builds


def _probe_numpy(snap: _Tables, codes, dead, qw, qsub, radius, masks, moff, n):
    """What ``_native.mih_range`` computes, in numpy (the package without its C kernel)."""
    nq, m = qsub.shape
    owners, rows = [], []
    for j in range(m):
        mk = masks[moff[j] : moff[j + 1]]
        if not len(mk):
            continue
        w, b = int(snap.tw[j]), int(snap.tb[j])
        probes = qsub[:, j, None] ^ mk[None, :]  # (nq, P)
        if b == w:
            d = snap.dir[snap.dir_off[j] : snap.dir_off[j + 1]]
            lo, hi = d[probes], d[probes + np.uint64(1)]
        else:
            s0, s1 = snap.seg[j], snap.seg[j + 1]
            lo = np.searchsorted(snap.vals[s0:s1], probes, "left") + s0
            hi = np.searchsorted(snap.vals[s0:s1], probes, "right") + s0
        cnt = (hi - lo).reshape(-1)
        total = int(cnt.sum())
        owners.append(np.repeat(np.repeat(np.arange(nq), probes.shape[1]), cnt))
        rows.append(snap.rows[np.arange(total) - np.repeat(np.cumsum(cnt) - cnt - lo.reshape(-1), cnt)].astype(np.int64))
    if n > snap.n:  # the tail: rows appended since the build
        tail = np.arange(snap.n, n, dtype=np.int64)
        owners.append(np.repeat(np.arange(nq), len(tail)))
        rows.append(np.tile(tail, nq))
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    key = np.unique((owner.astype(np.int64) << 32) | row)  # a row found through several tables: once
    owner, row = key >> 32, key & 0xFFFFFFFF
    dist = np.bitwise_count(codes[row] ^ qw[owner]).sum(1, dtype=np.int32)
    ok = dist < radius
    if dead is not None:
        ok &= dead[row] == 0
    owner, dist, row = owner[ok], dist[ok], row[ok]
    order = np.lexsort((row, dist, owner))
    lims = np.zeros(nq + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=nq), out=lims[1:])
    return lims, dist[order], row[order]


# ---------------------------------------------------------------------- one MemHash per flat index
_REGISTRY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # flat index -> {m: MemHash}
_REGISTRY_LOCK = threading.Lock()


def memhash_for(flat: BinaryIndex, m: int) -> MemHash:
    """The tables over ``flat`` with ``m`` substrings, made on first use and kept as long as ``flat`` lives
    (a generation's index: a re-encode's new index gets its own, the old one goes with it)."""
    with _REGISTRY_LOCK:
        per = _REGISTRY.get(flat)
        if per is None:
            per = _REGISTRY[flat] = {}
        mh = per.get(m)
        if mh is None:
            mh = per[m] = MemHash(flat, m)
        return mh
