"""The worker's partitions and the shards it owns for them.

Each worker owns the shards of the partitions it is assigned (:class:`~streamhash.index.store.shards.OwnedShards`:
one LMDB environment per (topic, partition) under the store root, opened on assignment, closed after revoke),
so an id lives in exactly one shard and each shard is written exactly once across rebalances. A shard still
held by its previous owner (finishing its batch) pauses the partition until it is free. A newly opened shard
is resumed where it left off (:class:`~streamhash.kafka.positions.Positions`); a revoked one is closed only
between re-encode builds and after the batch in flight committed, so the next owner resumes exactly there.

A shard is a cache of Kafka: one newly opened (missing here, or left behind while its partition lived on another
machine) is first restored from the changelog (:class:`~streamhash.kafka.restorer.Restorer`), its partitions
paused meanwhile and the restore run a budget at a time between polls; then it resumes from the offsets the
changelog gave it. A shard whose partition went away is fenced later (:class:`~.fencing.Fences`).
"""

from __future__ import annotations

import logging
import shutil
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

    def __init__(self, root: StoreRoot, open_store, *, images_topic: str, codes_topic: str, lock_wait_s: float,
                 restorer=None, fences=None):
        self.root, self.images_topic, self.lock_wait_s = root, images_topic, lock_wait_s
        self.shards = OwnedShards(root, open_store, images_topic=images_topic, codes_topic=codes_topic)
        self.consumer = self.positions = self.checkpoint = None
        self.restorer, self.fences = restorer, fences  # (key, store, reset) -> Restorer; Fences: both optional
        self._ready: set[TopicPartition] = set()  # assigned partitions whose shard is open and position resumed
        self._waiting: dict[TopicPartition, float] = {}  # paused: the previous owner still holds the shard
        self.restoring: dict[ShardKey, object] = {}  # shards being restored; their partitions are paused

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
            if self.fences is not None:
                self.fences.assigned(key)
            if new and self.restorer is not None:
                self.restoring[key] = self.restorer(key, store, lambda key=key: self._reset(key))
            if key in self.restoring:
                self.consumer.pause(tp)
                continue
            self.positions.resume([tp])
            self._ready.add(tp)
            if new:
                opened.append(key)
        opened += self._restore_step(assigned)
        m.ASSIGNED_PARTITIONS.set(sum(tp.topic == self.images_topic for tp in assigned))
        m.SHARDS_OPEN.set(len(self.shards))
        return skip, opened

    def _restore_step(self, assigned, budget_s: float = 0.5) -> list[ShardKey]:
        """Restore the shards being restored a little further; resume the partitions of those caught up."""
        done = []
        for key, r in list(self.restoring.items()):
            if r.step(budget_s / len(self.restoring)):
                del self.restoring[key]
                r.close()
                tps = [tp for tp in assigned if self.shards.key_of(tp.topic, tp.partition) == key]
                log.info("shard %s restored: %d changelog records in %.1fs; resuming %s", key, r.records, r.seconds,
                         [f"{tp.topic}[{tp.partition}]" for tp in tps])
                self.consumer.resume(*tps)
                self.positions.resume(tps)
                self._ready.update(tps)
                done.append(key)
        m.RESTORING_SHARDS.set(len(self.restoring))
        m.RESTORE_LAG.set(sum(r.lag for r in self.restoring.values()))
        return done

    def _reset(self, key: ShardKey):
        """Empty a shard that cannot be caught up (its changelog offset is below the log start); the new store."""
        self.shards.close(key)
        shutil.rmtree(self.root.shard_path(key))
        return self.shards.open(key)

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
        for key in [k for k in self.restoring if k not in {self.shards.key_of(t.topic, t.partition) for t in assigned}]:
            self.restoring.pop(key).close()  # the next owner restores on from the offset this one reached
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
                if self.fences is not None:
                    self.fences.revoked(key)
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
