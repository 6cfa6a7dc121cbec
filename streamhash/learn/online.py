"""What the learner process runs: an incremental hasher (DIHN by default) + reservoir + MI re-encode trigger.

Wiring (streamhash/services/learner/app.py is the real one)::

    hasher = OnlineHasher(net, settings.learn, seed=settings.model.seed)
    # items the shards committed (the learner's ShardFeed; cheap, never blocks on a round):
    hasher.observe(ids, packed_codes, labels)          # labels: list of label sets / ints, None = unlabeled
    # the learner's loop:
    if hasher.ready():                                  # round_every labeled items, or the oldest waited round_max_age_s
        report = hasher.learn_round(fetch_images)       # fetch_images(ids) -> uint8 images from the store's blobs
        net = hasher.snapshot_net()                     # a copy to publish; the hasher keeps training its own
        # publish `net` (a new generation when report.reencode: the workers re-encode their shards, learned
        # codes copied), then the learned codes report.round.ids / .codes; a re-encoded shard's inferred
        # codes come back as hasher.apply_reencode(ids, codes)
        lags = hasher.clock() - report.arrivals         # per learned item, arrival -> learned code

Another incremental learner plugs in through ``learner=`` (any :class:`~streamhash.learn.base.IncrementalHasher`:
the calls this class makes on it are the contract).

The re-encode test is MIHash's (Cakir et al. 2017): compare the index as it is with the index as it
would be after the selective re-encode. The reservoir samples uniformly from every labeled item
observed — learned ones and a labeled *hold-out* (``holdout_fraction`` of the labeled items, chosen by
a hash of the id so a restart picks the same ones) whose images never enter Omega, so the network is
never trained on them and encodes them as it encodes an unlabeled item. The hold-out's codes in the
index are learned like every labeled item's (DCC needs labels, not images: a label is never wasted);
the test keeps, for each hold-out item in the reservoir, its *shadow* — the inferred code the index
would hold for it were it unlabeled: its code at arrival, replaced by the current network's encoding
at each re-encode. Each reservoir item is a query, encoded by the current network; the database is the
other reservoir items, once with their live codes (learned codes; shadows; quarantined items' inferred
codes) and once with the candidate codes (learned codes unchanged, inferred ones replaced by the
current network's encodings). The gain is the mean per-query difference of exact I(D; C)
(:func:`~streamhash.learn.mi.mi_gain`), its noise ``sigma`` a bootstrap over the items (a resample weighs an
item as a query and in the database); the trigger fires iff ``gain > mi_threshold + mi_sigmas * sigma`` and
the index holds an inferred code to re-encode. Every inferred code predates the network a round has just
trained, so the re-encode's cost — the images it decodes and encodes — is the number of inferred codes
(:attr:`OnlineHasher.n_inferred`, an estimate: a re-sent id counts twice): the unlabeled and quarantined items.
A learner restarted from the store knows no shadows of the hold-out learned before it: those stand in the reservoir as the
learned items they are, and the arrivals after the restart make the next sensor.
"""

from __future__ import annotations

import hashlib
import inspect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from streamhash.config import LearnSettings
from streamhash.learn.base import IncrementalHasher
from streamhash.learn.dihn import DIHNLearner, FetchImages, RoundAbandoned, RoundResult, ShouldStop, _ItemIds
from streamhash.learn.labels import normalise_label_sets
from streamhash.learn.mi import MIGain, mi_gain
from streamhash.learn.reservoir import Reservoir
from streamhash.learn.trigger import MITrigger, TriggerDecision
from streamhash.model.hashnet import HashNet


def in_holdout(ids: Sequence, fraction: float) -> np.ndarray:
    """Whether each id is in the labeled hold-out: the first 8 bytes of BLAKE2b of the id (str or int,
    typed as the learner keys them) read as a fraction of 2**64, below ``fraction``. The same ids in
    every process and after every restart (Python's ``hash`` of a str is salted per process)."""
    ids = list(ids)
    if fraction <= 0 or not ids:
        return np.zeros(len(ids), bool)
    h = np.fromiter((int.from_bytes(hashlib.blake2b(_ItemIds.key(i), digest_size=8).digest(), "little") for i in ids),
                    np.uint64, len(ids))
    return h < np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))


def _takes_should_stop(learner) -> bool:
    """Whether the learner's rounds can be abandoned (DIHN's can; another learner's round then runs to its end)."""
    try:
        return "should_stop" in inspect.signature(learner.learn_round).parameters
    except (TypeError, ValueError):
        return False


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
    mi: MIGain | None = None  # the whole comparison (queries, codes it would change)

    @property
    def reencode(self) -> bool:
        return self.decision.fire

    @property
    def gain(self) -> float:
        return self.decision.gain

    @property
    def sigma(self) -> float:
        return self.decision.sigma

    @property
    def cost(self) -> int:
        """Estimated images a re-encode decodes and encodes (the stale inferred codes)."""
        return self.decision.cost


class OnlineHasher:
    """``clock`` (wall time by default) dates each observed batch: the age trigger and the learn lag."""

    def __init__(self, net: HashNet, settings: LearnSettings | None = None, *, seed: int = 0,
                 device: str = "cpu", require_drift: bool = False, learner: IncrementalHasher | None = None,
                 clock=time.time, **learner_kwargs):
        s = settings or LearnSettings()
        self.settings = s
        if learner is None:
            kw = {"gamma": s.gamma, "mu": s.mu, "omega": s.omega, "epochs": s.epochs, "iters": s.iters, "lr": s.lr,
                  "batch_size": s.batch_size, "new_fraction": s.new_fraction, "seed": seed, "device": device,
                  "fresh_optimizer": s.fresh_optimizer, "relearn": s.relearn, "restart_head": s.restart_head,
                  "restart_factor": s.restart_factor}
            learner = DIHNLearner(net, **{**kw, **learner_kwargs})
        self.learner = learner
        self.seed = int(seed)
        # payload per labeled item: (label set, whether it stands for an inferred code, its shadow: the
        # hold-out's inferred code as bytes, None where the learner's code is the live one)
        # With reservoir_strata, the labeled items with inferred codes (hold-out, quarantined) get a reservoir
        # of their own with half the slots: the stale codes a re-encode fixes are inferred, a small share of
        # the labeled items; :meth:`mi_test` weighs each stratum back to its share of the whole index.
        strata = s.reservoir_strata
        self.reservoir = Reservoir(s.reservoir_size - s.reservoir_size // 2 if strata else s.reservoir_size, seed=seed)
        self.inferred_reservoir = Reservoir(max(s.reservoir_size // 2, 1), seed=seed + 1) if strata else None
        self.trigger = MITrigger(s.mi_threshold, require_drift=require_drift, sigmas=s.mi_sigmas)
        self._lock = threading.Lock()  # guards the buffer (observe runs on the ingest thread)
        self._learner_lock = threading.Lock()  # the learner is single-threaded: a round, a drain, a re-encode
        # (ids, codes, label sets, frozen, observed at, inferred): ``inferred`` marks labeled items that stand
        # for inferred codes in the test — the hold-out (new ones), or old codes never learned (quarantined)
        self._buffer: list[tuple[list, np.ndarray, list, bool, float, np.ndarray]] = []
        self._buffered_labeled = 0
        # (observed at, labeled items) per batch drained but not learned yet, oldest first: a pair per
        # batch, not per item, so waiting items cost nothing beyond the learner's own bookkeeping
        self._arrivals: list[tuple[float, int]] = []
        self.clock = clock
        self.items_seen = self.labeled_seen = 0
        self.n_inferred = 0  # items drained whose stored code stays a network output (unlabeled, quarantined)
        self.holdout_seen = 0
        self.first_seen: float | None = None
        self.rounds = 0

    @property
    def net(self) -> HashNet:
        return self.learner.net

    def snapshot_net(self) -> HashNet:
        return HashNet.from_bytes(self.learner.net.to_bytes())

    def observe(self, ids: Sequence, codes: np.ndarray, labels=None, *, frozen: bool = False, learned: bool = True) -> None:
        """Items just indexed (ids, their packed codes, labels). Labeled ones are learned next round; the
        hold-out (``holdout_fraction``, by id) too, but its images never train the network, and its code at
        arrival is the shadow the re-encode test compares.

        ``frozen=True`` registers them as old codes instead, e.g. when rebuilding from the store: learned
        ones (``learned=True``) or, with ``learned=False``, inferred codes that must never be learned
        from (quarantined items: they leave Gamma, as :meth:`quarantine_pending` makes them)."""
        ids = list(ids)
        sets = normalise_label_sets(labels) if labels is not None else [frozenset()] * len(ids)
        has = np.fromiter((bool(x) for x in sets), bool, len(sets))
        if frozen:
            inferred = has if not learned else np.zeros(len(ids), bool)
        else:
            inferred = has & in_holdout(ids, self.settings.holdout_fraction)
        labeled, now = int(has.sum()), self.clock()
        with self._lock:
            self._buffer.append((ids, np.asarray(codes), sets, frozen, now, inferred))
            self._buffered_labeled += 0 if frozen else labeled  # frozen ones are old codes
            self.items_seen += len(ids)
            self.labeled_seen += labeled
            self.first_seen = now if self.first_seen is None else self.first_seen

    def _drain(self) -> None:
        """Move observed items into the learner (caller holds ``_learner_lock``)."""
        with self._lock:
            buf, self._buffer, self._buffered_labeled = self._buffer, [], 0
        for ids, codes, sets, frozen, t, inferred in buf:
            if frozen:  # old codes; the inferred ones (quarantined) are never learned from: unlabeled to the learner
                learn_sets = [frozenset() if x else lab for lab, x in zip(sets, inferred.tolist())] if inferred.any() else sets
                self.learner.add_items(ids, codes, learn_sets, frozen=True)
            else:
                self.learner.add_items(ids, codes, sets, frozen=False, held=inferred)
            labeled = 0
            for i, code, lab, x in zip(ids, codes, sets, inferred.tolist()):
                if lab:
                    shadow = code.tobytes() if x and not frozen else None
                    (self.inferred_reservoir if x and self.inferred_reservoir is not None else self.reservoir).update(i, (lab, x, shadow))
                    labeled += 1
                self.n_inferred += (x and frozen) or not lab
            self.holdout_seen += 0 if frozen else int(inferred.sum())
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
                (t for _, _, sets, frozen, t, _ in self._buffer if not frozen and any(sets)), None)
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

    def _samples(self) -> list[Reservoir]:
        return [self.reservoir] + ([self.inferred_reservoir] if self.inferred_reservoir is not None else [])

    def mi_test(self, fetch_images: FetchImages) -> MIGain:
        """The MIHash comparison on the reservoir (caller holds ``_learner_lock``, after a round): queries
        encoded by the current network; database = the reservoir's live codes vs its codes after the
        selective re-encode (learned ones kept, inferred ones replaced by the queries' encodings)."""
        return self._compare(fetch_images)[0]

    def _compare(self, fetch_images: FetchImages) -> tuple[MIGain, np.ndarray | None]:
        """The comparison and the queries' codes (None: too few items to compare)."""
        samples = self._samples()
        ids = [i for r in samples for i in r.ids]
        if len(ids) < 2:
            return MIGain(0.0, 0.0, 0.0, 0.0, len(ids), 0), None
        payloads = [p for r in samples for p in r.payloads]
        labels = [p[0] for p in payloads]
        inferred = np.array([p[1] for p in payloads], bool)
        db_weights = self._strata_weights(inferred) if self.inferred_reservoir is not None else None
        live = self.learner.codes(ids)
        for k, p in enumerate(payloads):
            if p[2] is not None:
                live[k] = np.frombuffer(p[2], np.uint8)
        query = self.learner.encode(np.asarray(fetch_images(ids)))
        cand = live.copy()
        cand[inferred] = query[inferred]
        g = mi_gain(query, live, cand, labels, self.learner.bits, n_boot=self.settings.mi_bootstrap,
                    seed=self.seed * 1_000_003 + self.rounds, db_weights=db_weights)
        return g, query

    def _refresh_shadows(self, query: np.ndarray) -> None:
        """After a re-encode: the hold-out's shadows become what the re-encode gives the inferred codes,
        the current network's encodings (``query``, in :meth:`_compare`'s order)."""
        k = 0
        for r in self._samples():
            for j, p in enumerate(r.payloads):
                if p[2] is not None:
                    r.payloads[j] = (p[0], p[1], query[k].tobytes())
                k += 1

    def _strata_weights(self, inferred: np.ndarray) -> np.ndarray | None:
        """Per sampled item, its provenance's share of the index (inferred: unlabeled items too) over its
        share of the sample, scaled to a mean of 1."""
        in_index = np.array([max(self.items_seen - self.n_inferred, 0), self.n_inferred], np.float64)
        in_sample = np.array([(~inferred).sum(), inferred.sum()], np.float64)
        w = np.where(in_sample > 0, in_index / np.maximum(in_sample, 1), 0.0)[inferred.astype(int)]
        return w * (len(w) / w.sum()) if w.sum() > 0 else None

    def mi_live_and_candidate(self, fetch_images: FetchImages) -> tuple[float, float]:
        with self._learner_lock:
            g = self.mi_test(fetch_images)
        return g.live, g.candidate

    def learn_round(self, fetch_images: FetchImages, *, test: bool = True,
                    should_stop: ShouldStop | None = None) -> RoundReport:
        """One round, then the re-encode test (``test=False``: skipped, the decision is not to re-encode;
        for a caller whose re-encode policy does not depend on it). ``should_stop`` (asked within the round, and
        before the test) returning True raises :class:`RoundAbandoned` and leaves the hasher mid-round: for a
        process about to exit, which publishes nothing of it."""
        with self._learner_lock:
            self._drain()
            res = (self.learner.learn_round(fetch_images, should_stop=should_stop) if _takes_should_stop(self.learner)
                   else self.learner.learn_round(fetch_images))
            if should_stop is not None and should_stop():
                raise RoundAbandoned("learning round abandoned before its re-encode test: stop requested")
            self.rounds += 1
            arrivals = self._take_arrivals(len(res.ids))
            t0 = time.perf_counter()
            g, query = self._compare(fetch_images) if test else (MIGain(0.0, 0.0, 0.0, 0.0, 0, 0), None)
            cost = self.n_inferred  # every inferred code predates the network this round trained
            decision = (self.trigger.update(g.live, g.candidate, g.sigma, cost) if test else
                        TriggerDecision(0.0, 0.0, 0.0, self.trigger.threshold, False, False, False, cost=cost))
            if decision.fire and query is not None:
                self._refresh_shadows(query)
        return RoundReport(res, g.live, g.candidate, decision, time.perf_counter() - t0, arrivals, g)

    def quarantine_pending(self) -> list:
        """After a failed round: the pending labeled items stay indexed but are never learned from
        (:meth:`DIHNLearner.quarantine_pending`); returns their ids."""
        with self._learner_lock:
            self._drain()
            self._arrivals = []
            ids = self.learner.quarantine_pending()
            self.n_inferred += len(ids)
            gone = set(ids)
            for r in self._samples():  # they keep inferred codes now: the index's, which the learner holds
                for k, item_id in enumerate(r.ids):
                    if item_id in gone:
                        r.payloads[k] = (r.payloads[k][0], True, None)
            return ids

    def forget(self, ids: Sequence) -> None:
        """Items removed from the index (tombstones): out of the learner's bookkeeping and the MI reservoir; a
        round never fetches their images. Buffered ones are drained first, so none comes back after."""
        with self._learner_lock:
            self._drain()
            self.learner.forget(ids)
            for r in self._samples():
                r.discard(ids)

    def apply_reencode(self, ids: Sequence, codes: np.ndarray) -> None:
        """Tell the learner the codes the index now holds after a re-encode done elsewhere.

        Not drained first: an item observed since the round is still waiting for its first one, and
        ``set_codes`` would freeze it; its buffered code is replaced instead. Items the learner holds as
        pending keep their status too, and ids it has not seen yet (stored, not observed) are skipped.
        """
        codes = np.asarray(codes)
        with self._learner_lock:
            at = {item_id: k for k, item_id in enumerate(ids)}
            for item_id in self.learner.pending_ids:
                at.pop(item_id, None)
            with self._lock:
                for b, (bids, bcodes, sets, frozen, t, inf) in enumerate(self._buffer):
                    hits = [(j, at.pop(i)) for j, i in enumerate(bids) if i in at]
                    if hits:
                        bcodes = bcodes.copy()
                        bcodes[[j for j, _ in hits]] = codes[[k for _, k in hits]]
                        self._buffer[b] = (bids, bcodes, sets, frozen, t, inf)
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
