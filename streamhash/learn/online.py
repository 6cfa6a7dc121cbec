"""The learner the worker runs: an incremental hasher (DIHN by default) + reservoir + MI re-encode trigger.

Wiring (streamhash/services/learner.py is the real one)::

    hasher = OnlineHasher(net, settings.learn, seed=settings.model.seed)
    # ingest path, after the store committed (any thread; cheap, never blocks on a round):
    hasher.observe(ids, packed_codes, labels)          # labels: list of label sets / ints, None = unlabeled
    # learner thread:
    if hasher.ready():                                  # round_every labeled items, or the oldest waited round_max_age_s
        report = hasher.learn_round(fetch_images)       # fetch_images(ids) -> uint8 images from the store's blobs
        net = hasher.snapshot_net()                     # a copy to publish; the hasher keeps training its own
        if report.reencode:                             # the MI test fired: store the learned codes, then build
            store.put_codes(report.round.ids, report.round.codes)   # a new generation with `net` (learned
            ...; hasher.apply_reencode(ids, codes)      # codes copied); the inferred codes the index now holds
        else:
            store.put_codes(report.round.ids, report.round.codes, model_version=version)
        lags = hasher.clock() - report.arrivals         # per learned item, arrival -> learned code

Another incremental learner plugs in through ``learner=`` (any :class:`~streamhash.learn.base.IncrementalHasher`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    # when the learned items were observed (``clock()`` time, float64, one per item; an item sent
    # twice before its round counts once, at its last arrival)
    arrivals: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def reencode(self) -> bool:
        return self.decision.fire

    @property
    def gain(self) -> float:
        return self.decision.gain


class OnlineHasher:
    """``clock`` (wall time by default) dates each observed batch: the age trigger and the learn lag."""

    def __init__(self, net: HashNet, settings: LearnSettings | None = None, *, seed: int = 0,
                 device: str = "cpu", require_drift: bool = False, learner: IncrementalHasher | None = None,
                 clock=time.time, **learner_kwargs):
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
        self._buffer: list[tuple[list, np.ndarray, list, bool, float]] = []
        self._buffered_labeled = 0
        # (observed at, labeled items) per batch drained but not learned yet, oldest first: a pair per
        # batch, not per item, so waiting items cost nothing beyond the learner's own bookkeeping
        self._arrivals: list[tuple[float, int]] = []
        self.clock = clock
        self.items_seen = self.labeled_seen = 0
        self.first_seen: float | None = None

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
        labeled, now = sum(1 for x in sets if x), self.clock()
        with self._lock:
            self._buffer.append((ids, np.asarray(codes), sets, frozen, now))
            self._buffered_labeled += 0 if frozen else labeled  # frozen ones are old codes
            self.items_seen += len(ids)
            self.labeled_seen += labeled
            self.first_seen = now if self.first_seen is None else self.first_seen

    def _drain(self) -> None:
        """Move observed items into the learner (caller holds ``_learner_lock``)."""
        with self._lock:
            buf, self._buffer, self._buffered_labeled = self._buffer, [], 0
        for ids, codes, sets, frozen, t in buf:
            self.learner.add_items(ids, codes, sets, frozen=frozen)
            labeled = 0
            for i, lab in zip(ids, sets):
                if lab:
                    self.reservoir.update(i, lab)
                    labeled += 1
            if labeled and not frozen:
                self._arrivals.append((t, labeled))

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
        s, n = self.settings, self.n_pending
        if n >= s.round_every:
            return True
        age = self.oldest_pending_age()
        return bool(s.round_max_age_s) and n >= s.round_min_items and age is not None and age >= s.round_max_age_s

    def oldest_pending_age(self) -> float | None:
        """Seconds the oldest labeled item not learned yet has waited (None: none waits)."""
        with self._lock:
            first = self._arrivals[0][0] if self._arrivals else next(
                (t for _, _, sets, frozen, t in self._buffer if not frozen and any(sets)), None)
        return None if first is None else self.clock() - first

    def cannot_learn(self) -> bool:
        """No labeled item seen among as many items as a round needs, or for as long as a round may wait:
        the stream gives the learner nothing, and the network it serves stays the initial one."""
        s = self.settings
        waited = self.first_seen is not None and s.round_max_age_s and self.clock() - self.first_seen >= s.round_max_age_s
        return self.labeled_seen == 0 and self.items_seen > 0 and (self.items_seen >= s.round_every or bool(waited))

    def _take_arrivals(self, n_learned: int) -> np.ndarray:
        log, self._arrivals = self._arrivals, []
        t = np.repeat(np.array([a for a, _ in log], np.float64), np.array([c for _, c in log], np.int64))
        return t[len(t) - n_learned:] if len(t) > n_learned else t  # the re-sent: their last arrival counts

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
            arrivals = self._take_arrivals(len(res.ids))
            t0 = time.perf_counter()
            live, cand = self.mi_live_and_candidate(fetch_images)
        decision = self.trigger.update(live, cand)
        return RoundReport(res, live, cand, decision, time.perf_counter() - t0, arrivals)

    def quarantine_pending(self) -> list:
        """After a failed round: the pending labeled items stay indexed but are never learned from
        (:meth:`DIHNLearner.quarantine_pending`); returns their ids."""
        with self._learner_lock:
            self._drain()
            self._arrivals = []
            return self.learner.quarantine_pending()

    def reencode(self, fetch_images: FetchImages, ids: Sequence | None = None) -> tuple[list, np.ndarray]:
        """Encode every known item (or ``ids``) with the current network; codes are stored as live."""
        with self._learner_lock:
            self._drain()
            return self.learner.reencode(fetch_images, ids)

    def apply_reencode(self, ids: Sequence, codes: np.ndarray) -> None:
        """Tell the learner the codes the index now holds after a re-encode done elsewhere.

        Not drained first: an item observed since the round is still waiting for its first one, and
        ``set_codes`` would freeze it; its buffered code is replaced instead. Items the learner holds as
        pending keep their status too, and ids it has not seen yet (stored, not observed) are skipped.
        """
        codes = np.asarray(codes)
        with self._learner_lock:
            at = {item_id: k for k, item_id in enumerate(ids)}
            for item_id in getattr(self.learner, "pending_ids", ()):
                at.pop(item_id, None)
            with self._lock:
                for b, (bids, bcodes, sets, frozen, t) in enumerate(self._buffer):
                    hits = [(j, at.pop(i)) for j, i in enumerate(bids) if i in at]
                    if hits:
                        bcodes = bcodes.copy()
                        bcodes[[j for j, _ in hits]] = codes[[k for _, k in hits]]
                        self._buffer[b] = (bids, bcodes, sets, frozen, t)
            known, rows = list(at), list(at.values())
            if not known:
                return
            try:
                self.learner.set_codes(known, codes[rows])
            except KeyError:  # stored and not observed yet: rare, so found one by one
                for item_id, k in zip(known, rows):
                    try:
                        self.learner.set_codes([item_id], codes[[k]])
                    except KeyError:
                        pass
