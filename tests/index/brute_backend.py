"""A Hamming backend in one small file, for the registry's test: every distance, then a stable sort.

Slow and obviously right; what a new backend implements is exactly these two methods.
"""

from __future__ import annotations

import numpy as np

from streamhash.index.hamming import BinaryIndex, padded


class BruteIndex(BinaryIndex):
    backend = "brute"

    def _distances(self, q: np.ndarray, r0: int, r1: int) -> np.ndarray:
        dist = np.bitwise_count(q[:, None, :] ^ self._codes[None, r0:r1]).sum(-1, dtype=np.int64)
        dist[:, self._dead[r0:r1] == 1] = self.d + 1  # dead rows sort after every live one
        return dist

    def _topk(self, q, k, r0, r1):
        D, R = padded(len(q), k)
        dist = self._distances(q, r0, r1)
        rows = np.argsort(dist, axis=1, kind="stable")[:, :k]
        dist = np.take_along_axis(dist, rows, 1)
        live = dist <= self.d
        D[:, : rows.shape[1]] = np.where(live, dist, D[:, : rows.shape[1]])
        R[:, : rows.shape[1]] = np.where(live, rows + r0, -1)
        return D, R

    def _range_rows(self, q, radius):
        lims, D, R = [0], [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
        for dist in self._distances(q, 0, self._n):
            rows = np.flatnonzero(dist < radius)
            rows = rows[np.argsort(dist[rows], kind="stable")]
            lims.append(lims[-1] + len(rows))
            D.append(dist[rows].astype(np.int32))
            R.append(rows)
        return np.array(lims, np.int64), np.concatenate(D), np.concatenate(R)
