"""Dead letters on a real broker: oversized messages still reach the DLQ, failed sends are retried."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from kafka import KafkaConsumer

from streamhash.errors import RecordRejected
from streamhash.kafka.dlq import DeadLetters
from streamhash.kafka.produce import make_producer
from streamhash.kafka.topics import ensure_topics

pytestmark = pytest.mark.integration


def record(key: bytes, value: bytes, headers, offset: int):
    return SimpleNamespace(key=key, value=value, headers=headers, topic="src", partition=0, offset=offset)


def test_oversized_messages_reach_the_dlq_without_what_does_not_fit(kafka_settings):
    """A 20 MB value was once refused by the producer (MessageSizeTooLargeError) in flush: the worker
    exited 1 and crash-looped on the same message."""
    ensure_topics(kafka_settings)
    dlq = DeadLetters(make_producer(kafka_settings), kafka_settings.dlq_topic)
    big = b"x" * (20 << 20)
    dlq.send(record(b"big-value", big, [("labels", b"1")], 1), RecordRejected("value", "value too large"))
    dlq.send(record(b"k" * (20 << 20), b"v", [("labels", big)], 2), RecordRejected("key", "key too long"))
    dlq.send(record(b"small", b"v", [("labels", b"1")], 3), RecordRejected("decode", "bad"))
    assert dlq.flush() == 3
    dlq.producer.close()
    consumer = KafkaConsumer(kafka_settings.dlq_topic, **kafka_settings.client_kwargs(), auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, enable_auto_commit=False, fetch_max_bytes=64 << 20,
                             max_partition_fetch_bytes=64 << 20)
    got = {int(dict(r.headers)["source.offset"]): r for r in consumer}
    consumer.close()
    assert set(got) == {1, 2, 3}
    h1 = dict(got[1].headers)
    assert got[1].key == b"big-value" and got[1].value == b"" and h1["labels"] == b"1"
    assert h1["error.dropped"] == f"value={20 << 20}".encode() and h1["error.stage"] == b"value"
    h2 = dict(got[2].headers)
    assert len(got[2].key) == 256 and "labels" not in h2 and b"key=" in h2["error.dropped"]
    assert "error.dropped" not in dict(got[3].headers) and got[3].value == b"v"
