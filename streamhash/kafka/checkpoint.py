"""The commit of one batch, in the order that makes delivery effectively-once (quix-streams style).

1. **flush**: dead letters of the batch, and the records it re-routed to their home partition
   (:mod:`streamhash.services.worker.rehome`), are acknowledged by the broker, so a rejected or misplaced
   message is durable where it went before its offset can be passed;
2. **changelog**: each shard's new item states go to its changelog partition (:mod:`streamhash.kafka.changelog`),
   acknowledged before any shard commits, so the changelog is never behind a shard: a shard is a cache of
   Kafka, restorable anywhere. A crash after this step sends the batch's records again (an id's later record
   replaces the earlier one);
3. **state**: one transaction per shard writes that shard's items, their codes, blobs, the
   learned codes addressed to it and its partitions' next offsets (the changelog's too); all or nothing per shard, and each
   shard's offsets are its own truth, so a crash between two shards' transactions loses nothing;
4. **offsets**: Kafka's committed offsets follow. A crash between 3 and 4 leaves Kafka behind the
   shards; the next owner seeks to the shards' offsets (:class:`~streamhash.kafka.positions.Positions`),
   so nothing is written twice. A failed Kafka commit is logged, never raised: the shards hold the truth.

Since Kafka's offsets are only a hint (for lag tools and people), step 3 runs at most once every
``interval_s``: the batches between two commits keep their offsets pending here, and the next commit
(or :meth:`flush_offsets`, on shutdown) sends the newest of each partition. Each Kafka commit is a
round trip that the next batch waited for: during a learner round's thousands of code updates, applied
a hundred a batch, it was ~10-25 ms of each 30-48 ms batch on the busy test machine.

The state step is data: one :class:`StateWrite` per shard (its writes and the offsets they store), written
in the order given; a write whose offsets the shards already hold (a retried batch whose first attempt
committed that shard) is skipped. The consumer, dead-letter writer and positions are injected, so the order
is tested with fakes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger("streamhash.worker")

class StateWrite(Protocol):
    """One shard's part of a batch: ``write()`` is its transaction(s), ``offsets`` the (topic, partition) -> next
    offset it stores with them, ``image_offsets`` the dict its first transaction stores (the checkpoint adds the
    changelog's offset there)."""

    offsets: dict[tuple[str, int], int]
    image_offsets: dict[tuple[str, int], int]

    def write(self) -> None: ...


class Applied(Protocol):
    """Where the offsets the shards hold are kept (:class:`~streamhash.kafka.positions.Positions`)."""

    applied: dict[tuple[str, int], int]

    def advance(self, next_offsets: dict[tuple[str, int], int]) -> None: ...


class Checkpoint:
    def __init__(self, consumer, dead_letters, positions: Applied, *, interval_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic, rehome=None, changelog=None):
        self.consumer, self.dead_letters, self.positions = consumer, dead_letters, positions
        self.rehome = rehome  # flush() like the dead letters: the re-routed records, or None
        self.changelog = changelog  # a ChangelogWriter (streamhash.kafka.changelog_writer), or None: no changelog
        self.interval_s, self.clock = interval_s, clock
        self._pending: dict[tuple[str, int], int] = {}  # stored in the shards, not yet committed to Kafka
        self._last_commit = -float("inf")

    def commit(self, writes: Sequence[StateWrite], next_offsets: dict[tuple[str, int], int]) -> int:
        """Flush → each shard's write, then its offsets marked applied → Kafka offsets (if ``interval_s`` has
        passed since the last Kafka commit). Returns the writes done (not skipped). If one raises, the shards
        before it keep what they committed and nothing of this batch reaches Kafka's offsets."""
        self.dead_letters.flush()
        if self.rehome is not None:
            self.rehome.flush()
        todo = [w for w in writes  # a retry of this batch skips the shards that committed it already
                if not all(self.positions.applied.get(tp, 0) >= nxt for tp, nxt in w.offsets.items())]
        if self.changelog is not None:
            for w in todo:
                self.changelog.send(w)
            at = self.changelog.flush()
            for w in todo:
                if w.key.partition in at:
                    w.image_offsets[(self.changelog.topic, w.key.partition)] = at[w.key.partition]
        done = 0
        for w in todo:
            w.write()
            self.positions.advance(w.offsets)
            done += 1
        self._pending.update(next_offsets)  # the newest batch's: after a log reset it is below the last one
        self.flush_due()
        return done

    def flush_due(self) -> None:
        """Commit what is pending if ``interval_s`` has passed since the last Kafka commit (called after each
        batch, and by an idle worker so that its group's lag reads 0 within an interval)."""
        if self._pending and self.clock() - self._last_commit >= self.interval_s:
            self.flush_offsets()

    def forget(self, keys) -> None:
        """Partitions this worker no longer owns: their offsets are the new owner's to commit."""
        for key in keys:
            self._pending.pop(key, None)

    def flush_offsets(self, timeout_s: float | None = None) -> None:
        """Commit every pending offset to Kafka now (waiting at most ``timeout_s``, default the client's
        request timeout: a worker stopping beside a dead broker should not wait 30 s for a hint)."""
        self._last_commit = self.clock()
        if not self._pending:
            return
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in self._pending.items()}
        self._pending = {}
        try:
            self.consumer.commit(offsets, timeout_ms=None if timeout_s is None else int(timeout_s * 1000))
        except KafkaError as exc:
            log.warning("Kafka offset commit failed (%r); the shards' offsets are ahead and will be used on reassignment", exc)
