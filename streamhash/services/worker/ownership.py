"""The worker's partitions and the shards it owns for them.

Each worker owns the shards of the partitions it is assigned (:class:`~streamhash.index.store.shards.OwnedShards`:
one LMDB environment per (topic, partition) under the store root, opened on assignment, closed after revoke),
so an id lives in exactly one shard and each shard is written exactly once across rebalances. A shard still
held by its previous owner (finishing its batch) pauses the partition until it is free. A newly opened shard
is resumed where it left off (:class:`~streamhash.kafka.positions.Positions`); a revoked one is closed only
between re-encode builds and after the batch in flight committed, so the next owner resumes exactly there.
"""

from __future__ import annotations

import logging
import time

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from streamhash import metrics as m
from streamhash.index.store.root import ShardKey, StoreRoot
from streamhash.index.store.shards import OwnedShards

log = logging.getLogger("streamhash.worker")


class TrackAssignment(ConsumerRebalanceListener):
    """Runs on kafka-python's IO thread: only logs; the poll thread opens and closes shards."""

    def on_partitions_revoked(self, revoked):
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned):
        log.info("partitions assigned: %s", sorted((tp.topic, tp.partition) for tp in assigned))


class PartitionOwner:
    """The shards of the assigned partitions. ``attach`` gives it the consumer, positions and checkpoint once
    connected; the poll thread calls :meth:`open_assigned` after each poll and :meth:`close_revoked` after each
    batch."""

    def __init__(self, root: StoreRoot, open_store, *, images_topic: str, codes_topic: str, lock_wait_s: float):
        self.root, self.images_topic, self.lock_wait_s = root, images_topic, lock_wait_s
        self.shards = OwnedShards(root, open_store, images_topic=images_topic, codes_topic=codes_topic)
        self.consumer = self.positions = self.checkpoint = None
        self._ready: set[TopicPartition] = set()  # assigned partitions whose shard is open and position resumed
        self._waiting: dict[TopicPartition, float] = {}  # paused: the previous owner still holds the shard

    def attach(self, consumer, positions, checkpoint) -> None:
        self.consumer, self.positions, self.checkpoint = consumer, positions, checkpoint

    def open_assigned(self) -> tuple[set[TopicPartition], list[ShardKey]]:
        """Open the shards of newly assigned partitions and resume them. Returns the partitions whose records of
        this poll must be dropped (just sought, or paused: the previous owner holds the shard) and the shards
        opened now."""
        assigned = self.consumer.assignment()
        skip: set[TopicPartition] = set()
        opened: list[ShardKey] = []
        for tp in sorted(assigned - self._ready, key=lambda t: (t.topic, t.partition)):
            key = self.shards.key_of(tp.topic, tp.partition)
            new = key not in self.shards
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
            if new:
                opened.append(key)
        m.ASSIGNED_PARTITIONS.set(sum(tp.topic == self.images_topic for tp in assigned))
        m.SHARDS_OPEN.set(len(self.shards))
        return skip, opened

    def _wait_for(self, tp: TopicPartition, key: ShardKey) -> None:
        now = time.monotonic()
        if tp not in self._waiting:
            self._waiting[tp] = now
            self.consumer.pause(tp)
            m.SHARD_LOCK_WAITS.inc()
            log.info("shard %s is still held by its previous owner: %s[%d] paused until it is free", key, tp.topic, tp.partition)
        elif now - self._waiting[tp] > self.lock_wait_s:
            log.warning("shard %s has been held by another process for %.0fs (is a stopped worker still running? "
                        "see %s); %s[%d] stays paused", key, now - self._waiting[tp],
                        self.root.shard_path(key) / "writer.lock", tp.topic, tp.partition)
            self._waiting[tp] = now  # warn again after another wait

    def close_revoked(self, no_build) -> None:
        """Close the shards of partitions no longer assigned, each inside ``no_build`` (the re-encoder's lock)."""
        assigned = self.consumer.assignment()
        for tp in [t for t in self._ready | set(self._waiting) if t not in assigned]:
            self._ready.discard(tp)
            self._waiting.pop(tp, None)
            self.positions.forget([tp])
            self.checkpoint.forget([(tp.topic, tp.partition)])
        owned = {self.shards.key_of(tp.topic, tp.partition) for tp in assigned}
        for key, _ in self.shards:
            if key not in owned:
                with no_build:
                    self.shards.close(key)
                for gauge in (m.SHARD_ITEMS, m.SHARD_GENERATION, m.SHARD_MODEL_VERSION):
                    try:
                        gauge.remove(str(key))  # another worker reports it now
                    except KeyError:
                        pass
        m.SHARDS_OPEN.set(len(self.shards))

    def serving(self, key: ShardKey) -> tuple[int, int]:
        """(generation, model version) the shard serves now."""
        meta = self.shards.get(key).read_meta()
        return int(meta["generation"]), int(meta["model_version"])

    def report(self, key: ShardKey) -> None:
        """The shard's gauges, after anything about it changed."""
        store = self.shards.get(key)
        if store is None:
            return
        meta = store.read_meta()
        m.SHARD_GENERATION.labels(shard=str(key)).set(int(meta["generation"]))
        m.SHARD_MODEL_VERSION.labels(shard=str(key)).set(int(meta["model_version"]))
        m.SHARD_ITEMS.labels(shard=str(key)).set(store.count())
