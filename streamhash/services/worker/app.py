"""The worker's one app object: three parts wired to one consumer and one loop.

- :class:`~streamhash.services.worker.ownership.PartitionOwner`: the assigned partitions and their shards;
- :class:`~streamhash.services.worker.follower.ModelFollower`: the models topic → the shards' networks, and the
  codes topic's records → code updates;
- :class:`~streamhash.services.worker.pipeline.BatchPipeline`: poll → parse → encode → checkpoint;
- beside them the :class:`~streamhash.services.worker.reencode.Reencoder` thread builds announced generations.

The learner's codes topic is co-partitioned with the images topic and consumed in the same group (range
assignment gives images partition p and codes partition p to the same member), so the learned codes of
partition p are applied in p's shard with the codes topic's offset beside them.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.errors import EXIT_OK, EXIT_TEMPFAIL, StoreFullError
from streamhash.index.store import Store
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.kafka.changelog_writer import ChangelogWriter
from streamhash.kafka.checkpoint import Checkpoint
from streamhash.kafka.dlq import DeadLetters
from streamhash.kafka.positions import Positions
from streamhash.kafka.produce import make_producer
from streamhash.kafka.restorer import Restorer
from streamhash.kafka.topics import ensure_topics
from streamhash.memory import freeze_startup_objects
from streamhash.model.hashnet import resolve_device
from streamhash.model.state import ensure_model, feature_spec
from streamhash.services.spec import image_spec, model_key
from streamhash.services.worker.fencing import Fences
from streamhash.services.worker.follower import ModelFollower
from streamhash.services.worker.ownership import PartitionOwner, TrackAssignment
from streamhash.services.worker.pipeline import BatchPipeline, Prepared
from streamhash.services.worker.reencode import Reencoder
from streamhash.services.worker.rehome import Rehome

log = logging.getLogger("streamhash.worker")

# Learned-code updates in one batch at most (~30 us each to apply on an idle core): an image polled
# meanwhile waits for one such batch, not for a learner round's thousands (see Worker._poll). 250
# took 22-55 ms on the busy 2-core machine beside the learner and a re-encode (bench_ingest --learn), where
# every probe sent while a round's codes were applied took 0.05-0.17 s. 100 took 21-24 ms there (30-48 ms
# with the Kafka offset commit each batch then made; now at most one a second, streamhash.kafka.checkpoint).
CODES_PER_BATCH = 100
HELD_CODES_MAX = 50_000  # code updates held at most (~10 MB); past it batches take more to catch up


class Worker:
    def __init__(self, settings: Settings, stopping: threading.Event | None = None):
        self.settings = s = settings
        torch.set_num_threads(s.model.torch_threads)
        self.spec = image_spec(s)
        root = StoreRoot(s.store.path)
        fences = Fences(root, self._open_store, topic=s.kafka.topic, fence_after_s=s.store.fence_after_s,
                        drop_after_s=s.store.drop_after_s)
        self.owner = PartitionOwner(root, self._open_store, images_topic=s.kafka.topic,
                                    codes_topic=s.kafka.codes_topic, lock_wait_s=s.store.shard_lock_wait_s,
                                    restorer=self._restorer, fences=fences)
        self.follower = ModelFollower(s.kafka, s.model, resolve_device(s.model.device), key=model_key(s),
                                      shards=self.owner.shards)
        self.stopping = stopping or threading.Event()
        # Set while the poll thread waits for records with no batch in hand: the re-encoder's turn (Reencoder.pause)
        self.idle = threading.Event()
        # OpenMP thread counts are per calling thread: set it where torch runs.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="encoder", initializer=torch.set_num_threads,
                                          initargs=(s.model.torch_threads,))
        self.reencoder = Reencoder(self.owner.shards, lambda: self.follower.announced, self.follower.nets, self.spec,
                                   self.idle, self.owner.report)
        self.consumer: KafkaConsumer | None = None
        self.dead_letters: DeadLetters | None = None
        self.changelog: ChangelogWriter | None = None
        self.positions: Positions | None = None
        self.pipeline: BatchPipeline | None = None
        self._held_codes: list = []  # code-update records polled, not yet in a batch (see _poll)

    def _open_store(self, path) -> Store:
        s = self.settings
        store = Store(path, bits=s.model.bits, shard=int(path.name), backbone=s.model.backbone,
                      features=feature_spec(s.model),  # a frozen backbone's output is kept per item (issue 23)
                      initial_map_size=s.store.initial_map_size_bytes, max_map_size=s.store.max_map_size_bytes,
                      map_growth_factor=s.store.map_growth_factor)
        try:
            store.abandon_pending_generation()  # a re-encode interrupted by a crash starts over
            ensure_model(store, s.model)
        except BaseException:
            store.close()
            raise
        return store

    def _restorer(self, key: ShardKey, store: Store, reset) -> Restorer:
        """A restore of ``store`` from its changelog partition, on a consumer of its own (no group)."""
        s, k = self.settings, self.settings.kafka
        consumer = KafkaConsumer(**k.client_kwargs(), group_id=None, enable_auto_commit=False,
                                 auto_offset_reset="earliest", fetch_max_wait_ms=k.fetch_max_wait_ms,
                                 fetch_max_bytes=k.fetch_max_bytes, max_partition_fetch_bytes=k.fetch_max_bytes,
                                 client_id="streamhash-restore")
        return Restorer(consumer, store, k.changelog_topic, key.partition, secret=model_key(s),
                        batch_records=s.store.restore_batch_records, reset=reset, writer=self.changelog)

    def connect(self) -> None:
        k = self.settings.kafka
        ensure_topics(k)
        self.follower.start()
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
        self.positions = Positions(self.consumer, self.owner.shards)
        # misplaced records go to their key's home partition through the DLQ's producer, flushed with it
        self.rehome = rehome = Rehome(self.dead_letters.producer, k.topic, k.partitioner, self.consumer.partitions_for_topic,
                        self.spec.max_value_bytes)
        self.changelog = ChangelogWriter(make_producer(k, linger_ms=5), k.changelog_topic, model_key(self.settings))
        checkpoint = Checkpoint(self.consumer, self.dead_letters, self.positions, interval_s=k.offset_commit_interval_s,
                                rehome=rehome, changelog=self.changelog)
        self.owner.attach(self.consumer, self.positions, checkpoint)
        w = self.settings.worker
        self.pipeline = BatchPipeline(owner=self.owner, follower=self.follower, spec=self.spec, encoder=self.encoder,
                                      dead_letters=self.dead_letters, positions=self.positions, checkpoint=checkpoint,
                                      codes_topic=k.codes_topic, bits=self.settings.model.bits,
                                      encode_batch=w.encode_batch, rehome=rehome)
        self.consumer.subscribe([k.topic, k.codes_topic], listener=TrackAssignment())
        self.reencoder.start()

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
        in_flight: Prepared | None = None
        try:
            while not self.stopping.is_set():
                # With a batch in flight, only take what is already fetched: never hold it back for a wait.
                if in_flight is None:
                    self.idle.set()
                records = self._poll(0 if in_flight else self.settings.worker.poll_timeout_ms)
                if records:
                    self.idle.clear()
                prepared = self.pipeline.prepare(records) if records else None
                if in_flight is not None:
                    self.finish_with_retry(in_flight)
                in_flight = prepared
                self.owner.close_revoked(self.reencoder.holding())
                self.owner.fences.due()
                if records:
                    last_data = time.monotonic()
                    continue
                self.owner.checkpoint.flush_due()  # idle: the group's lag reads 0 within an interval
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
        more = self._poll_once(0 if self._held_codes or self.owner.restoring else timeout_ms)
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
        skip, opened = self.owner.open_assigned()
        for key in opened:
            self._adopt(key)
        if self.follower.newer(self.dead_letters) is not None:
            for key in [k for k, _ in self.owner.shards if k not in self.owner.restoring]:  # those adopt once restored
                self._adopt(key)
        epoch = self.positions.epoch
        records = self.positions.keep(polled, skip)
        if self._held_codes:  # drop those whose partition was revoked, sought to its shard's offset or rewound
            gone = set(skip) | self.positions.rewound_since(epoch)
            assigned = self.consumer.assignment()
            self._held_codes = [r for r in self._held_codes if (r.topic, r.partition) not in gone
                                and TopicPartition(r.topic, r.partition) in assigned]
        m.CONSUMER_LAG.set(self.positions.lag(self.settings.kafka.topic))
        return records

    def _adopt(self, key: ShardKey) -> None:
        """The announced model into one shard: its network now, or a re-encode queued."""
        if self.follower.adopt(self.owner.shards.get(key)):
            self.reencoder.submit(key)
        self.owner.report(key)

    def finish_with_retry(self, prepared: Prepared) -> None:
        w = self.settings.worker
        delay = w.retry_backoff_s
        for attempt in range(1, w.write_attempts + 1):
            try:
                return self.pipeline.finish(prepared)
            except (StoreFullError, KafkaError) as exc:
                if isinstance(exc, StoreFullError):
                    m.STORE_FULL.inc()
                if attempt == w.write_attempts:
                    raise
                log.error("%r; retrying the batch in %.1fs (attempt %d/%d)", exc, delay, attempt, w.write_attempts)
                if isinstance(exc, KafkaError):
                    self.renew_producers()
            time.sleep(delay)
            delay = min(delay * 2, w.retry_backoff_max_s)
        raise AssertionError("unreachable")

    def renew_producers(self) -> None:
        """New producers for the retry, what they had pending sent again on them: an idempotent producer whose id
        the broker no longer knows (a restarted broker, a log reset) fails every later send (the learner does the
        same, ``Learner.publish``)."""
        k = self.settings.kafka
        old = [self.dead_letters.producer, self.changelog.producer]
        shared = make_producer(k, linger_ms=5)  # dead letters and re-routed records flush together
        self.dead_letters.use(shared)
        self.rehome.use(shared)
        self.changelog.use(make_producer(k, linger_ms=5))
        for producer in old:
            producer.close(timeout=0)

    def stop(self) -> None:
        self.stopping.set()

    def close(self) -> None:
        self.encoder.shutdown(wait=True)
        self.reencoder.stop()
        if self.consumer is not None:
            self.owner.checkpoint.flush_offsets(timeout_s=5)
            self.consumer.close(autocommit=False)
            self.consumer = None
        if self.dead_letters is not None:
            self.dead_letters.producer.close(timeout=5)
            self.dead_letters = None
        if self.changelog is not None:
            self.changelog.producer.close(timeout=5)
            self.changelog = None
        for r in self.owner.restoring.values():
            r.close()
        self.follower.close()
        with self.reencoder.holding():
            self.owner.shards.close_all()
