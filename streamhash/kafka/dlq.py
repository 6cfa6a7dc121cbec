"""Dead-lettering: the original message plus why, where and at which stage it was refused."""

from __future__ import annotations

from kafka import KafkaProducer
from kafka.errors import KafkaError

from streamhash.errors import RecordRejected
from streamhash.metrics import DEAD_LETTERED

_HEADROOM = 64 << 10  # the error.* / source.* headers and the request's own framing


def dlq_headers(record, error: Exception, stage: str) -> list[tuple[str, bytes]]:
    """The record's own headers followed by ``error.*`` and ``source.*`` headers (DESIGN.md).

    ``error.class`` names the exception that made the record fail (a decoder's, when a rejection
    wraps one). ``source.*`` identify the message: a batch replayed after a crash may dead-letter it
    again, and consumers of the DLQ deduplicate on (source.topic, source.partition, source.offset).
    """
    return list(record.headers or []) + _error_headers(record, error, stage)


def _error_headers(record, error: Exception, stage: str) -> list[tuple[str, bytes]]:
    return [
        ("error.class", getattr(error, "cause", type(error).__name__).encode()),
        ("error.message", str(error).encode("utf-8", errors="replace")),
        ("error.stage", stage.encode()),
        ("source.topic", record.topic.encode()),
        ("source.partition", str(record.partition).encode()),
        ("source.offset", str(record.offset).encode()),
    ]


def _size(key: bytes | None, value: bytes, headers) -> int:
    return len(key or b"") + len(value) + sum(len(k) + len(v or b"") for k, v in headers)


class DeadLetters:
    """Sends dead letters and makes them durable on :meth:`flush`, before the batch's offsets move.

    A message too large for one produce request (a 20 MB value, key or header; the producer's limit
    is ``max_request_size``) is dead-lettered without what does not fit: first its value, then its
    own headers and key, each dropped part named in ``error.dropped`` with its size, so the DLQ
    still says which message failed and why (``source.*``). A send that fails is sent again at the
    next flush: the caller retries the batch, and no dead letter is lost or counted twice.
    """

    def __init__(self, producer: KafkaProducer, topic: str):
        self.producer, self.topic = producer, topic
        self.max_bytes = int(producer.config["max_request_size"]) - _HEADROOM
        self._pending: list = []  # (record, error, stage, future)

    def send(self, record, error: Exception) -> None:
        stage = error.stage if isinstance(error, RecordRejected) else "process"
        self._pending.append((record, error, stage, self._send(record, error, stage)))

    def _send(self, record, error: Exception, stage: str):
        key, value, headers = record.key, record.value or b"", dlq_headers(record, error, stage)
        dropped = []
        if _size(key, value, headers) > self.max_bytes:
            dropped.append(f"value={len(value)}")
            value = b""
        if _size(key, value, headers) > self.max_bytes:
            own = list(record.headers or [])
            dropped.append(f"headers={_size(None, b'', own)}")
            headers = _error_headers(record, error, stage)
            if len(key or b"") > 256:
                dropped.append(f"key={len(key)}")
                key = key[:256]
            headers = [(k, v[:4096]) for k, v in headers]  # error.message may quote the oversized part
        if dropped:
            headers.append(("error.dropped", ",".join(dropped).encode()))
        return self.producer.send(self.topic, key=key, value=value, headers=headers)

    def use(self, producer: KafkaProducer) -> None:
        """Send on ``producer`` from now on, what is pending again on it."""
        self.producer = producer
        self._pending = [(rec, error, stage, self._send(rec, error, stage)) for rec, error, stage, _ in self._pending]

    def flush(self, timeout: float = 30.0) -> int:
        """Block until every pending dead letter is acknowledged, then count them. If any failed, it is
        queued again and the first error is raised: retry the batch (it is not committed)."""
        if not self._pending:
            return 0
        self.producer.flush(timeout)
        done, failed, first = [], [], None
        for rec, error, stage, fut in self._pending:
            try:
                fut.get(timeout=0)
                done.append(stage)
            except KafkaError as exc:
                first = first or exc
                failed.append((rec, error, stage, self._send(rec, error, stage)))
        self._pending = failed
        for stage in done:
            DEAD_LETTERED.labels(stage=stage).inc()
        if first is not None:
            raise first
        return len(done)
