"""Reading the dead-letter topic back: what was refused, why, and from where; and replaying it.

Each dead letter carries the original key, value and headers plus ``error.class``, ``error.message``,
``error.stage`` and ``source.topic`` / ``source.partition`` / ``source.offset`` (:mod:`streamhash.kafka.dlq`).
A batch replayed after a worker's crash can dead-letter a message twice: :func:`read_dead_letters`
keeps the first of each (source topic, partition, offset). :func:`replay` sends letters back to the
images topic with their own key, value and headers (the ``error.*`` and ``source.*`` ones dropped),
for after the cause was fixed (a worker setting, a producer bug).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamhash.config import KafkaSettings
from streamhash.errors import BrokerError
from streamhash.kafka.reading import read_to_end

# header prefixes the dead-lettering added, and the worker's re-route (a replay is a new send: it may be re-routed)
_ADDED = ("error.", "source.", "streamhash.rehomed-from")


class NoDeadLetterTopic(BrokerError):
    """The broker has no such dead-letter topic: nothing was dead-lettered there yet (workers create it), or the
    name is wrong."""


@dataclass(frozen=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(repr=False)
    partition: int  # of the dead-letter topic
    offset: int
    timestamp_ms: int

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return (v or b"").decode("utf-8", errors="replace")
        return None

    @property
    def stage(self) -> str:
        return self.header("error.stage") or "?"

    @property
    def error_class(self) -> str:
        return self.header("error.class") or "?"

    @property
    def reason(self) -> str:
        return self.header("error.message") or ""

    @property
    def source(self) -> tuple[str | None, int | None, int | None]:
        """(topic, partition, offset) of the refused message."""
        part, off = self.header("source.partition"), self.header("source.offset")
        return (self.header("source.topic"), int(part) if part and part.isdigit() else None,
                int(off) if off and off.isdigit() else None)

    @property
    def original_headers(self) -> list[tuple[str, bytes]]:
        """The headers the producer sent: without what dead-lettering added."""
        return [(k, v) for k, v in self.headers if not k.startswith(_ADDED)]

    def as_dict(self) -> dict:
        topic, part, off = self.source
        return {"key": _text(self.key), "stage": self.stage, "error_class": self.error_class, "reason": self.reason,
                "source_topic": topic, "source_partition": part, "source_offset": off, "value_bytes": len(self.value),
                "dropped": self.header("error.dropped"), "dlq_partition": self.partition, "dlq_offset": self.offset,
                "timestamp_ms": self.timestamp_ms}


def _text(key: bytes | None) -> str | None:
    return None if key is None else key.decode("utf-8", errors="backslashreplace")


class DeadLetterReader:
    """Every partition of the dead-letter topic from its start, with no consumer group (reading commits
    nothing, so it never moves anyone's offsets)."""

    def __init__(self, kafka: KafkaSettings):
        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", client_id="streamhash-dlq-reader",
                                      fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20)
        partitions = self.consumer.partitions_for_topic(kafka.dlq_topic)
        if not partitions:
            self.consumer.close()
            raise NoDeadLetterTopic(f"no topic {kafka.dlq_topic} on the broker (STREAMHASH_KAFKA__DLQ_TOPIC): "
                              "nothing was dead-lettered there yet, or the name is wrong")
        self.tps = [TopicPartition(kafka.dlq_topic, p) for p in sorted(partitions)]
        self.consumer.assign(self.tps)
        self.consumer.seek_to_beginning(*self.tps)
        self._seen: set = set()

    def poll(self, timeout_s: float = 0.2) -> list[DeadLetter]:
        """New dead letters, first of each source message only."""
        out = []
        for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for r in batch:
                letter = DeadLetter(r.key, r.value or b"", list(r.headers or []), r.partition, r.offset, r.timestamp)
                src = letter.source
                if None not in src:
                    if src in self._seen:
                        continue
                    self._seen.add(src)
                out.append(letter)
        return sorted(out, key=lambda d: (d.timestamp_ms, d.partition, d.offset))

    def read_to_end(self, timeout_s: float = 30.0) -> list[DeadLetter]:
        """Every dead letter so far (:func:`~streamhash.kafka.reading.read_to_end`), oldest first."""
        return sorted(read_to_end(self.consumer, self.tps, self.poll, timeout_s),
                      key=lambda d: (d.timestamp_ms, d.partition, d.offset))

    def follow(self, stop_after_s: float | None = None) -> Iterator[DeadLetter]:
        """New dead letters as they come (after :meth:`read_to_end`), until ``stop_after_s`` or forever."""
        end = None if stop_after_s is None else time.monotonic() + stop_after_s
        while end is None or time.monotonic() < end:
            yield from self.poll(0.5)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def summarize(letters: Iterable[DeadLetter]) -> dict:
    """Counts by stage and by (stage, error class), most frequent first."""
    letters = list(letters)
    by_stage = Counter(d.stage for d in letters)
    by_class = Counter(f"{d.stage}/{d.error_class}" for d in letters)
    return {"total": len(letters), "by_stage": dict(by_stage.most_common()), "by_class": dict(by_class.most_common())}


def replay(producer: KafkaProducer, topic: str, letters: Iterable[DeadLetter]) -> int:
    """Send each letter's original message (key, value, producer's headers) to ``topic``; returns the count.
    A letter whose value was dropped for size (``error.dropped``) cannot be replayed and is skipped."""
    futures = [producer.send(topic, key=d.key, value=d.value, headers=d.original_headers)
               for d in letters if not d.header("error.dropped")]
    producer.flush()
    for fut in futures:
        fut.get(timeout=30)
    return len(futures)
