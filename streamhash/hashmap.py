"""A compact int64 -> int64 multimap in sorted numpy runs, for id maps of millions of entries.

Below ``index/`` and ``learn/`` (it imports numpy alone): the index maps item ids to rows with it
(:mod:`streamhash.index.hamming`, :mod:`streamhash.index.live`), the learner its item keys to rows
(:mod:`streamhash.learn.dihn`).
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.int64)


def _merge_sorted(ak: np.ndarray, av: np.ndarray, bk: np.ndarray, bv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge two key-sorted runs in O(len(a) + len(b)); b's pairs go after a's equal keys."""
    pos = np.searchsorted(ak, bk, side="right") + np.arange(len(bk))
    k, v = np.empty(len(ak) + len(bk), np.int64), np.empty(len(ak) + len(bk), np.int64)
    from_a = np.ones(len(k), bool)
    from_a[pos] = False
    k[pos], v[pos], k[from_a], v[from_a] = bk, bv, ak, av
    return k, v


def _equal_ranges(keys_sorted: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which, pos): every position ``pos`` of ``keys_sorted`` holding ``keys[which]``."""
    lo = np.searchsorted(keys_sorted, keys, side="left")
    cnt = np.searchsorted(keys_sorted, keys, side="right") - lo
    which = np.repeat(np.arange(len(keys)), cnt)
    pos = np.arange(int(cnt.sum())) - np.repeat(np.cumsum(cnt) - cnt - lo, cnt)
    return which, pos


class Int64Multimap:
    """int64 key -> int64 value (>= 0) pairs, keys may repeat, in sorted numpy runs: 16 bytes a pair.

    A dict of n ints costs ~100 bytes an entry in Python objects; here the pairs live in a large
    key-sorted run and a small one that takes the adds (merged in O(small + batch)), folded into the
    large one once it outgrows ``4096 + 4 sqrt(n)`` pairs, so a batch of b adds costs
    O(b + sqrt n) amortised plus O(n) every ~sqrt(n) pairs. A removed pair becomes a tombstone
    (value -1) until the next fold. Lookups are binary searches in both runs.

    One writer at a time; readers need no lock: the runs are replaced as one tuple and a tombstone
    is one in-place store, so a reader sees each pair either present or removed.

    >>> m = Int64Multimap()
    >>> m.add(np.array([7, 3, 7]), np.array([0, 1, 2]))
    >>> [x.tolist() for x in m.find(np.array([7, 5, 3]))]
    [[0, 0, 2], [0, 2, 1]]
    >>> m.remove(np.array([7]), np.array([0])), len(m)
    (1, 2)
    """

    def __init__(self) -> None:
        self._runs = (_EMPTY, _EMPTY, _EMPTY, _EMPTY)  # large keys, large values, small keys, small values
        self._pairs = 0  # live pairs
        self._dead = 0  # tombstones not yet folded away

    def __len__(self) -> int:
        return self._pairs

    def add(self, keys, values) -> None:
        keys = np.asarray(keys, np.int64).reshape(-1)
        values = np.asarray(values, np.int64).reshape(-1)
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys but {len(values)} values")
        if (values < 0).any():
            raise ValueError("values must be >= 0 (negative values mark removed pairs)")
        order = np.argsort(keys, kind="stable")
        lk, lv, sk, sv = self._runs
        sk, sv = _merge_sorted(sk, sv, keys[order], values[order])
        if len(sk) + self._dead > 4096 + 4 * int(np.sqrt(len(lk))):
            lk, lv = _merge_sorted(lk, lv, sk, sv)
            if self._dead:  # (no copy otherwise: every fold's garbage is heap the allocator may keep)
                live = lv >= 0
                lk, lv = lk[live], lv[live]
            sk, sv, self._dead = _EMPTY, _EMPTY, 0
        self._runs = (lk, lv, sk, sv)
        self._pairs += len(keys)

    def find(self, keys) -> tuple[np.ndarray, np.ndarray]:
        """(which, values): one entry per stored pair whose key is ``keys[which]``."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        out_w, out_v = [], []
        lk, lv, sk, sv = self._runs
        for k, v in ((lk, lv), (sk, sv)):
            which, pos = _equal_ranges(k, keys)
            vals = v[pos]
            live = vals >= 0
            out_w.append(which[live])
            out_v.append(vals[live])
        return np.concatenate(out_w), np.concatenate(out_v)

    def remove(self, keys, values) -> int:
        """Remove the pairs (keys[i], values[i]) that are present; returns how many were."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        values = np.asarray(values, np.int64).reshape(-1)
        removed = 0
        lk, lv, sk, sv = self._runs
        for k, v in ((lk, lv), (sk, sv)):
            which, pos = _equal_ranges(k, keys)
            hit = np.unique(pos[v[pos] == values[which]])
            v[hit] = -1
            removed += len(hit)
        self._pairs -= removed
        self._dead += removed
        return removed

    def remap_values(self, new_of_old: np.ndarray) -> None:
        """Replace every live value v by ``new_of_old[v]`` (in place)."""
        for v in self._runs[1::2]:
            live = v >= 0
            v[live] = new_of_old[v[live]]
