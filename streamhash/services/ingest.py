"""The ingest worker (``streamhash worker``, ``streamhash-worker``).

One loop per batch: **poll** (:class:`~streamhash.kafka.positions.Positions` drops what the store
already holds and rewinds reset logs), **parse** each message (:mod:`streamhash.records`; rejects go
to the dead-letter producer), **encode** with the published model state, **commit** through
:class:`~streamhash.kafka.checkpoint.Checkpoint` (DLQ flush → one store transaction with the
offsets → Kafka commit), then **notify listeners** (the learner thread) of the items just indexed.

Polling never waits on learning: listeners must hand work to their own thread.
SIGTERM or a first SIGINT drains the batch in hand, commits and leaves the group; a second SIGINT
exits at once (what was not committed is consumed again by the next owner, never lost).

A failure while handling one message (parse, decode, encode) sends that message to the DLQ and never
stops the partition. A log that is behind the stored offset (the broker's log was reset, or the
topic deleted and re-created) is detected and consumed again from its start: re-sent ids overwrite.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from kafka import KafkaConsumer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import (
    EXIT_OK, EXIT_TEMPFAIL, GenerationChanged, RecordRejected, StoreFullError,
)
from streamhash.index.store import ItemWrite, Store
from streamhash.kafka.checkpoint import Checkpoint
from streamhash.kafka.dlq import DeadLetters
from streamhash.kafka.positions import Positions
from streamhash.kafka.produce import make_producer
from streamhash.kafka.topics import ensure_topics
from streamhash.model.state import load_or_create
from streamhash.records import ImageRecord, ImageSpec, parse_message

log = logging.getLogger("streamhash.worker")


class IngestListener(Protocol):
    """Told about every committed batch; must return quickly (hand work to its own thread)."""

    def on_indexed(self, records: list[ImageRecord], codes: np.ndarray, seqs: list[int]) -> None: ...


class _TrackAssignment(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: only records; the poll thread reconciles (Positions)."""

    def __init__(self, positions: Positions):
        self.positions = positions

    def on_partitions_revoked(self, revoked):
        m.ASSIGNED_PARTITIONS.set(0)
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned):
        self.positions.on_assigned(assigned)
        m.ASSIGNED_PARTITIONS.set(len(assigned))
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


@dataclass
class _Prepared:
    valid: list[ImageRecord]
    sources: list  # the Kafka record of each valid one, to dead-letter it if it cannot be encoded
    stamps: list[float]
    next_offsets: dict[tuple[str, int], int]
    codes: Future  # -> (generation, model version, np.ndarray (len(valid), bits/8))
    epoch: int  # Positions.epoch when polled: partitions rewound since then are dropped from the batch

    def keep(self, rows: list[int]) -> None:
        """Keep only these valid records (the others were dead-lettered or belong to a rewound log)."""
        self.valid = [self.valid[i] for i in rows]
        self.sources = [self.sources[i] for i in rows]
        self.stamps = [self.stamps[i] for i in rows]


class IngestWorker:
    def __init__(self, settings: Settings, listeners: list[IngestListener] | None = None,
                 stopping: threading.Event | None = None):
        self.settings = s = settings
        torch.set_num_threads(s.model.torch_threads)
        self.spec = ImageSpec.from_settings(s)
        self.store = Store(
            s.store.path, bits=s.model.bits, shard=s.store.shard, backbone=s.model.backbone,
            initial_map_size=s.store.initial_map_size_bytes, max_map_size=s.store.max_map_size_bytes,
            multihash_tables=s.store.multihash_tables, map_growth_factor=s.store.map_growth_factor,
        )
        self.store.abandon_pending_generation()  # a re-encode interrupted by a crash starts over
        self.state = load_or_create(self.store, s.model)
        self.listeners = list(listeners or [])
        self.stopping = stopping or threading.Event()
        # OpenMP thread counts are per calling thread: set it where torch runs.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder", initializer=torch.set_num_threads,
                                          initargs=(s.model.torch_threads,))
        self.consumer: KafkaConsumer | None = None
        self.dead_letters: DeadLetters | None = None
        self.positions: Positions | None = None
        self.checkpoint: Checkpoint | None = None
        st = self.state.current()
        m.MODEL_VERSION.labels(process="worker").set(st.version)
        m.INDEX_GENERATION.labels(process="worker").set(st.generation)
        m.INDEX_ITEMS.labels(process="worker").set(self.store.count())

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
        self.positions = Positions(self.consumer, self.store)
        self.checkpoint = Checkpoint(self.consumer, self.store, self.dead_letters)
        self.consumer.subscribe([k.topic], listener=_TrackAssignment(self.positions))

    def run(self, *, max_idle_s: float | None = None) -> int:
        """Consume until stopped (or idle for ``max_idle_s``); return a process exit code.

        Two batches are in flight: while batch *i* is encoded on the encoder thread (torch releases
        the GIL), this thread polls and parses batch *i+1*; batch *i* is then written and committed
        before *i+1* is, so the checkpoint order holds batch by batch.
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
        records = self.positions.keep(self.consumer.poll(timeout_ms=timeout_ms))
        m.CONSUMER_LAG.set(self.positions.lag())
        return records

    def finish_with_retry(self, prepared: _Prepared) -> list[int]:
        w = self.settings.worker
        delay = w.retry_backoff_s
        for attempt in range(1, w.write_attempts + 1):
            try:
                return self.finish(prepared)
            except (StoreFullError, KafkaError) as exc:
                if isinstance(exc, StoreFullError):
                    m.STORE_FULL.inc()
                if attempt == w.write_attempts:
                    raise
                log.error("%r; retrying the batch in %.1fs (attempt %d/%d)", exc, delay, attempt, w.write_attempts)
            time.sleep(delay)
            delay = min(delay * 2, w.retry_backoff_max_s)
        raise AssertionError("unreachable")

    def prepare(self, records) -> _Prepared:
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
        return _Prepared(valid, sources, stamps, next_offsets, self.encoder.submit(self._encode, valid), self.positions.epoch)

    def finish(self, p: _Prepared) -> list[int]:
        """Wait for the codes, commit the batch (Checkpoint: DLQ flush, store, Kafka), tell listeners."""
        generation, version, codes = self._codes_of(p)
        rewound = self.positions.rewound_since(p.epoch)
        if rewound:  # the log was reset under this batch: its records come again from the new log's start
            keep = [i for i, src in enumerate(p.sources) if (src.topic, src.partition) not in rewound]
            p.keep(keep)
            p.next_offsets = {k: v for k, v in p.next_offsets.items() if k not in rewound}
            codes = codes[keep]
        while True:
            items = [ItemWrite(r.id, codes[i].tobytes(), r.value, r.content_type, r.labels, p.stamps[i])
                     for i, r in enumerate(p.valid)]
            try:
                with m.COMMIT_SECONDS.time():
                    seqs = self.checkpoint.commit(items, p.next_offsets, generation=generation, model_version=version)
                break
            except GenerationChanged as exc:  # a re-encode swapped generations while this batch was encoded
                self.state.wait_for_generation(exc.current, timeout=self.settings.worker.generation_wait_s)
                generation, version, codes = self._encode(p.valid)
        self.positions.advance(p.next_offsets)
        m.ITEMS_INDEXED.inc(len(items))
        m.BATCHES.inc()
        m.INDEX_ITEMS.labels(process="worker").set(self.store.count())
        m.LAST_COMMIT.set(time.time())
        for listener in self.listeners:
            listener.on_indexed(p.valid, codes, seqs)
        return seqs

    def _codes_of(self, p: _Prepared) -> tuple[int, int, np.ndarray]:
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
        p.keep(keep)
        return self._encode(p.valid)

    def _encode(self, valid: list[ImageRecord]) -> tuple[int, int, np.ndarray]:
        """(generation, model version, codes) from one published model state."""
        st = self.state.current()
        with m.ENCODE_SECONDS.time():
            if not valid:
                return st.generation, st.version, np.zeros((0, self.store.code_bytes), np.uint8)
            codes = st.net.encode(np.stack([r.image for r in valid]), self.settings.worker.encode_batch)
            return st.generation, st.version, codes

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
