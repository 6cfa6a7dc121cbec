"""The commit of one batch, in the order that makes delivery effectively-once (quix-streams style).

1. **flush**: dead letters of the batch are acknowledged by the broker, so a rejected message is
   durable in the DLQ before its offset can be passed;
2. **state**: one store transaction writes the items, their codes, blobs, tables and
   ``(topic, partition) -> next offset``; all or nothing;
3. **offsets**: Kafka's committed offsets follow. A crash between 2 and 3 leaves Kafka behind the
   store; the next owner seeks to the store's offsets (:class:`~streamhash.kafka.positions.Positions`),
   so nothing is written twice. A failed Kafka commit is logged, never raised: the store holds the truth.

The consumer, store and dead-letter writer are injected, so the order is tested with fakes.
"""

from __future__ import annotations

import logging

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger("streamhash.worker")


class Checkpoint:
    def __init__(self, consumer, store, dead_letters):
        self.consumer, self.store, self.dead_letters = consumer, store, dead_letters

    def commit(self, items, next_offsets: dict[tuple[str, int], int], **write_kw) -> list[int]:
        """Flush → state → offsets; returns the items' seqs. ``write_kw`` go to ``store.write_batch``
        (``generation``: it raises GenerationChanged, before anything is written, if a re-encode
        swapped generations since the codes were made)."""
        self.dead_letters.flush()
        seqs = self.store.write_batch(items, next_offsets, **write_kw)
        self._commit_kafka(next_offsets)
        return seqs

    def _commit_kafka(self, next_offsets: dict[tuple[str, int], int]) -> None:
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in next_offsets.items()}
        try:
            self.consumer.commit(offsets)
        except KafkaError as exc:
            log.warning("Kafka offset commit failed (%r); the store's offsets are ahead and will be used on reassignment", exc)
