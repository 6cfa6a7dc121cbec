"""The item bookkeeping a learner keeps: one row per stored item — id, packed code, label-set group (or
none), frozen and held flags — in numpy arrays grown by doubling, no Python object per item.

Not the images: a round asks a ``fetch_images(ids)`` callback for those it trains on (the LMDB blobs in the
worker, an array in the eval). Ids live in :class:`_ItemIds`: ~35 bytes an item beyond the packed code for
ids like ``img-0123456`` (``benchmarks/bench_memory.py``; an id list, an id -> row dict and +-1 int8 codes
cost ~200). Codes are unpacked to +-1 only for the rows a step works on (:meth:`ItemBook._pm1`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streamhash.codes import pack_signs, unpack_signs
from streamhash.hashmap import Int64Multimap
from streamhash.learn.labels import normalise_label_sets


def _as_packed(codes, bits: int) -> np.ndarray:
    """Packed (n, bits/8) uint8 codes from packed or +-1 / real (n, bits) ones (bit = value >= 0)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must be 2-D, got shape {codes.shape}")
    if codes.dtype == np.uint8 and codes.shape[1] == bits // 8:
        return codes
    if codes.shape[1] == bits:
        return pack_signs(codes)
    raise ValueError(f"codes of shape {codes.shape} match neither packed ({bits // 8} bytes) nor +-1 ({bits})")


class _ItemIds:
    """Item ids (str or int) by row and id -> row, in numpy arrays.

    The ids' bytes (a type tag, then UTF-8 or decimal digits) lie end to end in one buffer with an
    end offset per row, and the 64-bit hash of those bytes maps to the row in an
    :class:`Int64Multimap`; a hash hit is confirmed by comparing the bytes, so colliding ids stay
    apart. Per id: 8 (offset) + 16 (map) + its length + 1 bytes, where a list entry, a dict entry
    and the str object cost ~150.
    """

    def __init__(self) -> None:
        self._buf = np.zeros(1 << 16, np.uint8)
        self._end = np.zeros(1024, np.int64)  # row r's bytes are _buf[_end[r-1]:_end[r]]
        self._n = 0
        self._rows = Int64Multimap()

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def key(item_id) -> bytes:
        if isinstance(item_id, str):
            return b"s" + item_id.encode()
        if isinstance(item_id, (int, np.integer)) and not isinstance(item_id, bool):
            return b"i" + str(int(item_id)).encode()
        raise TypeError(f"item ids must be str or int, got {type(item_id).__name__}")

    def _raw(self, row: int) -> bytes:
        return self._buf[(self._end[row - 1] if row else 0) : self._end[row]].tobytes()

    def get(self, rows) -> list:
        out = []
        for r in np.asarray(rows, np.int64).tolist():
            raw = self._raw(r)
            out.append(raw[1:].decode() if raw[:1] == b"s" else int(raw[1:]))
        return out

    def lookup(self, keys: list[bytes], hashes: np.ndarray) -> np.ndarray:
        """Row of each key, -1 where absent."""
        rows = np.full(len(keys), -1, np.int64)
        which, cand = self._rows.find(hashes)
        for w, r in zip(which.tolist(), cand.tolist()):
            if self._raw(r) == keys[w]:
                rows[w] = r
        return rows

    def append(self, keys: list[bytes], hashes: np.ndarray) -> None:
        """New rows ``len(self) ...`` for keys not present."""
        if not keys:
            return
        lens = np.fromiter(map(len, keys), np.int64, len(keys))
        start = int(self._end[self._n - 1]) if self._n else 0
        need, n = start + int(lens.sum()), self._n + len(keys)
        self._buf = _grown(self._buf, start, need)
        self._end = _grown(self._end, self._n, n)
        self._buf[start:need] = np.frombuffer(b"".join(keys), np.uint8)
        self._end[self._n : n] = start + np.cumsum(lens)
        self._rows.add(hashes, np.arange(self._n, n))
        self._n = n


def _grown(arr: np.ndarray, used: int, need: int) -> np.ndarray:
    """``arr`` with room for ``need`` entries, doubled when short. The idle tail stays untouched zero
    pages (np.zeros maps them lazily), so it costs address space, not resident memory."""
    if need <= len(arr):
        return arr
    out = np.zeros(max(need, 2 * len(arr)), arr.dtype)
    out[:used] = arr[:used]
    return out


def _hashes(keys: list[bytes]) -> np.ndarray:
    return np.fromiter(map(hash, keys), np.int64, len(keys))


class ItemBook:
    """The stored items of a learner, by row: what :class:`~streamhash.learn.dihn.DIHNLearner` learns codes
    for. Labeled items (a non-empty label set, numbered as a group in ``_groups``) are Gamma; pending ones
    (not frozen) are B_new; held ones are never sampled into Omega."""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        # grown by doubling
        self._ids = _ItemIds()
        self._codes = np.zeros((0, self.bits // 8), np.uint8)  # packed
        self._group = np.zeros(0, np.int32)  # -1 = unlabeled
        self._frozen = np.zeros(0, bool)
        self._held = np.zeros(0, bool)  # never in Omega: the network never trains on their images (a hold-out)
        self._groups: list[frozenset[int]] = []
        self._group_of: dict[frozenset[int], int] = {}

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def n_items(self) -> int:
        return len(self._ids)

    def _grow(self, extra: int) -> None:
        n = len(self._ids)
        cap = len(self._codes)
        if n + extra <= cap:
            return
        new_cap = max(n + extra, 2 * cap, 1024)
        for name in ("_codes", "_group", "_frozen", "_held"):
            old = getattr(self, name)
            arr = np.zeros((new_cap,) + old.shape[1:], dtype=old.dtype)  # rows past n are never read
            arr[:n] = old[:n]
            setattr(self, name, arr)

    def _group_index(self, s: frozenset[int]) -> int:
        if not s:
            return -1
        g = self._group_of.get(s)
        if g is None:
            g = len(self._groups)
            self._groups.append(s)
            self._group_of[s] = g
        return g

    def add_items(self, ids: Sequence, codes, labels=None, *, frozen: bool = True, held=None) -> None:
        """Register stored items: their ids, current codes (packed uint8 or +-1) and labels.

        ``frozen=True``: an old code, never changed by learning. ``frozen=False``: a labeled item joins
        B_new, its code (the provisional one it was indexed with) is learned at the next round.
        Unlabeled items (``labels`` None, or a None / empty entry) are always frozen and never learned
        from. ``held`` (a bool per item): items never sampled into Omega, so the network never trains on
        their images; their codes are learned like the others' (DCC needs their labels, not their images).
        A re-added id overwrites that row (re-sent message).
        """
        ids = list(ids)
        packed = _as_packed(codes, self.bits)
        if len(packed) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(packed)} codes")
        sets = normalise_label_sets(labels) if labels is not None else [frozenset()] * len(ids)
        if len(sets) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(sets)} labels")
        keys = [_ItemIds.key(i) for i in ids]
        hashes = _hashes(keys)
        rows = self._ids.lookup(keys, hashes)
        new: dict[bytes, int] = {}  # first occurrence in the batch of an id the learner lacks -> its row
        for i in np.flatnonzero(rows < 0).tolist():
            rows[i] = new.setdefault(keys[i], len(self._ids) + len(new))
        self._grow(len(new))
        self._ids.append(list(new), _hashes(list(new)))
        groups = np.array([self._group_index(s) for s in sets], np.int32)  # groups numbered in batch order
        last = len(rows) - 1 - np.unique(rows[::-1], return_index=True)[1]  # a repeated id keeps its last entry
        groups = groups[last]
        held = np.zeros(len(ids), bool) if held is None else np.asarray(held, bool)
        held = held[last] & (groups >= 0)
        self._codes[rows[last]] = packed[last]
        self._group[rows[last]] = groups
        self._held[rows[last]] = held
        self._frozen[rows[last]] = frozen | (groups < 0)

    def rows(self, ids: Sequence) -> np.ndarray:
        keys = [_ItemIds.key(i) for i in ids]
        rows = self._ids.lookup(keys, _hashes(keys))
        if (rows < 0).any():
            raise KeyError(ids[int(np.flatnonzero(rows < 0)[0])])
        return rows

    @property
    def ids(self) -> list:
        return self._ids.get(np.arange(len(self._ids)))

    @property
    def held_ids(self) -> list:
        """Labeled items held out of Omega (the network never trains on their images)."""
        return self._ids.get(np.flatnonzero(self._held[: len(self._ids)]))

    @property
    def pending_ids(self) -> list:
        """Labeled items waiting for their first learning round (B_new)."""
        n = len(self._ids)
        return self._ids.get(np.flatnonzero(~self._frozen[:n]))

    def quarantine_pending(self) -> list:
        """Take the pending items (B_new) out of learning for good: they keep their codes and ids, and
        leave Gamma like unlabeled items (a round that failed on them must not fail on them again).
        Returns their ids."""
        rows = np.flatnonzero(~self._frozen[: len(self._ids)])
        self._frozen[rows] = True
        self._group[rows] = -1
        return self._ids.get(rows)

    def forget(self, ids: Sequence) -> int:
        """Items removed from the index: out of Omega and Gamma for good, their codes zeroed, no longer pending
        (their rows stay, empty, until the learner restarts: an id seen again reuses its row). Unknown ids are
        ignored; returns how many were known."""
        keys = [_ItemIds.key(i) for i in ids]
        rows = self._ids.lookup(keys, _hashes(keys))
        rows = rows[rows >= 0]
        self._frozen[rows] = True
        self._group[rows] = -1
        self._held[rows] = False
        self._codes[rows] = 0
        return len(rows)

    @property
    def n_pending(self) -> int:
        return int((~self._frozen[: len(self._ids)]).sum())

    def codes(self, ids: Sequence | None = None) -> np.ndarray:
        """Packed codes (n, bits/8) of the given ids (all items, in insertion order, when None)."""
        n = len(self._ids)
        return self._codes[:n].copy() if ids is None else self._codes[self.rows(list(ids))]

    def _pm1(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), bits) float32 +-1 codes of some rows."""
        return unpack_signs(self._codes[rows], self.bits)

    def set_codes(self, ids: Sequence, codes) -> None:
        """Overwrite stored codes (a re-encode); the items become frozen."""
        r = self.rows(list(ids))
        self._codes[r] = _as_packed(codes, self.bits)
        self._frozen[r] = True

    # ------------------------------------------------------------------ persistence
    def _items_state(self) -> dict:
        n = len(self._ids)
        return {
            "ids": self.ids,
            "codes": torch.from_numpy(self._codes[:n].copy()),
            "group": torch.from_numpy(self._group[:n].copy()),
            "frozen": torch.from_numpy(self._frozen[:n].copy()),
            "held": torch.from_numpy(self._held[:n].copy()),
            "groups": [sorted(s) for s in self._groups],
        }

    def _load_items(self, st: dict) -> list:
        """Restore what :meth:`_items_state` saved into an empty book; returns the ids."""
        self._groups = [frozenset(s) for s in st["groups"]]
        self._group_of = {s: g for g, s in enumerate(self._groups)}
        ids = list(st["ids"])
        n = len(ids)
        self._grow(n)
        keys = [_ItemIds.key(i) for i in ids]
        self._ids.append(keys, _hashes(keys))
        self._codes[:n] = st["codes"].numpy()
        self._group[:n] = st["group"].numpy()
        self._frozen[:n] = st["frozen"].numpy()
        if "held" in st:  # absent from states saved before held items could be learned
            self._held[:n] = st["held"].numpy()
        return ids
