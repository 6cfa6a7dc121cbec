"""DIHN: deep incremental hashing with frozen old codes (Wu et al., CVPR 2019), river-like API.

The learner is an :class:`~streamhash.learn.items.ItemBook`, the database bookkeeping the algorithm needs
— one row per stored item: id, packed code, label set (or none), frozen flag — but not the images: a round
asks a ``fetch_images(ids)`` callback for the images of the sampled set Omega.

A round (:meth:`DIHNLearner.learn_round`), for ``iters`` alternations:

1. sample Omega (``omega`` items) from the labeled database Gamma, ``new_fraction`` of it from the
   not-yet-learned labeled items B_new (DIHN's incremental set), the rest from the old ones; items
   added as ``held`` never are (the caller's hold-out: codes learned, images never trained on);
2. train F for ``epochs`` epochs on Omega with every database code fixed, minimising
   :class:`streamhash.model.losses.DIHNLoss` (Adam; with ``fresh_optimizer``, the default, a new one each round:
   the moments of the last round's loss, over another Omega and other codes, misled a round's first steps);
3. update B_new only, bit by bit, by discrete cyclic coordinate descent (ADSH / DIHN):
   with ``Q = c S_{Omega,new}^T U + gamma U_bar`` (U_bar = u_i for new items that are in Omega, 0 else),
   ``B_new[:, k] = sign(Q[:, k] - B_new_{-k} (U_{-k}^T u_k))`` — the exact minimiser of the
   B-subproblem in bit k with the other bits fixed (a zero keeps the current bit), so a sweep never
   increases ``||c S - U B^T||^2 + gamma ||U_new - B_new||^2``.

At the end of the round the new codes are frozen. DIHN never touches them again; here ``relearn`` decides
when a round's B-step takes every labeled code, old ones too (ADSH's B-step over Gamma, a code rewrite,
no image read): ``"new-labels"`` (default) in a round that brings a label no frozen code was learned with —
the old codes were placed for a vocabulary without it (measured: partial-labels +0.01 mAP; always
re-learning cost CIFAR-10 about as much, benchmarks/journal/2026-12-07-learning-round-budget.md);
``"always"``; ``"never"`` (plain DIHN). Otherwise only :meth:`DIHNLearner.set_codes` (a re-encode)
changes a frozen code. In a round that brings a new label the hash head also starts afresh (``restart_head``)
and the round runs until the hold-out's mAP stops rising (:mod:`streamhash.learn.holdout`), up to
``restart_factor`` times ``iters`` alternations. Unlabeled items may be registered (for re-encode
bookkeeping) but are never in Gamma, Omega or the loss.

Similarity is multi-label, and nothing of size |Omega| x |Gamma| is built: the statistics come from
label-set groups (:mod:`streamhash.learn.dcc`, with the B-step).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from streamhash.codes import pack_signs
from streamhash.errors import StreamhashError
from streamhash.learn.base import FetchImages, RoundResult
from streamhash.learn.dcc import dcc_new_codes, group_stats
from streamhash.learn.dcc import dcc_update as dcc_update  # re-exported: importers name it from here
from streamhash.learn.holdout import MAX_DATABASE, MAX_QUERIES, Plateau, holdout_map, sample_rows
from streamhash.learn.items import ItemBook
from streamhash.learn.items import _ItemIds as _ItemIds  # re-exported: online.py keys ids as the learner does
from streamhash.model.hashnet import HashNet
from streamhash.model.losses import DIHNLoss

ShouldStop = Callable[[], bool]


class RoundAbandoned(StreamhashError):
    """A round's ``should_stop`` said stop (the process is stopping). The learner is left mid-round (network
    partly trained, new codes partly updated, none frozen): only a process about to exit may raise it, and
    nothing of the round may be published; a restarted learner learns the same items again."""


def _check(should_stop: ShouldStop | None) -> None:
    if should_stop is not None and should_stop():
        raise RoundAbandoned("learning round abandoned: stop requested")


RELEARN_MODES = ("never", "new-labels", "always")


def relearn_mode(value: str | bool) -> str:
    """``relearn`` as one of :data:`RELEARN_MODES` (a bool, as older learner states saved it: always / never)."""
    if isinstance(value, bool):
        return "always" if value else "never"
    if value not in RELEARN_MODES:
        raise ValueError(f"relearn must be one of {RELEARN_MODES}, got {value!r}")
    return value


class DIHNLearner(ItemBook):
    def __init__(
        self,
        net: HashNet,
        *,
        gamma: float = 200.0,
        mu: float = 50.0,
        omega: int = 750,
        epochs: int = 3,
        iters: int = 8,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        batch_size: int = 64,
        new_fraction: float = 0.5,
        soft: bool = True,
        balance: str = "square",
        device: str | torch.device = "cpu",
        seed: int = 0,
        relearn: str | bool = "new-labels",
        fresh_optimizer: bool = True,
        restart_head: bool = True,
        restart_factor: int = 3,
    ):
        self.net = net.to(device)
        super().__init__(net.cfg.bits)  # the item bookkeeping
        self.gamma, self.mu = float(gamma), float(mu)
        self.omega, self.epochs, self.iters = int(omega), int(epochs), int(iters)
        self.lr, self.weight_decay, self.batch_size = float(lr), float(weight_decay), int(batch_size)
        self.new_fraction, self.soft, self.balance = float(new_fraction), bool(soft), balance
        self.relearn = relearn_mode(relearn)  # when DCC re-learns every labeled code, not only the new ones
        # a round starts Adam afresh: its moment estimates belong to the last round's loss (other Omega, other codes)
        self.fresh_optimizer = bool(fresh_optimizer)
        # a round that brings a new label starts the hash head afresh and trains up to restart_factor x iters
        self.restart_head, self.restart_factor = bool(restart_head), int(restart_factor)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.loss_fn = DIHNLoss(self.bits, gamma, mu, balance)
        self._rng = np.random.default_rng(seed)
        self._gen = torch.Generator().manual_seed(seed)
        self._opt = self._new_optimizer()
        self.rounds = 0
        self._cache: dict = {}  # images given to learn_many, for learners without a fetch callback
        self._next_auto_id = 0

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.net.parameters() if p.requires_grad], lr=self.lr,
                                weight_decay=self.weight_decay)

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

    def _group_stats(self, omega_rows: np.ndarray) -> dict:
        """Sufficient statistics of the Omega x Gamma similarity block (:func:`~streamhash.learn.dcc.group_stats`)."""
        lab_rows = np.flatnonzero(self._group[: len(self._ids)] >= 0)
        return group_stats(self._groups, lab_rows, self._group[lab_rows], self._group[omega_rows], self._pm1, self.bits,
                           soft=self.soft, chunk=self._STATS_CHUNK)

    def learn_round(self, fetch_images: FetchImages | None = None, *, iters: int | None = None,
                    should_stop: ShouldStop | None = None, until: ShouldStop | None = None) -> RoundResult:
        """One DIHN round over the current B_new; returns the learned codes (now frozen). ``should_stop`` is
        asked between alternations and between training batches: True abandons the round
        (:class:`RoundAbandoned`), so that a stopping process never waits for a round of any size.
        ``until``, asked after each alternation, True ends the round there (a round on a time budget)."""
        t0 = time.perf_counter()
        fetch = self._fetcher(fetch_images)
        n = len(self._ids)
        pending = ~self._frozen[:n]
        novel = self._brings_new_labels(pending)
        # relearn: the old labeled codes are learned again by DCC with the new ones (ADSH's B-step over Gamma,
        # no image read: a code rewrite), so the codes of classes learned before the stream moved on fit the
        # network and the classes that came since; only the ones that change are returned
        relearn = pending.any() and (self.relearn == "always" or (self.relearn == "new-labels" and novel))
        new_rows = np.flatnonzero(pending | (self._group[:n] >= 0) if relearn else pending)
        before = self._codes[new_rows].copy()
        restart = self.restart_head and novel and len(new_rows) > 0 and (iters is None or iters > 0)
        if restart:
            self._restart_head()
            if iters is None:
                iters, until = self._restart_budget(fetch, until)
        iters = self.iters if iters is None else int(iters)
        last_loss = float("nan")
        m = done = 0
        if len(new_rows) and iters > 0:
            if self.fresh_optimizer:
                self._opt = self._new_optimizer()
            for _ in range(iters):
                _check(should_stop)
                omega_rows = self._sample_omega()
                m = len(omega_rows)
                images = fetch(self._ids.get(omega_rows))
                x = self.net.to_tensor(np.asarray(images))
                stats = self._group_stats(omega_rows)
                last_loss = self._train_net(x, omega_rows, stats, should_stop)
                _check(should_stop)
                U = self._embed(x)
                self._dcc(new_rows, omega_rows, U, stats)
                done += 1
                if until is not None and until():
                    break
        self._frozen[new_rows] = True
        self.rounds += 1
        moved = (self._codes[new_rows] != before).any(axis=1)
        changed = int(moved[pending[new_rows]].sum())
        new_rows = new_rows[pending[new_rows] | moved]
        return RoundResult(self._ids.get(new_rows), self._codes[new_rows], changed, last_loss,
                           time.perf_counter() - t0, done, m, self.rounds)

    def _brings_new_labels(self, pending: np.ndarray) -> bool:
        """Whether a pending labeled item carries a label no frozen one does (the old codes, and the head that maps
        features onto them, were placed without it)."""
        n = len(pending)
        lab = self._group[:n] >= 0
        old = {lab_ for g in np.unique(self._group[:n][lab & ~pending]) for lab_ in self._groups[g]}
        new = {lab_ for g in np.unique(self._group[:n][lab & pending]) for lab_ in self._groups[g]}
        return bool(old) and bool(new - old)

    def _restart_head(self) -> None:
        """The hash head afresh (PyTorch's ``nn.Linear`` initialization, drawn from the learner's generator, which
        its saved state carries), the backbone kept. A head fitted to the old vocabulary held a retrain given its budget
        0.035 mAP below one from scratch on the domain-shift stream; afresh, level with it
        (benchmarks/journal/2026-12-07-head-restart.md)."""
        head = self.net.head
        bound = 1.0 / np.sqrt(head.in_features)
        with torch.no_grad():
            for p in (head.weight, head.bias):
                p.copy_(torch.empty(p.shape, dtype=p.dtype).uniform_(-bound, bound, generator=self._gen))

    def _restart_budget(self, fetch: FetchImages, until: ShouldStop | None) -> tuple[int, ShouldStop | None]:
        """A restarted head's round: ``iters`` alternations at least, ``restart_factor`` x ``iters`` at most, ended
        when the hold-out's mAP stops rising (:class:`streamhash.learn.holdout.Plateau`); ``iters`` alone without a
        hold-out to judge by."""
        n = len(self._ids)
        lab = self._group[:n] >= 0
        held = sample_rows(np.flatnonzero(lab & self._held[:n]), MAX_QUERIES, self._rng)
        db = sample_rows(np.flatnonzero(lab & ~self._held[:n]), MAX_DATABASE, self._rng)
        if not len(held) or not len(db) or self.restart_factor <= 1:
            return self.iters, until
        images = fetch(self._ids.get(held))
        label_sets = lambda rows: [self._groups[g] for g in self._group[rows]]  # noqa: E731
        plateau = Plateau(holdout_map(lambda: self.encode(images), label_sets(held), lambda: self._codes[db],
                                      label_sets(db), self.bits), least=self.iters)
        # both asked every alternation: the caller's ``until`` may count them (a budget)
        return self.iters * self.restart_factor, plateau if until is None else (lambda: plateau() | until())

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
        B = torch.from_numpy(self._pm1(new_rows).astype(np.float64))
        codes = dcc_new_codes(B, U, stats["Sg"], self._group[new_rows], self._group[omega_rows], new_rows, omega_rows,
                              self.gamma)
        self._codes[new_rows] = pack_signs(codes.numpy())

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return {
            "net": self.net.to_bytes(),
            "hyper": {"gamma": self.gamma, "mu": self.mu, "omega": self.omega, "epochs": self.epochs,
                      "iters": self.iters, "lr": self.lr, "weight_decay": self.weight_decay,
                      "batch_size": self.batch_size, "new_fraction": self.new_fraction, "soft": self.soft,
                      "balance": self.balance, "seed": self.seed, "relearn": self.relearn,
                      "fresh_optimizer": self.fresh_optimizer, "restart_head": self.restart_head,
                      "restart_factor": self.restart_factor},
            "rounds": self.rounds,
            **self._items_state(),
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
        ids = self._load_items(st)
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
