"""Dead-lettering: the original message plus why, where and at which stage it was refused."""

from __future__ import annotations

from kafka import KafkaProducer

from streamhash.errors import RecordRejected
from streamhash.metrics import DEAD_LETTERED


def dlq_headers(record, error: Exception, stage: str) -> list[tuple[str, bytes]]:
    """The record's own headers followed by ``error.*`` and ``source.*`` headers (DESIGN.md).

    ``error.class`` names the exception that made the record fail (a decoder's, when a rejection
    wraps one). ``source.*`` identify the message: a batch replayed after a crash may dead-letter it
    again, and consumers of the DLQ deduplicate on (source.topic, source.partition, source.offset).
    """
    return list(record.headers or []) + [
        ("error.class", getattr(error, "cause", type(error).__name__).encode()),
        ("error.message", str(error).encode("utf-8", errors="replace")),
        ("error.stage", stage.encode()),
        ("source.topic", record.topic.encode()),
        ("source.partition", str(record.partition).encode()),
        ("source.offset", str(record.offset).encode()),
    ]


class DeadLetters:
    def __init__(self, producer: KafkaProducer, topic: str):
        self.producer, self.topic = producer, topic
        self._pending = []

    def send(self, record, error: Exception) -> None:
        stage = error.stage if isinstance(error, RecordRejected) else "process"
        fut = self.producer.send(self.topic, key=record.key, value=record.value or b"", headers=dlq_headers(record, error, stage))
        self._pending.append((fut, stage))

    def flush(self, timeout: float = 30.0) -> int:
        """Block until every pending dead letter is acknowledged; raise if any failed (nothing is counted twice)."""
        if not self._pending:
            return 0
        self.producer.flush(timeout)
        pending, self._pending = self._pending, []
        for fut, _ in pending:
            fut.get(timeout=0)  # raises the send error, if any
        for _, stage in pending:
            DEAD_LETTERED.labels(stage=stage).inc()
        return len(pending)
