"""The learner the worker runs: an incremental hasher (DIHN by default) + reservoir + MI re-encode trigger.

Wiring (streamhash/services/learner.py is the real one)::

    hasher = OnlineHasher(net, settings.learn, seed=settings.model.seed)
    # ingest path, after the store committed (any thread; cheap, never blocks on a round):
    hasher.observe(ids, packed_codes, labels)          # labels: list of label sets / ints, None = unlabeled
    # learner thread:
    if hasher.ready():
        report = hasher.learn_round(fetch_images)       # fetch_images(ids) -> uint8 images from the store's blobs
        net = hasher.snapshot_net()                     # a copy to publish; the hasher keeps training its own
        if report.reencode:                             # the MI test fired: build a new generation with `net`
            ...; hasher.apply_reencode(ids, codes)      # the codes the index now holds
        else:
            store.put_codes(report.round.ids, report.round.codes, model_version=version)

Another incremental learner plugs in through ``learner=`` (any :class:`~streamhash.learn.base.IncrementalHasher`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamhash.config import LearnSettings
from streamhash.learn.base import IncrementalHasher
from streamhash.learn.dihn import DIHNLearner, FetchImages, RoundResult
from streamhash.learn.labels import normalise_label_sets
from streamhash.learn.mi import mi_quality
from streamhash.learn.reservoir import Reservoir
from streamhash.learn.trigger import MITrigger, TriggerDecision
from streamhash.model.hashnet import HashNet


@dataclass(frozen=True)
class RoundReport:
    round: RoundResult
    mi_live: float
    mi_candidate: float
    decision: TriggerDecision
    mi_seconds: float

    @property
    def reencode(self) -> bool:
        return self.decision.fire

    @property
    def gain(self) -> float:
        return self.decision.gain


class OnlineHasher:
    def __init__(self, net: HashNet, settings: LearnSettings | None = None, *, seed: int = 0,
                 device: str = "cpu", require_drift: bool = False, learner: IncrementalHasher | None = None,
                 **learner_kwargs):
        s = settings or LearnSettings()
        self.settings = s
        if learner is None:
            kw = {"gamma": s.gamma, "mu": s.mu, "omega": s.omega, "epochs": s.epochs, "seed": seed, "device": device}
            learner = DIHNLearner(net, **{**kw, **learner_kwargs})
        self.learner = learner
        self.reservoir = Reservoir(s.reservoir_size, seed=seed)
        self.trigger = MITrigger(s.mi_threshold, require_drift=require_drift)
        self._lock = threading.Lock()  # guards the buffer (observe runs on the ingest thread)
        self._learner_lock = threading.Lock()  # the learner is single-threaded: a round, a drain, a re-encode
        self._buffer: list[tuple[list, np.ndarray, list, bool]] = []
        self._buffered_labeled = 0

    @property
    def net(self) -> HashNet:
        return self.learner.net

    def snapshot_net(self) -> HashNet:
        return HashNet.from_bytes(self.learner.net.to_bytes())

    def observe(self, ids: Sequence, codes: np.ndarray, labels=None, *, frozen: bool = False) -> None:
        """Items just indexed (ids, their packed codes, labels). Labeled ones are learned next round
        (``frozen=True`` registers them as old codes instead, e.g. when rebuilding from the store)."""
        ids = list(ids)
        sets = normalise_label_sets(labels) if labels is not None else [frozenset()] * len(ids)
        with self._lock:
            self._buffer.append((ids, np.asarray(codes), sets, frozen))
            self._buffered_labeled += 0 if frozen else sum(1 for x in sets if x)  # frozen ones are old codes

    def _drain(self) -> None:
        """Move observed items into the learner (caller holds ``_learner_lock``)."""
        with self._lock:
            buf, self._buffer, self._buffered_labeled = self._buffer, [], 0
        for ids, codes, sets, frozen in buf:
            self.learner.add_items(ids, codes, sets, frozen=frozen)
            for i, lab in zip(ids, sets):
                if lab:
                    self.reservoir.update(i, lab)

    @property
    def n_pending(self) -> int:
        return self.learner.n_pending + self._buffered_labeled

    def ready(self) -> bool:
        """Whether a round is due. Also folds the observed items into the learner's numpy bookkeeping
        unless a round holds it: the buffer keeps Python objects per item, and unlabeled items alone
        never make a round due, so without this it would grow for as long as no labels arrive."""
        if self._learner_lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._learner_lock.release()
        return self.n_pending >= self.settings.round_every

    def mi_live_and_candidate(self, fetch_images: FetchImages) -> tuple[float, float]:
        ids = list(self.reservoir.ids)
        labels = list(self.reservoir.payloads)
        if len(ids) < 2:
            return 0.0, 0.0
        bits = self.learner.bits
        live = mi_quality(self.learner.codes(ids), labels, bits)
        cand = mi_quality(self.learner.encode(np.asarray(fetch_images(ids))), labels, bits)
        return live, cand

    def learn_round(self, fetch_images: FetchImages) -> RoundReport:
        with self._learner_lock:
            self._drain()
            res = self.learner.learn_round(fetch_images)
            t0 = time.perf_counter()
            live, cand = self.mi_live_and_candidate(fetch_images)
        decision = self.trigger.update(live, cand)
        return RoundReport(res, live, cand, decision, time.perf_counter() - t0)

    def quarantine_pending(self) -> list:
        """After a failed round: the pending labeled items stay indexed but are never learned from
        (:meth:`DIHNLearner.quarantine_pending`); returns their ids."""
        with self._learner_lock:
            self._drain()
            return self.learner.quarantine_pending()

    def reencode(self, fetch_images: FetchImages, ids: Sequence | None = None) -> tuple[list, np.ndarray]:
        """Encode every known item (or ``ids``) with the current network; codes are stored as live."""
        with self._learner_lock:
            self._drain()
            return self.learner.reencode(fetch_images, ids)

    def apply_reencode(self, ids: Sequence, codes: np.ndarray) -> None:
        """Tell the learner the codes the index now holds after a re-encode done elsewhere."""
        with self._learner_lock:
            self._drain()
            self.learner.set_codes(ids, codes)
