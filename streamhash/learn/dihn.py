"""DIHN: deep incremental hashing with frozen old codes (Wu et al., CVPR 2019), river-like API.

The learner keeps the database bookkeeping the algorithm needs — one row per stored item: id, packed
code, label set (or none), frozen flag — but not the images: a round asks a ``fetch_images(ids)``
callback for the images of the sampled set Omega (the LMDB blobs in the worker, an array in the eval).
The bookkeeping is numpy arrays, no Python object per item (:class:`_ItemIds`): ~35 bytes an item
beyond the packed code for ids like ``img-0123456`` (``benchmarks/bench_memory.py``; an id list, an
id -> row dict and +-1 int8 codes cost ~200). Codes are unpacked to +-1 only for the rows a step
works on, and the Gamma statistics are accumulated a chunk of rows at a time.

A round (:meth:`DIHNLearner.learn_round`), for ``iters`` alternations:

1. sample Omega (``omega`` items) from the labeled database Gamma, ``new_fraction`` of it from the
   not-yet-learned labeled items B_new (DIHN's incremental set), the rest from the old ones; items
   added as ``held`` never are (the caller's hold-out: codes learned, images never trained on);
2. train F for ``epochs`` epochs on Omega with every database code fixed, minimising
   :class:`streamhash.model.losses.DIHNLoss`;
3. update B_new only, bit by bit, by discrete cyclic coordinate descent (ADSH / DIHN):
   with ``Q = c S_{Omega,new}^T U + gamma U_bar`` (U_bar = u_i for new items that are in Omega, 0 else),
   ``B_new[:, k] = sign(Q[:, k] - B_new_{-k} (U_{-k}^T u_k))`` — the exact minimiser of the
   B-subproblem in bit k with the other bits fixed (a zero keeps the current bit), so a sweep never
   increases ``||c S - U B^T||^2 + gamma ||U_new - B_new||^2``.

At the end of the round the new codes are frozen: old codes are never touched again by learning —
only an explicit :meth:`DIHNLearner.set_codes` (a re-encode) changes them. Unlabeled items may be
registered (for re-encode bookkeeping) but are never in Gamma, Omega or the loss.

Similarity is multi-label: S_ij = +1 iff the label sets intersect, else -1 (or DIHN's "soft" negative,
see :func:`streamhash.model.losses.soft_negative`). Nothing of size |Omega| x |Gamma| is built: items are
grouped by label set, and ``S @ B`` is ``S_groups @ (sum of codes per group)``, so a round costs
O(|Gamma| c^2) for ``B^T B`` plus work on Omega and B_new only. Label values only name labels: the
group statistics use one column per label that occurs, so a label 10**20 costs what a label 3 does.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from streamhash.codes import pack_signs, unpack_signs
from streamhash.errors import StreamhashError
from streamhash.hashmap import Int64Multimap
from streamhash.learn.base import FetchImages, RoundResult
from streamhash.learn.labels import normalise_label_sets
from streamhash.model.hashnet import HashNet, images_to_tensor
from streamhash.model.losses import DIHNLoss, soft_negative

ShouldStop = Callable[[], bool]


class RoundAbandoned(StreamhashError):
    """A round's ``should_stop`` said stop (the process is stopping). The learner is left mid-round (network
    partly trained, new codes partly updated, none frozen): only a process about to exit may raise it, and
    nothing of the round may be published; a restarted learner learns the same items again."""


def _check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise RoundAbandoned("learning round abandoned: stop requested")


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


class DIHNLearner:
    def __init__(
        self,
        net: HashNet,
        *,
        gamma: float = 200.0,
        mu: float = 50.0,
        omega: int = 2000,
        epochs: int = 3,
        iters: int = 3,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        batch_size: int = 64,
        new_fraction: float = 0.5,
        soft: bool = True,
        balance: str = "square",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ):
        self.net = net.to(device)
        self.bits = net.cfg.bits
        self.gamma, self.mu = float(gamma), float(mu)
        self.omega, self.epochs, self.iters = int(omega), int(epochs), int(iters)
        self.lr, self.weight_decay, self.batch_size = float(lr), float(weight_decay), int(batch_size)
        self.new_fraction, self.soft, self.balance = float(new_fraction), bool(soft), balance
        self.device = torch.device(device)
        self.seed = int(seed)
        self.loss_fn = DIHNLoss(self.bits, gamma, mu, balance)
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator().manual_seed(seed)
        self._opt = torch.optim.Adam(
            [p for p in self.net.parameters() if p.requires_grad], lr=self.lr, weight_decay=self.weight_decay
        )
        self.rounds = 0
        # database bookkeeping, grown by doubling
        self._ids = _ItemIds()
        self._codes = np.zeros((0, self.bits // 8), np.uint8)  # packed
        self._group = np.zeros(0, np.int32)  # -1 = unlabeled
        self._frozen = np.zeros(0, bool)
        self._held = np.zeros(0, bool)  # never in Omega: the network never trains on their images (a hold-out)
        self._groups: list[frozenset[int]] = []
        self._group_of: dict[frozenset[int], int] = {}
        self._cache: dict = {}  # images given to learn_many, for learners without a fetch callback
        self._next_auto_id = 0

    # ------------------------------------------------------------------ database bookkeeping
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

    # ------------------------------------------------------------------ encoding
    def encode(self, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """uint8 images -> packed codes (n, bits/8) with the current network."""
        return self.net.encode(images, batch_size)

    def reencode(self, fetch_images: FetchImages | None = None, ids: Sequence | None = None,
                 batch_size: int = 1024) -> tuple[list, np.ndarray]:
        """Encode the given (default: all) items with the current network and store those codes."""
        fetch = self._fetcher(fetch_images)
        ids = self.ids if ids is None else list(ids)
        out = []
        for start in range(0, len(ids), batch_size):
            out.append(self.encode(fetch(ids[start:start + batch_size]), batch_size))
        codes = np.concatenate(out) if out else np.zeros((0, self.bits // 8), np.uint8)
        if ids:
            self.set_codes(ids, codes)
        return ids, codes

    # ------------------------------------------------------------------ learning
    def _fetcher(self, fetch_images: FetchImages | None) -> FetchImages:
        if fetch_images is not None:
            return fetch_images
        if not self._cache:
            raise ValueError("no fetch_images callback and no images cached by learn_many")

        def from_cache(ids):
            try:
                return np.stack([self._cache[i] for i in ids])
            except KeyError as exc:
                raise KeyError(f"image of item {exc.args[0]!r} is not cached; pass fetch_images") from None

        return from_cache

    def learn_many(self, images: np.ndarray, labels, *, ids: Sequence | None = None,
                   fetch_images: FetchImages | None = None, keep_images: bool = True) -> RoundResult:
        """River-style: index ``images`` as new labeled items (provisional codes from the current net)
        and run one round. Without ``fetch_images`` the images are kept in memory for later rounds."""
        images = np.asarray(images)
        if ids is None:
            ids = list(range(self._next_auto_id, self._next_auto_id + len(images)))
            self._next_auto_id += len(images)
        ids = list(ids)
        if keep_images:
            for i, img in zip(ids, images):
                self._cache[i] = img
        self.add_items(ids, self.encode(images), labels, frozen=False)
        return self.learn_round(fetch_images)

    def _sample_omega(self) -> np.ndarray:
        n = len(self._ids)
        labeled = (self._group[:n] >= 0) & ~self._held[:n]
        new_rows = np.flatnonzero(labeled & ~self._frozen[:n])
        old_rows = np.flatnonzero(labeled & self._frozen[:n])
        m = min(self.omega, len(new_rows) + len(old_rows))
        n_new = min(len(new_rows), int(round(self.new_fraction * m)))
        n_old = min(len(old_rows), m - n_new)
        n_new = min(len(new_rows), m - n_old)
        pick = [self._rng.choice(new_rows, n_new, replace=False) if n_new else np.zeros(0, np.int64),
                self._rng.choice(old_rows, n_old, replace=False) if n_old else np.zeros(0, np.int64)]
        return np.sort(np.concatenate(pick)).astype(np.int64)

    _STATS_CHUNK = 1 << 16  # rows unpacked at a time for the Gamma sums (16 MiB of float32 at 64 bits)

    def _group_stats(self, omega_rows: np.ndarray):
        """Sufficient statistics of the Omega x Gamma similarity block from label-set groups."""
        n = len(self._ids)
        lab_rows = np.flatnonzero(self._group[:n] >= 0)
        G = len(self._groups)
        groups = self._group[lab_rows]
        cnt = np.bincount(groups, minlength=G).astype(np.float64)
        # Sums of +-1 are integers: exact in float64 at any |Gamma|, so the float32 results are
        # those of a single float32 pass over all of Gamma (exact below 2**24 rows) without its memory.
        bsum = torch.zeros(G, self.bits, dtype=torch.float64)
        BtB = torch.zeros(self.bits, self.bits, dtype=torch.float64)
        for a in range(0, len(lab_rows), self._STATS_CHUNK):
            B = torch.from_numpy(self._pm1(lab_rows[a : a + self._STATS_CHUNK]))
            bsum.index_add_(0, torch.from_numpy(groups[a : a + self._STATS_CHUNK].astype(np.int64)), B.double())
            BtB += (B.t() @ B).double()
        bsum, BtB = bsum.float(), BtB.float()
        column = {lab: c for c, lab in enumerate(sorted(set().union(*self._groups)))}  # labels that occur
        hot = np.zeros((G, len(column)), np.float32)
        for g, s in enumerate(self._groups):
            hot[g, [column[lab] for lab in s]] = 1.0
        inter = (hot @ hot.T) > 0  # (G, G) label sets intersect
        g_omega = self._group[omega_rows]
        n_pos = float((inter[g_omega].astype(np.float64) @ cnt).sum())
        n_neg = float(len(omega_rows)) * len(lab_rows) - n_pos
        s_neg = soft_negative(n_pos, n_neg) if self.soft else -1.0
        Sg = np.where(inter, 1.0, s_neg).astype(np.float32)  # (G, G)
        SB = torch.from_numpy(Sg) @ bsum  # (G, c): row g = sum_j S(g, g_j) b_j
        s2 = torch.from_numpy(((Sg.astype(np.float64) ** 2) @ cnt).astype(np.float32))  # (G,)
        return {"Sg": torch.from_numpy(Sg), "SB": SB, "s2": s2, "BtB": BtB, "n": len(lab_rows), "s_neg": s_neg}

    def learn_round(self, fetch_images: FetchImages | None = None, *, iters: int | None = None,
                    should_stop: ShouldStop | None = None) -> RoundResult:
        """One DIHN round over the current B_new; returns the learned codes (now frozen). ``should_stop`` is
        asked between alternations and between training batches: True abandons the round
        (:class:`RoundAbandoned`), so that a stopping process never waits for a round of any size."""
        t0 = time.perf_counter()
        fetch = self._fetcher(fetch_images)
        n = len(self._ids)
        new_rows = np.flatnonzero(~self._frozen[:n])
        before = self._codes[new_rows].copy()
        iters = self.iters if iters is None else int(iters)
        last_loss = float("nan")
        m = 0
        if len(new_rows) and iters > 0:
            for _ in range(iters):
                _check(should_stop)
                omega_rows = self._sample_omega()
                m = len(omega_rows)
                images = fetch(self._ids.get(omega_rows))
                x = images_to_tensor(np.asarray(images), self.net.cfg)
                stats = self._group_stats(omega_rows)
                last_loss = self._train_net(x, omega_rows, stats, should_stop)
                _check(should_stop)
                U = self._embed(x)
                self._dcc(new_rows, omega_rows, U, stats)
        self._frozen[new_rows] = True
        self.rounds += 1
        changed = int((self._codes[new_rows] != before).any(axis=1).sum())
        return RoundResult(self._ids.get(new_rows), self._codes[new_rows], changed, last_loss,
                           time.perf_counter() - t0, iters if len(new_rows) else 0, m, self.rounds)

    def _train_net(self, x: torch.Tensor, omega_rows: np.ndarray, stats: dict, should_stop: ShouldStop | None = None) -> float:
        g = torch.from_numpy(self._group[omega_rows].astype(np.int64))
        SB = stats["SB"][g].to(self.device)
        s2 = stats["s2"][g].to(self.device)
        BtB = stats["BtB"].to(self.device)
        b_self = torch.from_numpy(self._pm1(omega_rows)).to(self.device)
        self.net.train()
        m = len(omega_rows)
        last = float("nan")
        for _ in range(self.epochs):
            perm = torch.randperm(m, generator=self._gen)
            total, batches = 0.0, 0
            for start in range(0, m, self.batch_size):
                _check(should_stop)
                idx = perm[start:start + self.batch_size]
                u = self.net(x[idx].to(self.device))
                loss = self.loss_fn(u, SB[idx], BtB, s2[idx], stats["n"], b_self[idx])
                self._opt.zero_grad(set_to_none=True)
                loss.backward()
                self._opt.step()
                total += float(loss.detach())
                batches += 1
            last = total / max(batches, 1)
        return last

    @torch.no_grad()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self.net.eval()
        out = [self.net(x[s:s + 1024].to(self.device)).float().cpu() for s in range(0, len(x), 1024)]
        return torch.cat(out).double()

    def _dcc(self, new_rows: np.ndarray, omega_rows: np.ndarray, U: torch.Tensor, stats: dict) -> None:
        """Bit-wise update of B_new (see module docstring); other codes untouched."""
        G = len(self._groups)
        g_omega = torch.from_numpy(self._group[omega_rows].astype(np.int64))
        usum = torch.zeros(G, self.bits, dtype=torch.float64).index_add_(0, g_omega, U)
        W = stats["Sg"].double() @ usum  # (G, c): row g = sum_{i in Omega} S(g_i, g) u_i
        g_new = torch.from_numpy(self._group[new_rows].astype(np.int64))
        Q = self.bits * W[g_new]
        # U_bar: Omega members that are new items (both row lists are sorted and duplicate-free)
        k = np.minimum(np.searchsorted(new_rows, omega_rows), len(new_rows) - 1)
        hit = new_rows[k] == omega_rows
        Q[torch.from_numpy(k[hit])] += self.gamma * U[torch.from_numpy(np.flatnonzero(hit))]
        B = torch.from_numpy(self._pm1(new_rows).astype(np.float64))
        self._codes[new_rows] = pack_signs(dcc_update(B, Q, U).numpy())


    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        n = len(self._ids)
        return {
            "net": self.net.to_bytes(),
            "hyper": {"gamma": self.gamma, "mu": self.mu, "omega": self.omega, "epochs": self.epochs,
                      "iters": self.iters, "lr": self.lr, "weight_decay": self.weight_decay,
                      "batch_size": self.batch_size, "new_fraction": self.new_fraction, "soft": self.soft,
                      "balance": self.balance, "seed": self.seed},
            "rounds": self.rounds,
            "ids": self.ids,
            "codes": torch.from_numpy(self._codes[:n].copy()),
            "group": torch.from_numpy(self._group[:n].copy()),
            "frozen": torch.from_numpy(self._frozen[:n].copy()),
            "held": torch.from_numpy(self._held[:n].copy()),
            "groups": [sorted(s) for s in self._groups],
            "opt": self._opt.state_dict(),
            "rng": self._rng.bit_generator.state,
            "gen": self._gen.get_state(),
        }

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, raw: bytes, device: str | torch.device = "cpu") -> "DIHNLearner":
        st = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        net = HashNet.from_bytes(st["net"])
        self = cls(net, device=device, **st["hyper"])
        self._opt.load_state_dict(st["opt"])
        self._rng.bit_generator.state = st["rng"]
        self._gen.set_state(st["gen"])
        self.rounds = st["rounds"]
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
        ints = [i for i in ids if isinstance(i, int)]
        self._next_auto_id = max(ints) + 1 if ints else 0
        return self

    def save(self, path) -> None:
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "DIHNLearner":
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read(), device)


def dcc_update(B: torch.Tensor, Q: torch.Tensor, U: torch.Tensor, sweeps: int = 1) -> torch.Tensor:
    """Discrete cyclic coordinate descent on min_B ||U B^T||^2 - 2 tr(B Q^T), B in {-1,+1}^(n x c).

    That is the B_new-subproblem of ``||c S - U B^T||^2 + gamma ||U_new - B_new||^2`` with
    ``Q = c S^T U + gamma U_bar``. Bit k: ``B[:, k] = sign(Q[:, k] - B_{-k} (U_{-k}^T u_k))``; where the
    argument is exactly 0 both values tie and the current bit is kept. Returns int8 codes.
    """
    B = B.clone().double()
    Q = Q.double()
    UtU = U.double().t() @ U.double()
    c = B.shape[1]
    for _ in range(sweeps):
        for k in range(c):
            v = Q[:, k] - B @ UtU[:, k] + B[:, k] * UtU[k, k]
            B[:, k] = torch.where(v > 0, 1.0, torch.where(v < 0, -1.0, B[:, k]))
    return B.to(torch.int8)
