"""The learner's two topics: model versions on ``streamhash.models``, learned codes on ``streamhash.codes``.

``streamhash.models`` (one partition, ``cleanup.policy=compact``) holds one message per model version,
keyed ``model-<version>``: the serialised network as the value (:meth:`HashNet.to_bytes`, which carries
its config) and a ``streamhash-model`` header (JSON: version, generation, reencode, published). A
version whose generation is above a shard's is a re-encode announcement: the worker owning the shard
re-encodes it into that generation. Readers take the highest version; compaction keeps every version
(distinct keys), which is what a query server needs for a shard still serving an older generation.

``streamhash.codes`` is co-partitioned with the images topic (same partition count; the learner sends
each code to the partition of the shard its item lives in), so the worker that owns images partition p
owns codes partition p and applies them in its own transaction, with the codes topic's offset beside
them. A value is one item's learned (DCC) code or a quarantine mark, keyed by item id, with the item's
seq in its shard when learned: a code for an item since written again (another seq) is stale and
skipped.

The learner publishes a model *before* any code learned with it (both flushed, acknowledged), so no shard
ever holds codes of a version that was never published.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamhash.config import KafkaSettings
from streamhash.errors import BrokerError

log = logging.getLogger(__name__)

MODEL_HEADER = "streamhash-model"
MAX_MODEL_BYTES = 64 << 20  # the models topic's max.message.bytes; a network is ~1.2 MB at the default backbone


@dataclass(frozen=True)
class ModelAnnouncement:
    version: int
    generation: int
    reencode: bool  # the learner's MI test fired: shards below ``generation`` re-encode into it
    raw: bytes  # HashNet.to_bytes()
    published: float = 0.0


@dataclass(frozen=True)
class CodeUpdate:
    """One item's learned code (``kind="learned"``) or its quarantine (``kind="quarantine"``: a round
    failed on it; it keeps its inferred code and is never learned from)."""

    item_id: str
    seq: int
    kind: str
    model_version: int
    code: bytes = b""

    def to_value(self) -> bytes:
        return json.dumps({"seq": self.seq, "kind": self.kind, "model_version": self.model_version,
                           "code": self.code.hex()}).encode()

    @classmethod
    def from_record(cls, key: bytes, value: bytes) -> "CodeUpdate":
        d = json.loads(value)
        kind = d["kind"]
        if kind not in ("learned", "quarantine"):
            raise ValueError(f"unknown code update kind {kind!r}")
        return cls(key.decode(), int(d["seq"]), kind, int(d["model_version"]), bytes.fromhex(d.get("code") or ""))


def model_key(version: int) -> bytes:
    return f"model-{version:012d}".encode()


def parse_model(record) -> ModelAnnouncement:
    meta = next((json.loads(v) for k, v in (record.headers or []) if k == MODEL_HEADER), None)
    if meta is None:
        raise ValueError(f"message at offset {record.offset} of the models topic has no {MODEL_HEADER} header")
    return ModelAnnouncement(int(meta["version"]), int(meta["generation"]), bool(meta["reencode"]), record.value,
                             float(meta.get("published", 0.0)))


class ModelPublisher:
    """The learner's producer: a model version, then the codes learned with it; each call returns once acknowledged."""

    def __init__(self, kafka: KafkaSettings, producer: KafkaProducer | None = None):
        self.kafka = kafka
        self.producer = producer or KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=5, retries=5,
                                                  max_request_size=MAX_MODEL_BYTES, batch_size=262_144)

    def publish_model(self, a: ModelAnnouncement) -> None:
        meta = {"version": a.version, "generation": a.generation, "reencode": a.reencode, "published": time.time()}
        fut = self.producer.send(self.kafka.models_topic, key=model_key(a.version), value=a.raw, partition=0,
                                 headers=[(MODEL_HEADER, json.dumps(meta).encode())])
        self.producer.flush()
        fut.get(timeout=self.kafka.request_timeout_ms / 1000)  # raises when the broker did not take it

    def publish_codes(self, updates: list[tuple[int, CodeUpdate]]) -> None:
        """``(partition, update)`` pairs: each to the codes partition of its item's shard."""
        futs = [self.producer.send(self.kafka.codes_topic, key=u.item_id.encode(), value=u.to_value(), partition=p)
                for p, u in updates]
        self.producer.flush()
        for f in futs:
            f.get(timeout=self.kafka.request_timeout_ms / 1000)

    def close(self) -> None:
        self.producer.close(timeout=5)


class ModelReader:
    """Reads ``streamhash.models`` from its start (no group: every reader sees every version)."""

    def __init__(self, kafka: KafkaSettings):
        self.kafka = kafka
        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_MODEL_BYTES,
                                      fetch_max_bytes=MAX_MODEL_BYTES, client_id="streamhash-models")
        self.tp = TopicPartition(kafka.models_topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)

    def poll(self, timeout_s: float = 0.0) -> list[ModelAnnouncement]:
        """New versions, in offset order; a malformed message is logged and skipped (it cannot be a model)."""
        out = []
        for batch in self.consumer.poll(timeout_ms=int(timeout_s * 1000)).values():
            for rec in batch:
                try:
                    out.append(parse_model(rec))
                except (ValueError, KeyError) as exc:
                    log.error("skipping offset %d of %s: %s", rec.offset, self.tp.topic, exc)
        return out

    def read_to_end(self, timeout_s: float = 30.0) -> list[ModelAnnouncement]:
        """Every version published so far. The end is the fetch high watermark (``end_offsets`` is wrong on Tansu)."""
        deadline = time.monotonic() + timeout_s
        out: list[ModelAnnouncement] = []
        while True:
            out += self.poll(0.2)
            hw = self.consumer.highwater(self.tp)
            if hw is not None and self.consumer.position(self.tp) >= hw:
                return out
            if time.monotonic() > deadline:
                raise BrokerError(f"could not read {self.tp.topic} to its end within {timeout_s:.0f}s")

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def latest(announcements: list[ModelAnnouncement]) -> ModelAnnouncement | None:
    return max(announcements, key=lambda a: a.version, default=None)
