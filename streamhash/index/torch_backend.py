"""The torch backend of :class:`streamhash.index.hamming.BinaryIndex`: batch Hamming search on CUDA.

The numpy arrays of :class:`BinaryIndex` stay the source of truth (ids, insertion order,
tombstones, compaction); the device holds a mirror of the code words that is brought up to date
lazily before each search: appended rows are uploaded incrementally (capacity doubles on the
device too), the dead-row mask when it changed, everything after a compaction.

Distances are XOR + popcount on int64 words (``torch.bitwise_count`` when this torch has it,
else a SWAR popcount from shifts and masks); the top-k runs on the key
``distance * n + row``, which is unique per row, so ``torch.topk`` gives the distance-then-
insertion-order tie-break without relying on a stable sort.

``device="cpu"`` works too (it is how the tests exercise this code on machines without a GPU),
but :func:`~streamhash.index.backends.make_index` only hands this backend out for CUDA.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from streamhash.index.hamming import BinaryIndex, padded

_M1, _M2, _M4, _H01 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Per-element popcount of an int64 tensor.

    >>> popcount64(torch.tensor([0, 1, 255, -1])).tolist()
    [0, 1, 8, 64]
    """
    if hasattr(torch, "bitwise_count"):
        return torch.bitwise_count(x).to(torch.int64)
    # >> is arithmetic on int64, but every mask below has its top bit clear, which drops the
    # copied sign bits; the final multiply may wrap, and its top byte (<= 64) is what we keep.
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    return (x * _H01) >> 56


class TorchIndex(BinaryIndex):
    """Exact top-k / range search with torch; ``threads`` is accepted for API symmetry and ignored."""

    backend = "torch"
    narrow = False  # the device mirror is int64 words (torch has no unsigned 32-bit bitwise_count)
    max_elements = 1 << 25  # (queries x rows x words) per chunk: bounds device temporaries

    @classmethod
    def available(cls) -> bool:
        return torch.cuda.is_available()

    def __init__(self, d: int, threads: int = 1, device: str | torch.device = "cuda"):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("the torch Hamming backend needs CUDA, and torch.cuda.is_available() is False")
        self._sync_lock = threading.Lock()
        super().__init__(d, threads=1)

    def _reset_storage(self) -> None:
        super()._reset_storage()
        self._dev_codes = torch.zeros((0, self.words), dtype=torch.int64, device=self.device)
        self._dev_dead = torch.zeros(0, dtype=torch.bool, device=self.device)
        self._dev_rows = 0  # rows of the host arrays mirrored on the device
        self._dev_seen = (-1, -1, -1)  # (layout, dead version, rows) the device mirror reflects

    def _sync(self) -> None:
        """Bring the device mirror up to date (called under the index's read lock)."""
        with self._sync_lock:
            n = self._n
            if self._dev_seen[0] != self._layout:
                self._dev_rows = 0  # compaction moved rows: upload them all again
            if len(self._dev_codes) < n:
                cap = max(n, 2 * len(self._dev_codes), 1024)
                grown = torch.zeros((cap, self.words), dtype=torch.int64, device=self.device)
                grown[: self._dev_rows] = self._dev_codes[: self._dev_rows]
                self._dev_codes = grown
            if self._dev_rows < n:
                fresh = self._codes[self._dev_rows : n].view(np.int64)
                self._dev_codes[self._dev_rows : n] = torch.from_numpy(fresh).to(self.device)
                self._dev_rows = n
            seen = (self._layout, self._dead_version, n)
            if self._dev_seen != seen:
                if self._ndead:
                    self._dev_dead = torch.from_numpy(self._dead[:n].astype(bool)).to(self.device)
                self._dev_seen = seen

    def _distances(self, q: np.ndarray, r0: int, r1: int):
        """Yield (query slice, distances int64 (g, r1-r0)) with dead rows at d + 1."""
        codes = self._dev_codes[r0:r1]
        dead = self._dev_dead[r0:r1] if self._ndead else None
        qd = torch.from_numpy(np.ascontiguousarray(q).view(np.int64)).to(self.device)
        g = max(1, self.max_elements // max(1, (r1 - r0) * self.words))
        for a in range(0, len(q), g):
            dist = popcount64(qd[a : a + g, None, :] ^ codes[None]).sum(-1)
            if dead is not None:
                dist.masked_fill_(dead[None], self.d + 1)
            yield slice(a, a + g), dist

    def _topk(self, q, k, r0, r1):
        D, R = padded(len(q), k)
        n = r1 - r0
        kk = min(k, n)
        if kk == 0:
            return D, R
        self._sync()
        rows = torch.arange(n, device=self.device)
        for sl, dist in self._distances(q, r0, r1):
            key = torch.topk(dist * n + rows, kk, dim=1, largest=False, sorted=True).values
            dd, rr = (key // n).cpu().numpy(), (key % n).cpu().numpy() + r0
            live = dd <= self.d  # dead rows sort after every live one
            D[sl, :kk] = np.where(live, dd, D[sl, :kk])
            R[sl, :kk] = np.where(live, rr, -1)
        return D, R

    def _range_rows(self, q, radius):
        self._sync()
        n = self._n
        counts, dists, rows = [], [], []
        for sl, dist in self._distances(q, 0, n):
            qi, r = torch.nonzero(dist < radius, as_tuple=True)
            dv = dist[qi, r]
            order = torch.argsort((qi * (self.d + 2) + dv) * max(n, 1) + r)  # unique keys: (query, distance, row)
            qi, dv, r = qi[order], dv[order], r[order]
            counts.append(torch.bincount(qi, minlength=dist.shape[0]).cpu().numpy())
            dists.append(dv.cpu().numpy().astype(np.int32))
            rows.append(r.cpu().numpy().astype(np.int64))
        lims = np.zeros(len(q) + 1, np.int64)
        if counts:
            np.cumsum(np.concatenate(counts), out=lims[1:])
        cat = lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t)  # noqa: E731
        return lims, cat(dists, np.int32), cat(rows, np.int64)
