"""The worker's learner thread: DIHN rounds, MI-triggered re-encodes, model publication.

It owns an :class:`~streamhash.learn.online.OnlineHasher` fed by the ingest loop (``on_indexed``, which
only appends to a buffer) and never blocks polling. One round, in order:

1. ``learn_round``: train the network on Omega sampled from the store (images from LMDB blobs),
   learn the codes of the new labeled items by DCC; old codes stay frozen;
2. store the new model version; compare the MI of live and candidate codes on the reservoir;
3. no re-encode: write the learned codes and make the new version current in one transaction
   (old codes are compatible by construction: the network was trained against them), then
   let the ingest path encode with the new network;
4. re-encode (the MI gain exceeded the threshold): build generation g+1 from every stored image
   beside the live one, catch up items ingested meanwhile, swap atomically with the new version
   while holding the worker's model lock (so no batch is encoded with the old network after it),
   then drop generation g.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from streamhash import metrics as m
from streamhash.errors import StoreError
from streamhash.learn.online import OnlineHasher
from streamhash.model.hashnet import HashNet
from streamhash.records import ImageRecord, decode_image

log = logging.getLogger("streamhash.learner")


class LearnerThread(threading.Thread):
    def __init__(self, worker, *, chunk: int = 2048):
        super().__init__(name="learner", daemon=True)
        self.worker, self.store, self.spec = worker, worker.store, worker.spec
        s = worker.settings
        self.settings, self.chunk = s.learn, chunk
        self.hasher = OnlineHasher(HashNet.from_bytes(worker.net.to_bytes()), s.learn, seed=s.model.seed,
                                   device=str(worker.net.device))
        snap = self.store.snapshot()
        if snap.ids:  # a restart: everything already stored is "old" and stays frozen
            self.hasher.observe(snap.ids, snap.codes, [set(x) if x else None for x in snap.labels], frozen=True)
        self.stop_event, self.round_requested = threading.Event(), threading.Event()

    # ingest side: cheap, called on the polling thread after each commit
    def on_indexed(self, records: list[ImageRecord], codes: np.ndarray, seqs: list[int]) -> None:
        self.hasher.observe([r.id for r in records], codes, [set(r.labels) if r.labels else None for r in records])

    def request_round(self) -> None:
        self.round_requested.set()

    def fetch_images(self, ids: list[str]) -> np.ndarray:
        out = []
        for item_id, got in zip(ids, self.store.get_blobs(ids)):
            if got is None:
                raise StoreError(f"item {item_id!r} has no stored image")
            out.append(decode_image(got[0], got[1], self.spec))
        return np.stack(out) if out else np.zeros((0, *self.spec.shape), np.uint8)

    def run(self) -> None:
        import torch

        torch.set_num_threads(self.worker.settings.model.torch_threads)
        while not self.stop_event.is_set():
            if not (self.hasher.ready() or self.round_requested.is_set()):
                self.stop_event.wait(0.5)
                continue
            self.round_requested.clear()
            try:
                self.one_round()
            except Exception:  # a failed round must not kill ingestion; it is logged and retried later
                log.exception("learning round failed")
                self.stop_event.wait(5.0)

    def one_round(self) -> None:
        t0 = time.perf_counter()
        report = self.hasher.learn_round(self.fetch_images)
        m.LEARNING_ROUNDS.inc()
        m.LEARNING_ROUND_SECONDS.observe(time.perf_counter() - t0)
        m.INDEX_MI.set(report.mi_live)
        m.CANDIDATE_MI.set(report.mi_candidate)
        if report.decision.drift:
            m.DRIFT_DETECTIONS.inc()
        net = self.hasher.snapshot_net().to(self.worker.net.device)  # the ingest path's device, CPU or CUDA
        version = self.store.put_model(net.to_bytes())
        log.info("round %d: %d codes learned (%d changed), MI live %.4f candidate %.4f gain %+.4f -> %s",
                 report.round.round, len(report.round.ids), report.round.changed, report.mi_live,
                 report.mi_candidate, report.gain, "re-encode" if report.reencode else "keep codes")
        if report.reencode:
            m.REENCODE_TRIGGERS.inc()
            with m.REENCODE_SECONDS.time():
                self.reencode(net, version)
        else:
            with self.worker.model_lock:
                self.store.put_codes(report.round.ids, report.round.codes, model_version=version)
                self.worker.net, self.worker.model_version = net, version
        m.MODEL_VERSION.labels(process="worker").set(version)

    def _encode_ids(self, net: HashNet, ids: list[str]) -> np.ndarray:
        parts = [net.encode(self.fetch_images(ids[i:i + self.chunk])) for i in range(0, len(ids), self.chunk)]
        return np.concatenate(parts) if parts else np.zeros((0, self.store.code_bytes), np.uint8)

    def reencode(self, net: HashNet, version: int) -> None:
        gen, watermark = self.store.begin_generation()
        ids = self.store.snapshot().ids
        all_codes = []
        for i in range(0, len(ids), self.chunk):
            part = ids[i:i + self.chunk]
            codes = self._encode_ids(net, part)
            self.store.put_generation_codes(gen, part, codes)
            all_codes.append(codes)
        for _ in range(10):  # items ingested while building; converges as the window shrinks
            missing = self.store.ids_missing_from(gen, watermark)
            codes = self._encode_ids(net, missing)
            with self.worker.model_lock:
                try:
                    old = self.store.swap_generation(gen, version, missing, codes)
                except StoreError as exc:
                    log.info("re-encode catch-up: %s", exc)
                    continue
                self.worker.net, self.worker.model_version, self.worker.generation = net, version, gen
            break
        else:
            raise StoreError(f"generation {gen} could not catch up with ingestion")
        self.store.drop_generation(old)
        snap = self.store.snapshot()
        self.hasher.apply_reencode(snap.ids, snap.codes)
        m.INDEX_GENERATION.labels(process="worker").set(gen)
        log.info("re-encoded %d items into generation %d with model %d", len(snap.ids), gen, version)

    def stop(self) -> None:
        self.stop_event.set()
