"""The worker's model follower: the learner's two topics turned into what a shard adopts.

``streamhash.models`` is read on a thread of its own (:class:`~streamhash.kafka.modelbus.ModelReader`, from
the start, no group); a version is handed over only once it parsed, came in order and its network loaded,
fit these model settings and encoded a probe (:func:`~streamhash.model.state.checked_model`). A version of
a shard's generation becomes its network; a higher generation is re-encoded into (the caller's re-encoder).
Records it refuses are counted and given to the poll thread, which dead-letters them (stage ``models``): the
dead-letter producer's batch belongs to that thread. The previous model keeps serving.

``streamhash.codes`` is co-partitioned with the images topic and consumed by the batch pipeline in the
worker's group; :meth:`ModelFollower.code_update` parses each record (stage ``codes`` when it is refused).

Which network encodes for a shard: the version its meta names, loaded once per process
(:class:`~streamhash.model.state.NetCache`) from the announcement just read or from a shard that stores it.
"""

from __future__ import annotations

import logging
import queue
import threading

from streamhash.config import KafkaSettings, ModelSettings
from streamhash.errors import InternalRecordRejected
from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelReader, latest, log_rejected, parse_code
from streamhash.model.hashnet import HashNet
from streamhash.model.state import NetCache, checked_model, stored_net

log = logging.getLogger("streamhash.worker")


class ModelFollower:
    def __init__(self, kafka: KafkaSettings, model: ModelSettings, device, *, key: bytes | None, shards):
        self.kafka, self.model, self.device, self.key, self.shards = kafka, model, device, key, shards
        self.announced: ModelAnnouncement | None = None  # the newest version on streamhash.models
        self.nets = NetCache(self._load_net)
        self._announcements: queue.SimpleQueue = queue.SimpleQueue()
        self._rejected: queue.SimpleQueue = queue.SimpleQueue()  # (record, error) to dead-letter
        self._reader: ModelReader | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        """Every version published so far (before any shard opens: it adopts the newest), then the thread."""
        self._reader = ModelReader(self.kafka, key=self.key, on_reject=self._rejected_record,
                                   check=lambda a: checked_model(a, self.model, self.device))
        self.announced = latest(self._reader.read_to_end())
        self._thread = threading.Thread(target=self._follow, name="models", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                for a in self._reader.poll(0.5):
                    self._announcements.put(a)
            except Exception as exc:  # the reader reconnects by itself; never let the follower die
                log.warning("reading %s: %r", self.kafka.models_topic, exc)
                self._stop.wait(1.0)

    def _rejected_record(self, record, exc: InternalRecordRejected) -> None:
        log_rejected(record, exc)
        self._rejected.put((record, exc))

    def newer(self, dead_letters) -> ModelAnnouncement | None:
        """On the poll thread: dead-letter what was refused, and return the newest version read since the last
        call if it is newer than the one announced (it becomes the announced one), else None."""
        while dead_letters is not None and not self._rejected.empty():
            dead_letters.send(*self._rejected.get())  # flushed with the next batch's checkpoint
        fresh = []
        while not self._announcements.empty():
            fresh.append(self._announcements.get())
        newest = latest(fresh)
        if newest is None or (self.announced is not None and newest.version <= self.announced.version):
            return None
        self.announced = newest  # its network is loaded on first use (_load_net)
        log.info("model version %d (generation %d%s) published by the learner", newest.version, newest.generation,
                 ", a re-encode" if newest.reencode else "")
        return newest

    def adopt(self, store) -> bool:
        """Make the announced version the shard's network if it is of the shard's generation and newer; True when
        the shard must be re-encoded into a higher generation instead."""
        a = self.announced
        if a is None:
            return False
        meta = store.read_meta()
        generation, version = int(meta["generation"]), int(meta["model_version"])
        if a.generation == generation and a.version > version:
            store.put_model(a.raw, make_current=True, version=a.version)
        return a.generation > generation

    def code_update(self, record) -> CodeUpdate:
        """A codes-topic record as an update, or InternalRecordRejected (stage ``codes``)."""
        return parse_code(record, self.model.bits // 8, self.key)

    def _load_net(self, version: int) -> HashNet:
        a = self.announced
        if a is not None and a.version == version:  # read from the models topic, maybe in no shard yet
            return a.net if a.net is not None else HashNet.from_bytes(a.raw, self.device)
        return stored_net((store for _, store in self.shards), version, self.device)

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._reader.close()
            self._thread = None
