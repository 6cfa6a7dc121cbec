"""The ingest worker (``streamhash worker``, ``streamhash-worker``).

One loop per batch, in this order (the checkpoint order that makes delivery effectively-once):

1. **poll** a batch of image messages;
2. **parse** each one through :mod:`streamhash.records`; rejects go to the dead-letter producer;
3. **encode** the valid images with the current hash network;
4. **flush dead letters**: a rejected message is durable in the DLQ before its offset can be passed;
5. **LMDB transaction**: items, codes, blobs, hash tables and ``(topic, partition) -> next offset``;
6. **commit Kafka offsets** (only after 5, so a crash between 5 and 6 is repaired on restart by
   seeking to the LMDB offsets, which are ahead);
7. **notify listeners** (the learner thread) of the labeled items just indexed.

Polling never waits on learning: listeners must hand work to their own thread.
SIGTERM or a first SIGINT drains the batch in hand, commits and leaves the group; a second SIGINT
exits at once (what was not committed is consumed again by the next owner, never lost).

A failure while handling one message (parse, decode, encode) sends that message to the DLQ and never
stops the partition. A log that is behind the stored offset (the broker's log was reset, or the
topic deleted and re-created) is detected and consumed again from its start: re-sent ids overwrite.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import (
    EXIT_CANTCREAT, EXIT_OK, EXIT_TEMPFAIL, EXIT_USAGE, GenerationChanged, RecordRejected, StoreFullError,
    StoreLockedError,
)
from streamhash.index.store import ItemWrite, Store
from streamhash.kafka.dlq import DeadLetters
from streamhash.kafka.produce import make_producer
from streamhash.kafka.topics import ensure_topics
from streamhash.memory import pin_malloc_mmap_threshold
from streamhash.model.hashnet import HashNet, HashNetConfig, resolve_device
from streamhash.model.state import ModelState
from streamhash.records import ImageRecord, ImageSpec, parse_message

log = logging.getLogger("streamhash.worker")


class IngestListener(Protocol):
    """Told about every committed batch; must return quickly (hand work to its own thread)."""

    def on_indexed(self, records: list[ImageRecord], codes: np.ndarray, seqs: list[int]) -> None: ...


class _TrackAssignment(ConsumerRebalanceListener):
    """Records assignments; the poll thread reconciles them with LMDB (kafka-python 3 runs listeners on
    its IO thread, where the blocking ``committed()`` call is not allowed)."""

    def __init__(self, worker: "IngestWorker"):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        m.ASSIGNED_PARTITIONS.set(0)
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned):
        self.worker.newly_assigned.update(assigned)
        m.ASSIGNED_PARTITIONS.set(len(assigned))
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


def load_or_create_model(store: Store, settings: Settings) -> tuple[int, HashNet]:
    """The store's current model, or a freshly seeded one saved as version 1."""
    version, raw = store.get_model()
    device = resolve_device(settings.model.device)
    if raw is None:
        mc = settings.model
        net = HashNet(HashNetConfig(bits=mc.bits, backbone=mc.backbone, image_size=mc.image_size, channels=mc.channels, seed=mc.seed))
        version = store.put_model(net.to_bytes(), make_current=True)
        log.info("created initial model version %d (%s, %d bits)", version, mc.backbone, mc.bits)
        return version, net.to(device)
    return version, HashNet.from_bytes(raw, device)


@dataclass
class _Prepared:
    valid: list[ImageRecord]
    sources: list  # the Kafka record of each valid one, to dead-letter it if it cannot be encoded
    stamps: list[float]
    next_offsets: dict[tuple[str, int], int]
    codes: Future  # -> (generation, model version, np.ndarray (len(valid), bits/8))


class IngestWorker:
    def __init__(self, settings: Settings, listeners: list[IngestListener] | None = None,
                 stopping: threading.Event | None = None):
        self.settings = settings
        s = settings
        torch.set_num_threads(s.model.torch_threads)
        self.spec = ImageSpec.from_settings(s)
        self.store = Store(
            s.store.path, bits=s.model.bits, shard=s.store.shard, backbone=s.model.backbone,
            initial_map_size=s.store.initial_map_size_bytes, max_map_size=s.store.max_map_size_bytes,
            multihash_tables=s.store.multihash_tables, map_growth_factor=s.store.map_growth_factor,
        )
        self.store.abandon_pending_generation()  # a re-encode interrupted by a crash starts over
        version, net = load_or_create_model(self.store, s)
        self.state = ModelState(net, version=version, generation=int(self.store.read_meta()["generation"]))
        self.listeners = list(listeners or [])
        self.stopping = stopping or threading.Event()
        self.applied = self.store.offsets()  # (topic, partition) -> next offset already in LMDB; we are its only writer
        self.topic_ids = self.store.topic_ids()  # topic -> the broker's topic id when its offsets were stored
        self.newly_assigned: set[TopicPartition] = set()
        # OpenMP thread counts are per calling thread: set it where torch runs.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder", initializer=torch.set_num_threads,
                                          initargs=(s.model.torch_threads,))
        self.consumer: KafkaConsumer | None = None
        self.dead_letters: DeadLetters | None = None
        m.MODEL_VERSION.labels(process="worker").set(version)
        m.INDEX_GENERATION.labels(process="worker").set(self.state.current().generation)
        m.INDEX_ITEMS.labels(process="worker").set(self.store.count())

    # ------------------------------------------------------------------ set-up
    def connect(self) -> None:
        k = self.settings.kafka
        ensure_topics(k)
        self.dead_letters = DeadLetters(make_producer(k, linger_ms=5), k.dlq_topic)
        self.consumer = KafkaConsumer(
            **k.client_kwargs(), group_id=k.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms, max_poll_records=k.max_poll_records,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            fetch_max_bytes=k.fetch_max_bytes, max_partition_fetch_bytes=max(k.fetch_max_bytes // 4, 1 << 20),
            client_id=f"streamhash-worker-{self.settings.store.shard}",
        )
        self.consumer.subscribe([k.topic], listener=_TrackAssignment(self))

    # ------------------------------------------------------------------ loop
    def run(self, *, max_idle_s: float | None = None) -> int:
        """Consume until stopped (or idle for ``max_idle_s``); return a process exit code.

        Two batches are in flight: while batch *i* is encoded on the encoder thread (torch releases
        the GIL), this thread polls and parses batch *i+1*; batch *i* is then written and committed
        before *i+1* is, so the checkpoint order above holds batch by batch.
        """
        if self.consumer is None:
            self.connect()
        last_data = time.monotonic()
        in_flight: _Prepared | None = None
        try:
            while not self.stopping.is_set():
                # With a batch in flight, only take what is already fetched: never hold it back for a wait.
                records = self._poll(0 if in_flight else self.settings.worker.poll_timeout_ms)
                prepared = self.prepare(records) if records else None
                if in_flight is not None:
                    self.finish_with_retry(in_flight)
                in_flight = prepared
                if records:
                    last_data = time.monotonic()
                elif max_idle_s is not None and time.monotonic() - last_data > max_idle_s:
                    break
            if in_flight is not None:
                self.finish_with_retry(in_flight)
        except (StoreFullError, KafkaError) as exc:  # the batch's retries are spent
            log.error("stopping: %r. Nothing was lost: offsets of unwritten messages were not committed.", exc)
            return EXIT_TEMPFAIL  # a supervisor should restart with back-off, not in a tight loop
        finally:
            self.close()
        return EXIT_OK

    def _poll(self, timeout_ms: int) -> list:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        self._resume_from_store()
        reset = self._detect_log_resets()
        self._update_lag()
        got = [r for tp, batch in polled.items() if tp not in reset for r in batch]
        records = [r for r in got if r.offset >= self.applied.get((r.topic, r.partition), 0)]
        if len(records) < len(got):
            m.MESSAGES_REPLAYED.inc(len(got) - len(records))
        return records

    def _detect_log_resets(self) -> set[TopicPartition]:
        """Partitions whose log no longer holds what the store says it consumed; each is rewound to its
        log start (stored offset too) and its records of this poll are dropped, to be fetched again.

        Two signs: a topic id that changed where the broker reports one (the topic was deleted and
        re-created, or a memory-storage broker restarted) resets *every* partition of the topic the
        store has offsets for, assigned now or not, since a new log may already be past the old
        offset; a high watermark below the stored next offset (a consumer never reads past the high
        watermark, so a consistent log cannot be behind us) resets that partition. Without this, the
        records of the new log were skipped as "replayed".
        """
        reset: set[TopicPartition] = set()
        for topic in {tp.topic for tp in self.consumer.assignment()}:
            new_id = self._changed_topic_id(topic)
            if new_id is not None:
                for (t, p), ours in list(self.applied.items()):
                    if t == topic:
                        reset |= self._rewind(TopicPartition(t, p), ours, "topic id changed")
                self.store.set_topic_id(topic, new_id)  # after the offsets: a crash in between resets again
                self.topic_ids[topic] = new_id
        for tp in self.consumer.assignment():
            ours, hw = self.applied.get((tp.topic, tp.partition)), self.consumer.highwater(tp)
            if tp not in reset and ours is not None and hw is not None and hw < ours:
                reset |= self._rewind(tp, ours, f"high watermark {hw} behind the stored offset")
        return reset

    def _rewind(self, tp: TopicPartition, ours: int, why: str) -> set[TopicPartition]:
        start = self._log_start(tp)
        log.warning("log of %s[%d] was reset (%s): stored next offset %d; consuming again from offset %d "
                    "(re-sent ids overwrite)", tp.topic, tp.partition, why, ours, start)
        self.store.set_offset(tp.topic, tp.partition, start)
        self.applied[(tp.topic, tp.partition)] = start
        m.OFFSET_RESETS.labels(topic=tp.topic, partition=str(tp.partition)).inc()
        if tp in self.consumer.assignment():
            self.consumer.seek(tp, start)
            return {tp}
        return set()  # sought to the new stored offset when it is assigned (_resume_from_store)

    def _changed_topic_id(self, topic: str) -> str | None:
        """The broker's id of ``topic`` if it differs from the stored one; the first id seen is stored."""
        cluster = getattr(getattr(self.consumer, "_client", None), "cluster", None)
        seen = cluster.topic_id(topic) if cluster is not None and hasattr(cluster, "topic_id") else None
        if seen is None or seen.int == 0:  # brokers before topic ids report none, or the null uuid
            return None
        stored = self.topic_ids.get(topic)
        if stored == str(seen):
            return None
        if stored is None:
            self.store.set_topic_id(topic, str(seen))
            self.topic_ids[topic] = str(seen)
            return None
        return str(seen)

    def _log_start(self, tp: TopicPartition) -> int:
        try:
            return int(self.consumer.beginning_offsets([tp])[tp])
        except KafkaError as exc:
            log.warning("could not read the log start of %s[%d] (%r); using 0", tp.topic, tp.partition, exc)
            return 0

    def _resume_from_store(self) -> None:
        """Seek newly assigned partitions to the LMDB offset where it is ahead of Kafka's committed one.

        A crash between the LMDB commit and the Kafka commit leaves Kafka behind; the records in
        between are already indexed, so they are skipped (and counted as replayed), never rewritten.
        """
        while self.newly_assigned:
            tp = self.newly_assigned.pop()
            ours = self.applied.get((tp.topic, tp.partition))
            if ours is None:
                continue
            committed = self.consumer.committed(tp)
            if (committed is None or ours > committed) and self.consumer.position(tp) < ours:
                log.info("resuming %s[%d] at LMDB offset %d (Kafka committed %s)", tp.topic, tp.partition, ours, committed)
                self.consumer.seek(tp, ours)

    def finish_with_retry(self, prepared: "_Prepared") -> list[int]:
        attempts, delay = self.settings.worker.write_attempts, 0.5
        for attempt in range(1, attempts + 1):
            try:
                return self.finish(prepared)
            except StoreFullError:
                m.STORE_FULL.inc()
                if attempt == attempts:
                    raise
                log.error("store full; retrying batch in %.1fs (attempt %d/%d)", delay, attempt, attempts)
            except KafkaError as exc:
                if attempt == attempts:
                    raise
                log.warning("Kafka error %r; retrying batch in %.1fs", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def prepare(self, records) -> "_Prepared":
        """Parse, send rejects to the DLQ producer, and start encoding on the encoder thread."""
        m.MESSAGES_CONSUMED.inc(len(records))
        valid: list[ImageRecord] = []
        sources, stamps = [], []
        next_offsets: dict[tuple[str, int], int] = {}
        for rec in records:
            key = (rec.topic, rec.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), rec.offset + 1)
            try:
                valid.append(parse_message(rec.key, rec.value, rec.headers, self.spec))
            except Exception as exc:  # RecordRejected, or a bug: either way this record, not the partition
                self.dead_letters.send(rec, exc)
                continue
            sources.append(rec)
            stamps.append(rec.timestamp / 1000.0)
        return _Prepared(valid, sources, stamps, next_offsets, self.encoder.submit(self._encode, valid))

    def finish(self, p: "_Prepared") -> list[int]:
        """Wait for the codes, make dead letters durable, write LMDB, commit Kafka, tell listeners."""
        generation, version, codes = self._codes_of(p)
        self.dead_letters.flush()
        while True:
            items = [ItemWrite(r.id, codes[i].tobytes(), r.value, r.content_type, r.labels, p.stamps[i])
                     for i, r in enumerate(p.valid)]
            try:
                with m.COMMIT_SECONDS.time():
                    seqs = self.store.write_batch(items, p.next_offsets, generation=generation, model_version=version)
                break
            except GenerationChanged as exc:  # a re-encode swapped generations while this batch was encoded
                self.state.wait_for_generation(exc.current, timeout=5.0)
                generation, version, codes = self._encode(p.valid)
        self.applied.update(p.next_offsets)
        self._commit(p.next_offsets)
        m.ITEMS_INDEXED.inc(len(items))
        m.BATCHES.inc()
        m.INDEX_ITEMS.labels(process="worker").set(self.store.count())
        m.LAST_COMMIT.set(time.time())
        for listener in self.listeners:
            listener.on_indexed(p.valid, codes, seqs)
        return seqs

    def _codes_of(self, p: "_Prepared") -> tuple[int, int, np.ndarray]:
        """The batch's codes; if encoding the batch fails, each record alone, dead-lettering those that fail."""
        try:
            return p.codes.result()
        except Exception as exc:
            log.warning("encoding a batch of %d failed (%r); encoding its records one by one", len(p.valid), exc)
        keep = []
        for i, r in enumerate(p.valid):
            try:
                self._encode([r])
                keep.append(i)
            except Exception as exc:
                self.dead_letters.send(p.sources[i], RecordRejected("encode", f"{type(exc).__name__}: {exc}"))
        p.valid, p.sources, p.stamps = [p.valid[i] for i in keep], [p.sources[i] for i in keep], [p.stamps[i] for i in keep]
        return self._encode(p.valid)

    def _encode(self, valid: list[ImageRecord]) -> tuple[int, int, np.ndarray]:
        """(generation, model version, codes) from one published model state."""
        st = self.state.current()
        with m.ENCODE_SECONDS.time():
            if not valid:
                return st.generation, st.version, np.zeros((0, self.store.code_bytes), np.uint8)
            codes = st.net.encode(np.stack([r.image for r in valid]), self.settings.worker.encode_batch)
            return st.generation, st.version, codes

    def _commit(self, next_offsets: dict[tuple[str, int], int]) -> None:
        from kafka.structs import OffsetAndMetadata

        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            # The LMDB offsets already hold the truth; the next assignment seeks to them.
            log.warning("Kafka offset commit failed (%r); LMDB offsets are ahead and will be used on reassignment", exc)

    def _update_lag(self) -> None:
        lag = 0
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)  # not end_offsets(): wrong on Tansu (KAFKA.md)
            if hw is not None:
                lag += max(0, hw - self.consumer.position(tp))
        m.CONSUMER_LAG.set(lag)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.encoder.shutdown(wait=True)
        if self.consumer is not None:
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.dead_letters is not None:
            self.dead_letters.producer.close(timeout=5)
            self.dead_letters = None


def install_signal_handlers(stop) -> None:
    """SIGTERM/first SIGINT: drain and stop. Second SIGINT: exit now."""
    state = {"interrupted": False}

    def on_term(signum, frame):
        log.info("signal %d: finishing the batch in hand, committing, then stopping", signum)
        stop()

    def on_int(signum, frame):
        if state["interrupted"]:
            log.warning("second SIGINT: exiting immediately")
            os._exit(130)
        state["interrupted"] = True
        on_term(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_int)


def run(settings: Settings, *, max_idle_s: float | None = None) -> int:
    """The worker process: ingest until stopped (or idle for ``max_idle_s``); returns its exit code."""
    pin_malloc_mmap_threshold()
    # Signals first: a SIGTERM or SIGUSR1 during start-up (loading torch, opening the store) must not
    # kill the process with the default action.
    stopping = threading.Event()
    learner_box: list = []
    install_signal_handlers(stopping.set)
    signal.signal(signal.SIGUSR1, lambda *_: _request_round(learner_box, settings.learn.enabled))
    if not settings.kafka.bootstrap_servers:
        log.error("no broker configured: set STREAMHASH_KAFKA__BOOTSTRAP_SERVERS or --bootstrap-servers "
                  "(or run `streamhash broker` for an embedded one)")
        return EXIT_USAGE
    settings.log_startup("streamhash-worker")
    try:
        worker = IngestWorker(settings, stopping=stopping)
    except StoreLockedError as exc:
        log.error("%s", exc)
        return EXIT_CANTCREAT
    except StoreFullError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_TEMPFAIL
    m.serve_metrics(settings.worker.metrics_port, settings.worker.metrics_host)
    learner = None
    if settings.learn.enabled:
        from streamhash.services.learner import LearnerThread

        learner = LearnerThread(worker)
        worker.listeners.append(learner)
        learner_box.append(learner)
        learner.start()
    try:
        return worker.run(max_idle_s=max_idle_s)
    finally:
        if learner is not None:
            learner.stop()
            learner.join(timeout=60)


def _request_round(learner_box: list, enabled: bool) -> None:
    """`kill -USR1 <pid>` asks for a learning round now, whatever the count of new items."""
    if learner_box:
        learner_box[0].request_round()
    elif enabled:
        log.info("SIGUSR1: the learner is still starting; ask again in a moment")
    else:
        log.info("SIGUSR1 ignored: learning is disabled (STREAMHASH_LEARN__ENABLED=false / --no-learn)")

