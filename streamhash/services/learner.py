"""The worker's learner thread: DIHN rounds, MI-triggered re-encodes, model publication.

It owns an :class:`~streamhash.learn.online.OnlineHasher` fed by the ingest loop (``on_indexed``, which
only appends to a buffer) and never blocks polling. One round, in order:

1. ``learn_round``: train the network on Omega sampled from the store (images from LMDB blobs),
   learn the codes of the new labeled items by DCC; old codes stay frozen;
2. store the new model version; run the MIHash test on the reservoir (labeled items of the whole
   index, a never-learned hold-out among them): queries encoded by the new network against the index's
   codes as they are vs after the selective re-encode; the gain must beat its bootstrap noise bound
   (``streamhash_mi_gain_sigma``); the cost, stale inferred codes, is ``streamhash_reencode_cost_items``;
3. no re-encode: write the learned codes and make the new version current in one transaction
   (old codes are compatible by construction: the network was trained against them), then publish
   the new network to the ingest path;
4. re-encode (the MI gain exceeded threshold + mi_sigmas x sigma): write the learned codes, then build generation
   g+1 beside the live one: learned codes (frozen, DIHN) and codes the new network inferred already
   are copied, only the stale inferred ones decoded and encoded; catch up items ingested meanwhile
   (the last few inside the swap transaction), swap atomically with the new version, publish, then
   drop generation g.

A round is due after ``round_every`` labeled items or once the oldest has waited ``round_max_age_s``;
``streamhash_learn_lag_seconds`` times each item from its arrival here to its learned code stored. A
stream with no label at all cannot teach anything: the worker says so (a warning, and
``streamhash_learning_blocked{reason="no_labels"}`` at 1) rather than serve its initial network silently.

The learner holds no lock while it waits for LMDB: the store serialises its writers itself, and the
ingest path reads the published :class:`~streamhash.model.state.ModelState` without locking.
A round that fails quarantines the labeled items it was learning (they stay indexed with their
inferred codes, are never learned from) so the next round does not fail the same way.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from streamhash import metrics as m
from streamhash.errors import StoreError
from streamhash.index.store import GenerationBuilder
from streamhash.learn.online import OnlineHasher
from streamhash.model.hashnet import HashNet
from streamhash.records import ImageRecord, decode_image

log = logging.getLogger("streamhash.learner")


class LearnerThread(threading.Thread):
    def __init__(self, worker, *, chunk: int = 2048, catch_up_rounds: int = 3):
        super().__init__(name="learner", daemon=True)
        self.store, self.spec, self.state = worker.store, worker.spec, worker.state
        s = worker.settings
        self.settings, self.chunk, self.catch_up_rounds = s.learn, chunk, catch_up_rounds
        self.torch_threads = s.model.torch_threads
        net = self.state.current().net
        self.device = net.device  # the ingest path's device, CPU or CUDA
        self.hasher = OnlineHasher(HashNet.from_bytes(net.to_bytes()), s.learn, seed=s.model.seed, device=str(self.device))
        snap = self.store.snapshot()
        if snap.ids:
            # A restart: learned codes stay frozen; quarantined ones keep their inferred codes, out of
            # learning; labeled items indexed but never learned (the worker stopped before their round)
            # are pending again, so the first round learns them — but for the hold-out, the same items
            # as before (chosen by id), which keeps its inferred codes.
            labels = [set(x) if x else None for x in snap.labels]
            unlabeled = np.array([x is None for x in labels], bool)
            learned = np.flatnonzero(snap.learned | (unlabeled & ~snap.quarantined))
            quarantined = np.flatnonzero(snap.quarantined & ~snap.learned)
            new = np.setdiff1d(np.arange(len(snap.ids)), np.concatenate([learned, quarantined]))
            for rows, frozen, was_learned in ((learned, True, True), (quarantined, True, False), (new, False, False)):
                if len(rows):
                    self.hasher.observe([snap.ids[i] for i in rows], snap.codes[rows], [labels[i] for i in rows],
                                        frozen=frozen, learned=was_learned)
            n_new = self.hasher.n_pending
            if n_new:
                log.info("%d labeled items were indexed but not learned before the restart: learning them next", n_new)
        self.stop_event, self.round_requested = threading.Event(), threading.Event()
        self.blocked = False
        m.LEARNING_BLOCKED.labels(reason="no_labels").set(0)

    # ingest side: cheap, called on the polling thread after each commit
    def on_indexed(self, records: list[ImageRecord], codes: np.ndarray, seqs: list[int]) -> None:
        self.hasher.observe([r.id for r in records], codes, [set(r.labels) if r.labels else None for r in records])

    def request_round(self) -> None:
        self.round_requested.set()

    def fetch_images(self, ids: list[str]) -> np.ndarray:
        blobs = self.store.get_blobs(ids)
        for item_id, got in zip(ids, blobs):
            if got is None:
                raise StoreError(f"item {item_id!r} has no stored image")
        return self.decode(blobs)

    def decode(self, blobs: list[tuple[bytes, str]]) -> np.ndarray:
        """Stored (bytes, content type) pairs -> the network's input, as the worker decoded them on ingest."""
        out = [decode_image(raw, ctype, self.spec) for raw, ctype in blobs]
        return np.stack(out) if out else np.zeros((0, *self.spec.shape), np.uint8)

    def run(self) -> None:
        import torch

        torch.set_num_threads(self.torch_threads)
        while not self.stop_event.is_set():
            self.check_blocked()
            if not (self.hasher.ready() or self.round_requested.is_set()):
                self.stop_event.wait(0.5)
                continue
            self.round_requested.clear()
            if self.hasher.n_pending == 0:
                log.info("learning round requested but no new labeled items: the model stays at version %d",
                         self.state.current().version)
                continue
            try:
                self.one_round()
            except Exception:  # a failed round must not kill ingestion, nor fail again on the same items
                m.LEARNING_ROUND_FAILURES.inc()
                ids = self.hasher.quarantine_pending()
                self.store.quarantine(ids)  # a restart must not learn from them again
                m.LEARNING_QUARANTINED.inc(len(ids))
                log.exception("learning round failed; %d pending labeled items quarantined (kept indexed with "
                              "their inferred codes, not learned from), e.g. %s", len(ids), ids[:5])
                self.stop_event.wait(1.0)

    def check_blocked(self) -> None:
        """Warn once when the stream has shown no label for a round's worth of items or time; a gauge
        rather than the log alone, so an alert can see it (and see it clear when labels arrive)."""
        blocked = self.hasher.cannot_learn()
        if blocked == self.blocked:
            return
        self.blocked = blocked
        m.LEARNING_BLOCKED.labels(reason="no_labels").set(int(blocked))
        if blocked:
            log.warning("no labeled item among the %d indexed: the worker cannot learn and serves its initial "
                        "network (model version %d) until labeled messages arrive", self.hasher.items_seen,
                        self.state.current().version)
        else:
            log.info("labeled items arrived: learning starts")

    def one_round(self) -> None:
        t0 = time.perf_counter()
        report = self.hasher.learn_round(self.fetch_images)
        m.LEARNING_ROUNDS.inc()
        m.LEARNING_ROUND_SECONDS.observe(time.perf_counter() - t0)
        m.INDEX_MI.set(report.mi_live)
        m.CANDIDATE_MI.set(report.mi_candidate)
        m.MI_GAIN_SIGMA.set(report.sigma)
        m.REENCODE_COST_ITEMS.set(report.cost)
        if report.decision.drift:
            m.DRIFT_DETECTIONS.inc()
        net = self.hasher.snapshot_net().to(self.device)
        version = self.store.put_model(net.to_bytes())
        log.info("round %d: %d codes learned (%d changed), MI live %.4f candidate %.4f gain %+.4f (bound %.4f, "
                 "sigma %.4f, %d reservoir codes would change) -> %s (cost: ~%d stale inferred codes)",
                 report.round.round, len(report.round.ids), report.round.changed, report.mi_live,
                 report.mi_candidate, report.gain, report.decision.bound, report.sigma,
                 report.mi.changed if report.mi else 0, "re-encode" if report.reencode else "keep codes", report.cost)
        if report.reencode:
            m.REENCODE_TRIGGERS.inc()
            with m.REENCODE_SECONDS.time():
                # first: the build copies learned codes, so these survive it (and a restart knows them learned)
                self.store.put_codes(report.round.ids, report.round.codes)
                self.observe_lag(report.arrivals)
                self.reencode(net, version)
        else:
            self.store.put_codes(report.round.ids, report.round.codes, model_version=version)
            self.observe_lag(report.arrivals)
            self.state.publish(net, version=version, generation=self.state.current().generation)
        m.MODEL_VERSION.labels(process="worker").set(version)

    def observe_lag(self, arrivals: np.ndarray) -> None:
        for lag in (self.hasher.clock() - arrivals).tolist():
            m.LEARN_LAG_SECONDS.observe(max(lag, 0.0))

    def reencode(self, net: HashNet, version: int) -> None:
        # The builder hands over at most `chunk` ids at a time; the stragglers' blobs come from inside
        # the swap transaction.
        builder = GenerationBuilder(self.store, encode_ids=lambda ids: net.encode(self.fetch_images(ids)),
                                    encode_blobs=lambda blobs: net.encode(self.decode(blobs)),
                                    chunk=self.chunk, catch_up_rounds=self.catch_up_rounds)
        gen = builder.build(version)
        self.state.publish(net, version=version, generation=gen)  # before the drop: ingestion leaves the old one first
        builder.drop_replaced()
        m.REENCODED_IMAGES.inc(builder.images_reencoded)
        snap = self.store.snapshot()
        inferred = np.flatnonzero(~snap.learned)  # the learned codes were copied: the learner holds them already
        self.hasher.apply_reencode([snap.ids[i] for i in inferred], snap.codes[inferred])
        m.INDEX_GENERATION.labels(process="worker").set(gen)
        log.info("generation %d with model %d: %d images re-encoded (streamhash_reencoded_images_total), "
                 "%d codes kept (learned, or inferred by this model already)", gen, version,
                 builder.images_reencoded, builder.codes_copied)

    def stop(self) -> None:
        self.stop_event.set()
