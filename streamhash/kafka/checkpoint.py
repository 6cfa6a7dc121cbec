"""The commit of one batch, in the order that makes delivery effectively-once (quix-streams style).

1. **flush**: dead letters of the batch are acknowledged by the broker, so a rejected message is
   durable in the DLQ before its offset can be passed;
2. **state**: one transaction per shard writes that shard's items, their codes, blobs, tables, the
   learned codes addressed to it and its partitions' next offsets; all or nothing per shard, and each
   shard's offsets are its own truth, so a crash between two shards' transactions loses nothing;
3. **offsets**: Kafka's committed offsets follow. A crash between 2 and 3 leaves Kafka behind the
   shards; the next owner seeks to the shards' offsets (:class:`~streamhash.kafka.positions.Positions`),
   so nothing is written twice. A failed Kafka commit is logged, never raised: the shards hold the truth.

The consumer and dead-letter writer are injected and the state step is a callable, so the order is
tested with fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger("streamhash.worker")

T = TypeVar("T")


class Checkpoint:
    def __init__(self, consumer, dead_letters):
        self.consumer, self.dead_letters = consumer, dead_letters

    def commit(self, write_state: Callable[[], T], next_offsets: dict[tuple[str, int], int]) -> T:
        """Flush → ``write_state()`` (the shards' transactions, offsets included) → Kafka offsets; returns
        what ``write_state`` returned. If it raises, nothing of this batch reaches Kafka's offsets."""
        self.dead_letters.flush()
        result = write_state()
        self._commit_kafka(next_offsets)
        return result

    def _commit_kafka(self, next_offsets: dict[tuple[str, int], int]) -> None:
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("Kafka offset commit failed (%r); the shards' offsets are ahead and will be used on reassignment", exc)
