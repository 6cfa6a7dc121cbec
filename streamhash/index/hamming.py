"""Exact Hamming ranking over packed binary codes, shaped like FAISS's binary indexes: the CPU backends.

:class:`~.binary.BinaryIndex` holds ``d``-bit codes (``d`` a multiple of 8, packed as by
:func:`streamhash.codes.pack_signs`) under int64 ids and answers exact k-nearest and range
queries; its storage, the semantics every backend shares (order, padding, the range convention,
thread safety) and the search logic around ``_topk`` live in :mod:`.binary`. A backend is a
subclass implementing ``_topk`` and ``_range_rows``: ``numpy`` (always available) and ``native``
(the C kernel in ``_hamming*.c``, its design in ``_hamming.h``, built by ``setup.py`` when a
compiler is present) here, ``torch`` (CUDA) in :mod:`.torch_backend`. :func:`make_index` builds
one by name from the registry in :mod:`.backends`.

>>> import numpy as np
>>> index = make_index(16, backend="numpy")
>>> index.add_with_ids(np.array([[0, 0], [0, 3], [255, 255], [0, 1]], np.uint8), np.array([10, 11, 12, 13]))
>>> D, I = index.search(np.array([[0, 0]], np.uint8), k=3)
>>> D.tolist(), I.tolist()
([[0, 1, 2]], [[10, 13, 11]])
>>> lims, D, I = index.range_search(np.array([[0, 0]], np.uint8), radius=2)
>>> lims.tolist(), D.tolist(), I.tolist()
([0, 2], [0, 1], [10, 13])
>>> index.remove_ids(np.array([13, 99]))
1
>>> index.search(np.array([[0, 0]], np.uint8), k=5)[1].tolist()
[[10, 11, 12, -1, -1]]
"""

from __future__ import annotations

import numpy as np

from streamhash.index.backends import make_index  # noqa: F401 (re-exported: the index's users ask for it here)
# re-exported: the backends' users and the other backends import them from here
from streamhash.index.binary import PAD_DISTANCE, BinaryIndex, padded  # noqa: F401

try:  # the optional compiled kernel; absent when the build had no compiler
    from streamhash.index import _hamming as _native
except ImportError:  # pragma: no cover - depends on the build
    _native = None


def native_available() -> bool:
    return _native is not None


KERNELS = ("generic", "popcnt", "avx512")  # the native scan loops, narrowest first


def limit_kernel(name: str) -> str:
    """Let the native scans go no wider than ``name`` (one of :data:`KERNELS`) in this process; returns the
    previous limit. Within it the CPU still decides: ``avx512`` runs ``popcnt`` on a CPU without AVX-512.

    This is how the narrower scans are tested and compared on a machine that would pick a wider one
    (numpy's ``NPY_DISABLE_CPU_FEATURES`` does the same); :attr:`NativeIndex.kernel` says what runs.
    """
    if _native is None:
        raise RuntimeError("the native Hamming kernel was not built (no C compiler at install time?)")
    if name not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {name!r}")
    return KERNELS[_native.limit_kernel(KERNELS.index(name))]


class NumpyIndex(BinaryIndex):
    """Pure numpy: chunked XOR + ``np.bitwise_count``, then a counting select by distance."""

    backend = "numpy"
    _CHUNK = 1 << 15  # rows per XOR chunk: the temporaries stay in cache

    def _distances(self, qw: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
        """Distances of rows [r0, r1) from one query into ``out`` (uint8 or uint16)."""
        chunk = min(self._CHUNK, r1 - r0)
        # XOR against a tiled query on flat arrays: broadcasting over a short last axis is ~8x slower.
        qt = np.tile(qw, chunk) if self.words > 1 else None
        tmp = np.empty(chunk * self.words, self.word)
        cnt = np.empty((chunk, self.words), np.uint8)
        for a in range(r0, r1, self._CHUNK):
            b = min(a + self._CHUNK, r1)
            m = (b - a) * self.words
            t, c, o = tmp[:m], cnt[: b - a], out[a - r0 : b - r0]
            np.bitwise_xor(self._codes[a:b].reshape(-1), qt[:m] if self.words > 1 else qw[0], out=t)
            if self.words == 1:
                np.bitwise_count(t, out=o)
                continue
            np.bitwise_count(t.reshape(b - a, self.words), out=c)
            o[:] = c[:, 0]
            for w in range(1, self.words):  # column adds: np.sum over a short axis is ~20x slower
                np.add(o, c[:, w], out=o)

    def _dist_buffer(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray | None]:
        # One bucket above d marks dead rows; uint8 holds it while d < 255.
        dist = np.empty(r1 - r0, np.uint8 if self.d < 255 else np.uint16)
        dead = np.flatnonzero(self._dead[r0:r1]) if self._ndead else None
        return dist, dead

    def _topk(self, q, k, r0, r1):
        D, R = padded(len(q), k)
        dist, dead = self._dist_buffer(r0, r1)
        live = (r1 - r0) - (len(dead) if dead is not None else 0)
        kk = min(k, live)
        if kk == 0:
            return D, R
        stride = 16 if len(dist) >= 64 * (kk + 64) else 1
        for j in range(len(q)):
            self._distances(q[j], r0, r1, dist)
            if dead is not None:
                dist[dead] = self.d + 1
            # Threshold from a sample's histogram with a 2x margin; the exact select then runs on
            # the candidates (distance <= t), falling back to the full histogram if they are too few.
            cum = np.cumsum(np.bincount(dist[::stride], minlength=self.d + 2)[: self.d + 1]) * stride
            t = min(int(np.searchsorted(cum, 2 * kk + 32)), self.d)
            cand = np.flatnonzero(dist <= t)
            if len(cand) < kk:
                cand = np.flatnonzero(dist <= self.d)
            dc = dist[cand]
            hist = np.bincount(dc, minlength=self.d + 1)
            t = int(np.searchsorted(np.cumsum(hist), kk))  # the k-th smallest distance
            take = dc < t
            ties = np.flatnonzero(dc == t)[: kk - int(take.sum())]  # earliest rows win ties
            take[ties] = True
            sel, ds = cand[take], dc[take]
            order = np.argsort(ds, kind="stable")
            D[j, :kk] = ds[order]
            R[j, :kk] = sel[order] + r0
        return D, R

    def _range_rows(self, q, radius):
        dist, dead = self._dist_buffer(0, self._n)
        rows, dists, lims = [], [], [0]
        for j in range(len(q)):
            self._distances(q[j], 0, self._n, dist)
            if dead is not None:
                dist[dead] = self.d + 1
            r = np.flatnonzero(dist < radius)
            dr = dist[r]
            order = np.argsort(dr, kind="stable")
            rows.append(r[order])
            dists.append(dr[order].astype(np.int32))
            lims.append(lims[-1] + len(r))
        return np.array(lims, np.int64), np.concatenate(dists), np.concatenate(rows).astype(np.int64)


class NativeIndex(BinaryIndex):
    """The C kernel: vectorised popcount scan with a streaming counting select (see ``_hamming.h``)."""

    backend = "native"
    block_bytes = 1 << 17  # database block in batch search: every query of the batch scans it while it is in cache

    @classmethod
    def available(cls) -> bool:
        return _native is not None

    def __init__(self, d: int, threads: int = 1):
        if _native is None:
            raise RuntimeError("the native Hamming kernel was not built (no C compiler at install time?)")
        super().__init__(d, threads)
        self._block = max(1024, self.block_bytes // (self.words * self.word.itemsize))  # in rows
        self._wb = self.word.itemsize

    @property
    def kernel(self) -> str:
        """The scan loop this CPU runs (``avx512-vpopcntdq``, ``popcnt`` or ``generic``; ``-32`` for 32-bit words)."""
        return _native.kernel_name(self.words, self.word.itemsize)

    def _search_ids(self, q, k):
        if self._one_call(len(q)):  # the kernel writes the ids (and the padding) itself
            return self._topk(q, k, 0, self._n, self._ids)
        return super()._search_ids(q, k)

    def _topk(self, q, k, r0, r1, ids=None):
        """With ``ids`` (the id of every row), ids in place of rows."""
        D, R = np.empty((len(q), k), np.int32), np.empty((len(q), k), np.int64)  # the kernel pads
        q = np.require(q, self.word, ["C", "A"])  # the kernel reads whole aligned words
        _native.search(self._codes, r0, r1, self.words, self._wb, self.d, q, len(q), k, self._dead_arg(), D, R,
                       self._block, ids)
        return D, R

    def _range_rows(self, q, radius):
        q = np.require(q, self.word, ["C", "A"])
        lims, D, R = _native.range_search(self._codes, self._n, self.words, self._wb, self.d, q, len(q), radius,
                                          self._dead_arg(), self._block)
        return np.frombuffer(lims, np.int64), np.frombuffer(D, np.int32), np.frombuffer(R, np.int64)

