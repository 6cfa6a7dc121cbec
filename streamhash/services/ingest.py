"""The ingest worker (``streamhash worker``, ``streamhash-worker``): any number of them in one consumer group.

Each worker owns the shards of the partitions it is assigned (:class:`~streamhash.index.store.shards.OwnedShards`:
one LMDB environment per (topic, partition) under the store root, opened on assignment, committed and
closed on revoke; a shard still held by its previous owner pauses the partition until it is free), so
an id lives in exactly one shard and each shard is written exactly once across rebalances.

One loop per batch: **poll** (:class:`~streamhash.kafka.positions.Positions` resumes newly opened
shards, drops what a shard already holds and rewinds reset logs), **parse** each message
(:mod:`streamhash.records`; rejects go to the dead-letter producer), **encode** each record with the
network its shard serves, **commit** through :class:`~streamhash.kafka.checkpoint.Checkpoint` (DLQ
flush → one transaction per shard with its offsets → Kafka commit). The learner's codes topic is
co-partitioned with the images topic and consumed in the same group: the learned codes of partition p
are applied in p's shard with the codes topic's offset beside them. Model versions come from
``streamhash.models``: a version of a shard's generation becomes its network; a higher generation is
re-encoded into by :class:`~streamhash.services.reencode.Reencoder`.

SIGTERM or a first SIGINT drains the batch in hand, commits and leaves the group; a second SIGINT
exits at once (what was not committed is consumed again by the next owner, never lost).

A failure while handling one message (parse, decode, encode, a malformed code update) sends that
message to the DLQ and never stops the partition. A log that is behind the stored offset (the broker's
log was reset, or the topic deleted and re-created) is detected and consumed again from its start:
re-sent ids overwrite.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import (EXIT_OK, EXIT_TEMPFAIL, GenerationChanged, InternalRecordRejected, RecordRejected, StoreError,
                               StoreFullError)
from streamhash.index.store import ItemWrite, Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.index.store.shards import OwnedShards
from streamhash.kafka.checkpoint import Checkpoint
from streamhash.kafka.dlq import DeadLetters
from streamhash.kafka.modelbus import CodeUpdate, ModelAnnouncement, ModelReader, latest, parse_code
from streamhash.kafka.positions import Positions
from streamhash.kafka.produce import make_producer
from streamhash.kafka.topics import ensure_topics
from streamhash.model.hashnet import HashNet, resolve_device
from streamhash.memory import freeze_startup_objects
from streamhash.model.state import NetCache, checked_model, ensure_model, stored_net
from streamhash.records import ImageRecord, ImageSpec, parse_message
from streamhash.services.reencode import Reencoder

log = logging.getLogger("streamhash.worker")

# Learned-code updates in one batch at most (~30 us each to apply on an idle core): an image polled
# meanwhile waits for one such batch, not for a learner round's thousands (see IngestWorker._poll). 250
# took 22-55 ms on the busy 2-core machine beside the learner and a re-encode (bench_ingest --learn), where
# every probe sent while a round's codes were applied took 0.05-0.17 s. 100 took 21-24 ms there (30-48 ms
# with the Kafka offset commit each batch then made; now at most one a second, streamhash.kafka.checkpoint).
CODES_PER_BATCH = 100
HELD_CODES_MAX = 50_000  # code updates held at most (~10 MB); past it batches take more to catch up


class _TrackAssignment(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: only logs; the poll thread opens and closes shards."""

    def on_partitions_revoked(self, revoked):
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned):
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


@dataclass
class _Prepared:
    valid: list[ImageRecord]
    sources: list  # the Kafka record of each valid one, to dead-letter it if it cannot be encoded
    stamps: list[float]
    shards: list[ShardKey]  # the shard of each valid one
    updates: dict[ShardKey, list[CodeUpdate]]  # the learner's code updates, by shard
    next_offsets: dict[tuple[str, int], int]
    codes: Future  # -> (generation of each record, model version of each, np.ndarray (len(valid), bits/8))
    epoch: int  # Positions.epoch when polled: partitions rewound since then are dropped from the batch

    def keep(self, rows: list[int]) -> None:
        """Keep only these valid records (the others were dead-lettered or belong to a rewound log)."""
        self.valid = [self.valid[i] for i in rows]
        self.sources = [self.sources[i] for i in rows]
        self.stamps = [self.stamps[i] for i in rows]
        self.shards = [self.shards[i] for i in rows]


class IngestWorker:
    def __init__(self, settings: Settings, stopping: threading.Event | None = None):
        self.settings = s = settings
        torch.set_num_threads(s.model.torch_threads)
        self.spec = ImageSpec.from_settings(s)
        self.root = StoreRoot(s.store.path)
        self.shards = OwnedShards(self.root, self._open_store, images_topic=s.kafka.topic, codes_topic=s.kafka.codes_topic)
        self.device = resolve_device(s.model.device)
        self.nets = NetCache(self._load_net)
        self.announced: ModelAnnouncement | None = None  # the newest version on streamhash.models
        self._announcements: queue.SimpleQueue = queue.SimpleQueue()
        self._rejected: queue.SimpleQueue = queue.SimpleQueue()  # (record, error): models-topic records refused
        key = s.security.model_key
        self.model_key = key.get_secret_value().encode() if key else None
        self._follower: threading.Thread | None = None
        self._follower_stop = threading.Event()
        self.stopping = stopping or threading.Event()
        # Set while the poll thread waits for records with no batch in hand: the re-encoder's turn (Reencoder.pause)
        self.idle = threading.Event()
        # OpenMP thread counts are per calling thread: set it where torch runs.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder", initializer=torch.set_num_threads,
                                          initargs=(s.model.torch_threads,))
        self.reencoder = Reencoder(self)
        self.consumer: KafkaConsumer | None = None
        self.dead_letters: DeadLetters | None = None
        self.positions: Positions | None = None
        self.checkpoint: Checkpoint | None = None
        self.models: ModelReader | None = None
        self._ready: set[TopicPartition] = set()  # assigned partitions whose shard is open and position resumed
        self._waiting: dict[TopicPartition, float] = {}  # paused: the previous owner still holds the shard
        self._held_codes: list = []  # code-update records polled, not yet in a batch (see _poll)

    def _open_store(self, path) -> Store:
        s = self.settings
        store = Store(path, bits=s.model.bits, shard=int(path.name), backbone=s.model.backbone,
                      initial_map_size=s.store.initial_map_size_bytes, max_map_size=s.store.max_map_size_bytes,
                      map_growth_factor=s.store.map_growth_factor)
        try:
            store.abandon_pending_generation()  # a re-encode interrupted by a crash starts over
            ensure_model(store, s.model)
        except BaseException:
            store.close()
            raise
        return store

    def _load_net(self, version: int) -> HashNet:
        a = self.announced
        if a is not None and a.version == version:  # read from the models topic, maybe in no shard yet
            return a.net if a.net is not None else HashNet.from_bytes(a.raw, self.device)
        return stored_net((store for _, store in self.shards), version, self.device)

    def connect(self) -> None:
        k = self.settings.kafka
        ensure_topics(k)
        self.models = ModelReader(k, key=self.model_key, on_reject=self._model_rejected,
                                  check=lambda a: checked_model(a, self.settings.model, self.device))
        self.announced = latest(self.models.read_to_end())  # before any shard opens: it adopts the newest
        self._follower = threading.Thread(target=self._follow_models, name="models", daemon=True)
        self._follower.start()
        self.dead_letters = DeadLetters(make_producer(k, linger_ms=5), k.dlq_topic)
        self.consumer = KafkaConsumer(
            **k.client_kwargs(), group_id=k.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms,
            max_poll_interval_ms=k.max_poll_interval_ms, max_poll_records=k.max_poll_records,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            fetch_max_bytes=k.fetch_max_bytes, max_partition_fetch_bytes=max(k.fetch_max_bytes // 4, 1 << 20),
            # range assignment gives images partition p and codes partition p to the same member (co-partitioning)
            partition_assignment_strategy=[RangePartitionAssignor], client_id="streamhash-worker",
        )
        self.positions = Positions(self.consumer, self.shards)
        self.checkpoint = Checkpoint(self.consumer, self.dead_letters, interval_s=k.offset_commit_interval_s)
        self.consumer.subscribe([k.topic, k.codes_topic], listener=_TrackAssignment())
        self.reencoder.start()

    def _follow_models(self) -> None:
        """The models topic, on its own thread; the poll thread applies what it finds between batches."""
        while not self._follower_stop.is_set():
            try:
                for a in self.models.poll(0.5):
                    self._announcements.put(a)
            except Exception as exc:  # the reader reconnects by itself; never let the follower die
                log.warning("reading %s: %r", self.settings.kafka.models_topic, exc)
                self._follower_stop.wait(1.0)

    def _model_rejected(self, record, exc: InternalRecordRejected) -> None:
        """A models-topic record that is not a usable model: counted, logged, and dead-lettered by the poll thread
        (the reader's thread must not touch the dead-letter producer's batch). The previous model keeps serving."""
        m.INTERNAL_REJECTED.labels(topic="models").inc()
        log.warning("not adopting a record of %s: %s", record.topic, exc)
        self._rejected.put((record, exc))

    def run(self, *, max_idle_s: float | None = None) -> int:
        """Consume until stopped (or idle for ``max_idle_s``); return a process exit code.

        Two batches are in flight: while batch *i* is encoded on the encoder thread (torch releases
        the GIL), this thread polls and parses batch *i+1*; batch *i* is then written and committed
        before *i+1* is, so the checkpoint order holds batch by batch. Shards of revoked partitions are
        closed only after the batch in flight is committed: the next owner then resumes exactly there.
        """
        if self.consumer is None:
            self.connect()
        # as in the query server (where it stalled requests ~60-80 ms): full collections over start-up's objects
        freeze_startup_objects()
        last_data = time.monotonic()
        in_flight: _Prepared | None = None
        try:
            while not self.stopping.is_set():
                # With a batch in flight, only take what is already fetched: never hold it back for a wait.
                if in_flight is None:
                    self.idle.set()
                records = self._poll(0 if in_flight else self.settings.worker.poll_timeout_ms)
                if records:
                    self.idle.clear()
                prepared = self.prepare(records) if records else None
                if in_flight is not None:
                    self.finish_with_retry(in_flight)
                in_flight = prepared
                self._close_revoked()
                if records:
                    last_data = time.monotonic()
                    continue
                self.checkpoint.flush_due()  # idle: the group's lag reads 0 within an interval
                if max_idle_s is not None and time.monotonic() - last_data > max_idle_s and not self.reencoder.pending():
                    break
            if in_flight is not None:
                self.finish_with_retry(in_flight)
        except (StoreFullError, KafkaError) as exc:  # the batch's retries are spent
            log.error("stopping: %r. Nothing was lost: offsets of unwritten messages were not committed.", exc)
            return EXIT_TEMPFAIL  # a supervisor should restart with back-off, not in a tight loop
        finally:
            self.idle.set()  # a re-encode left waiting for a turn goes on (and is stopped) without the loop
            self.close()
        return EXIT_OK

    def _poll(self, timeout_ms: int) -> list:
        """The next batch's records: every image polled, and at most CODES_PER_BATCH of the learner's code
        updates (oldest first); the rest of the codes are held here for the next batches.

        Learned codes never hold images back. A learner round publishes thousands of code updates at once,
        they are fetched in one go, and kafka-python hands a fetch's records out before those of later
        fetches: an image fetched behind them waited until all were applied, 1,000 per batch (ack -> commit
        p99 0.19-0.32 s in bench_ingest --learn). So while polls return only codes, poll on (parsing one
        is ~3 us, applying one ~30 us) until an image or nothing comes, and apply the codes a short batch
        at a time beside the images. (Pausing the codes partitions instead is unsafe in kafka-python
        3.0.12: a paused partition's parsed records are handed back only when the fetcher's in-line slot
        is None, not merely exhausted, and a parked partition is never fetched again: tried, the codes
        partitions stalled after 2,750 of 20,000 updates.) Offsets are untouched: a batch commits
        the offsets of the records it holds, held codes are not committed, and a held partition's codes
        are dropped when it is revoked, sought or rewound (they are fetched again from where its shard
        left off).
        """
        codes_topic = self.settings.kafka.codes_topic
        images = []
        more = self._poll_once(0 if self._held_codes else timeout_ms)
        while True:
            images += [r for r in more if r.topic != codes_topic]
            self._held_codes += [r for r in more if r.topic == codes_topic]
            if not more or images or len(self._held_codes) >= HELD_CODES_MAX:
                break
            more = self._poll_once(0)  # only codes so far: an image may be fetched behind them
        n = max(CODES_PER_BATCH, len(self._held_codes) - HELD_CODES_MAX)  # past the bound: catch up
        codes, self._held_codes = self._held_codes[:n], self._held_codes[n:]
        return images + codes

    def _poll_once(self, timeout_ms: int) -> list:
        polled = self.consumer.poll(timeout_ms=timeout_ms)
        skip = self._open_assigned()
        self._adopt_announcements()
        epoch = self.positions.epoch
        records = self.positions.keep(polled, skip)
        if self._held_codes:  # drop those whose partition was revoked, sought to its shard's offset or rewound
            gone = set(skip) | self.positions.rewound_since(epoch)
            assigned = self.consumer.assignment()
            self._held_codes = [r for r in self._held_codes if (r.topic, r.partition) not in gone
                                and TopicPartition(r.topic, r.partition) in assigned]
        m.CONSUMER_LAG.set(self.positions.lag(self.settings.kafka.topic))
        return records

    # shards: opened on assignment, closed after revoke
    def _open_assigned(self) -> set[TopicPartition]:
        """Open the shards of newly assigned partitions and resume them; returns the partitions whose records
        of this poll must be dropped (just sought, or paused because the previous owner holds the shard)."""
        assigned = self.consumer.assignment()
        skip: set[TopicPartition] = set()
        for tp in sorted(assigned - self._ready, key=lambda t: (t.topic, t.partition)):
            key = self.shards.key_of(tp.topic, tp.partition)
            opened = key not in self.shards
            store = self.shards.open(key)
            skip.add(tp)
            if store is None:
                self._wait_for(tp, key)
                continue
            if tp in self._waiting:
                self.consumer.resume(tp)
                log.info("shard %s is free after %.1fs: resuming %s[%d]", key, time.monotonic() - self._waiting.pop(tp),
                         tp.topic, tp.partition)
            self.positions.resume([tp])
            self._ready.add(tp)
            if opened:
                self._adopt(key, store)
                self.shard_changed(key)
        m.ASSIGNED_PARTITIONS.set(sum(tp.topic == self.settings.kafka.topic for tp in assigned))
        m.SHARDS_OPEN.set(len(self.shards))
        return skip

    def _wait_for(self, tp: TopicPartition, key: ShardKey) -> None:
        now = time.monotonic()
        if tp not in self._waiting:
            self._waiting[tp] = now
            self.consumer.pause(tp)
            m.SHARD_LOCK_WAITS.inc()
            log.info("shard %s is still held by its previous owner: %s[%d] paused until it is free", key, tp.topic, tp.partition)
        elif now - self._waiting[tp] > self.settings.store.shard_lock_wait_s:
            log.warning("shard %s has been held by another process for %.0fs (is a stopped worker still running? "
                        "see %s); %s[%d] stays paused", key, now - self._waiting[tp],
                        self.root.shard_path(key) / "writer.lock", tp.topic, tp.partition)
            self._waiting[tp] = now  # warn again after another wait

    def _close_revoked(self) -> None:
        assigned = self.consumer.assignment()
        for tp in [t for t in self._ready | set(self._waiting) if t not in assigned]:
            self._ready.discard(tp)
            self._waiting.pop(tp, None)
            self.positions.forget([tp])
            self.checkpoint.forget([(tp.topic, tp.partition)])
        owned = {self.shards.key_of(tp.topic, tp.partition) for tp in assigned}
        for key, _ in self.shards:
            if key not in owned:
                with self.reencoder.holding():  # never under a build
                    self.shards.close(key)
                for gauge in (m.SHARD_ITEMS, m.SHARD_GENERATION, m.SHARD_MODEL_VERSION):
                    try:
                        gauge.remove(str(key))  # another worker reports it now
                    except KeyError:
                        pass
        m.SHARDS_OPEN.set(len(self.shards))

    # models: a version of a shard's generation becomes its network; a higher generation is re-encoded into
    def _adopt_announcements(self) -> None:
        while self.dead_letters is not None and not self._rejected.empty():
            self.dead_letters.send(*self._rejected.get())  # flushed with the next batch's checkpoint
        fresh = []
        while not self._announcements.empty():
            fresh.append(self._announcements.get())
        newest = latest(fresh)
        if newest is None or (self.announced is not None and newest.version <= self.announced.version):
            return
        self.announced = newest  # its network is loaded on first use (_load_net)
        log.info("model version %d (generation %d%s) published by the learner", newest.version, newest.generation,
                 ", a re-encode" if newest.reencode else "")
        for key, store in self.shards:
            self._adopt(key, store)

    def _adopt(self, key: ShardKey, store: Store) -> None:
        a = self.announced
        if a is None:
            return
        meta = store.read_meta()
        generation, version = int(meta["generation"]), int(meta["model_version"])
        if a.generation == generation and a.version > version:
            store.put_model(a.raw, make_current=True, version=a.version)
            self.shard_changed(key)
        elif a.generation > generation:
            self.reencoder.submit(key)

    def shard_changed(self, key: ShardKey) -> None:
        store = self.shards.get(key)
        if store is None:
            return
        meta = store.read_meta()
        m.SHARD_GENERATION.labels(shard=str(key)).set(int(meta["generation"]))
        m.SHARD_MODEL_VERSION.labels(shard=str(key)).set(int(meta["model_version"]))
        m.SHARD_ITEMS.labels(shard=str(key)).set(store.count())

    def finish_with_retry(self, prepared: _Prepared) -> None:
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
        codes_topic, code_bytes = self.settings.kafka.codes_topic, self.settings.model.bits // 8
        valid: list[ImageRecord] = []
        sources, stamps, shards = [], [], []
        updates: dict[ShardKey, list[CodeUpdate]] = defaultdict(list)
        next_offsets: dict[tuple[str, int], int] = {}
        for rec in records:
            key = (rec.topic, rec.partition)
            next_offsets[key] = max(next_offsets.get(key, 0), rec.offset + 1)
            try:
                if rec.topic == codes_topic:
                    updates[self.shards.key_of(*key)].append(parse_code(rec, code_bytes, self.model_key))
                    continue
                m.MESSAGES_CONSUMED.inc()
                valid.append(parse_message(rec.key, rec.value, rec.headers, self.spec))
            except Exception as exc:  # RecordRejected, or a bug: either way this record, not the partition
                if rec.topic == codes_topic:
                    m.INTERNAL_REJECTED.labels(topic="codes").inc()
                    if not isinstance(exc, InternalRecordRejected):
                        exc = InternalRecordRejected("codes", f"{type(exc).__name__}: {exc}")
                self.dead_letters.send(rec, exc)
                continue
            sources.append(rec)
            stamps.append(rec.timestamp / 1000.0)
            shards.append(self.shards.key_of(*key))
        serving = {k: self._serving(k) for k in set(shards)}
        return _Prepared(valid, sources, stamps, shards, dict(updates), next_offsets,
                         self.encoder.submit(self._encode, valid, [serving[k] for k in shards]), self.positions.epoch)

    def _serving(self, key: ShardKey) -> tuple[int, int]:
        """(generation, model version) the shard serves now."""
        meta = self.shards.get(key).read_meta()
        return int(meta["generation"]), int(meta["model_version"])

    def finish(self, p: _Prepared) -> None:
        """Wait for the codes, commit the batch (Checkpoint: DLQ flush, each shard's transaction, Kafka)."""
        serving, codes = self._codes_of(p)
        rewound = self.positions.rewound_since(p.epoch)
        if rewound:  # the log was reset under this batch: its records come again from the new log's start
            keep = [i for i, src in enumerate(p.sources) if (src.topic, src.partition) not in rewound]
            p.keep(keep)
            serving, codes = [serving[i] for i in keep], codes[keep]
            p.next_offsets = {k: v for k, v in p.next_offsets.items() if k not in rewound}
            p.updates = {k: u for k, u in p.updates.items() if (self.settings.kafka.codes_topic, k.partition) not in rewound}
        rows: dict[ShardKey, list[int]] = defaultdict(list)
        for i, key in enumerate(p.shards):
            rows[key].append(i)
        offsets: dict[ShardKey, dict] = defaultdict(dict)
        for (topic, part), nxt in p.next_offsets.items():
            offsets[self.shards.key_of(topic, part)][(topic, part)] = nxt

        def write_state() -> None:
            # Shards with images first: a shard holding only code updates may wait on its LMDB writer lock
            # (for the one re-encode transaction in progress, ~10 ms), and images need not wait behind it.
            for key in sorted(offsets, key=lambda k: (k not in rows, k)):
                if all(self.positions.applied.get(tp, 0) >= nxt for tp, nxt in offsets[key].items()):
                    continue  # a retry of this batch: this shard committed it already
                self._write_shard(key, p, rows.get(key, []), serving, codes, offsets[key])
                self.positions.advance(offsets[key])

        with m.COMMIT_SECONDS.time():
            self.checkpoint.commit(write_state, p.next_offsets)
        m.BATCHES.inc()
        m.LAST_COMMIT.set(time.time())
        m.INDEX_ITEMS.labels(process="worker").set(sum(s.count() for _, s in self.shards))

    def _write_shard(self, key: ShardKey, p: _Prepared, rows: list[int], serving, codes, offsets) -> None:
        """One shard's part of a batch: its items (encoded with its network), then the learner's code updates,
        each in one transaction with its partition's offset."""
        store = self.shards.get(key)
        if store is None:
            raise StoreError(f"shard {key} was closed with a batch in flight")
        codes_topic = self.settings.kafka.codes_topic
        image_offsets = {tp: o for tp, o in offsets.items() if tp[0] != codes_topic}
        code_offsets = {tp: o for tp, o in offsets.items() if tp[0] == codes_topic}
        records = [p.valid[i] for i in rows]
        generation, version = serving[rows[0]] if rows else self._serving(key)
        shard_codes = codes[rows] if rows else codes[:0]
        if len({serving[i] for i in rows}) > 1:  # a model changed between two records of one shard: never mix
            generation, version = self._serving(key)
            shard_codes = self._encode(records, [(generation, version)] * len(records))[1]
        while True:
            items = [ItemWrite(r.id, shard_codes[j].tobytes(), r.value, r.content_type, r.labels, p.stamps[rows[j]])
                     for j, r in enumerate(records)]
            try:
                store.write_batch(items, image_offsets, generation=generation, model_version=version)
                break
            except GenerationChanged:  # the re-encoder swapped this shard while the batch was encoded
                generation, version = self._serving(key)
                shard_codes = self._encode(records, [(generation, version)] * len(records))[1]
        m.ITEMS_INDEXED.inc(len(items))
        if code_offsets or p.updates.get(key):
            results = store.apply_updates(p.updates.get(key, []), code_offsets)
            for result, n in results.items():
                if n:
                    m.CODE_UPDATES.labels(result=result).inc(n)
        self.shard_changed(key)

    def _codes_of(self, p: _Prepared) -> tuple[list[tuple[int, int]], np.ndarray]:
        """The batch's codes; if encoding the batch fails, each record alone, dead-lettering those that fail."""
        try:
            return p.codes.result()
        except Exception as exc:
            log.warning("encoding a batch of %d failed (%r); encoding its records one by one", len(p.valid), exc)
        keep = []
        for i, r in enumerate(p.valid):
            try:
                self._encode([r], [self._serving(p.shards[i])])
                keep.append(i)
            except Exception as exc:
                self.dead_letters.send(p.sources[i], RecordRejected("encode", f"{type(exc).__name__}: {exc}"))
        p.keep(keep)
        return self._encode(p.valid, [self._serving(k) for k in p.shards])

    def _encode(self, valid: list[ImageRecord], serving: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], np.ndarray]:
        """Each record encoded by the network of the (generation, model version) its shard serves; one call
        per version (usually one)."""
        codes = np.zeros((len(valid), self.settings.model.bits // 8), np.uint8)
        with m.ENCODE_SECONDS.time():
            for version in {v for _, v in serving}:
                rows = [i for i, (_, v) in enumerate(serving) if v == version]
                images = np.stack([valid[i].image for i in rows])
                codes[rows] = self.nets.get(version).encode(images, self.settings.worker.encode_batch)
        return serving, codes

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.encoder.shutdown(wait=True)
        self.reencoder.stop()
        if self.consumer is not None:
            if self.checkpoint is not None:
                self.checkpoint.flush_offsets(timeout_s=5)
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.dead_letters is not None:
            self.dead_letters.producer.close(timeout=5)
            self.dead_letters = None
        if self._follower is not None:
            self._follower_stop.set()
            self._follower.join(timeout=5)
            self.models.close()
            self._follower = None
        with self.reencoder.holding():
            self.shards.close_all()
