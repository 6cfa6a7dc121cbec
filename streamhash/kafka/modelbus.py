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
skipped. A learner reading the changelog rather than the shards knows no seq (a restored shard numbers its
items anew): it names the item's Kafka timestamp instead (``ts``), and a re-sent item, which has a new one, is
stale the same way.

The learner publishes a model *before* any code learned with it (both flushed, acknowledged), so no shard
ever holds codes of a version that was never published.

Both topics are input like any other: whoever may write to them could plant a record. Each record is parsed
by one function per topic (:func:`parse_model`, :func:`parse_code`) that raises only
:class:`~streamhash.errors.InternalRecordRejected`: strict types and ranges, a size bound, and — with a
shared ``key`` — an HMAC-SHA256 signature (header ``streamhash-signature``) over the topic, key, metadata and
value, so a principal that can write to the topic but does not hold the key cannot plant a model or a code.
:class:`ModelReader` also keeps the versions in order (never backwards, never past a gap: the learner numbers
them one by one) and runs the caller's ``check`` (the network loads, fits and encodes a probe) before a
version is handed out; what it refuses goes to ``on_reject``, never to the caller.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from streamhash.config import KafkaSettings
from streamhash.errors import InternalRecordRejected
from streamhash.kafka.reading import read_to_end
from streamhash.metrics import INTERNAL_REJECTED

log = logging.getLogger(__name__)

MODEL_HEADER = "streamhash-model"
SIGNATURE_HEADER = "streamhash-signature"
MAX_MODEL_BYTES = 64 << 20  # the models topic's max.message.bytes; a network is ~1.2 MB at the default backbone
MAX_VERSION = 2**31 - 1  # versions and generations are numbered one by one from 1: anything near this is forged
MAX_META_BYTES = 4096
MAX_CODE_VALUE_BYTES = 4096  # {"seq", "kind", "model_version", "code"}: a 1024-bit code is 256 hex characters


@dataclass(frozen=True)
class ModelAnnouncement:
    version: int
    generation: int
    reencode: bool  # the learner's MI test fired: shards below ``generation`` re-encode into it
    raw: bytes  # HashNet.to_bytes()
    published: float = 0.0
    net: object = field(default=None, compare=False, repr=False)  # the network, once a reader's check loaded it


@dataclass(frozen=True)
class CodeUpdate:
    """One item's learned code (``kind="learned"``) or its quarantine (``kind="quarantine"``: a round
    failed on it; it keeps its inferred code and is never learned from)."""

    item_id: str
    seq: int
    kind: str
    model_version: int
    code: bytes = b""
    ts: float | None = None  # the item's timestamp when learned, in place of its seq (a changelog-fed learner)

    def to_value(self) -> bytes:
        d = {"seq": self.seq, "kind": self.kind, "model_version": self.model_version, "code": self.code.hex()}
        if self.ts is not None:
            d["ts"] = self.ts
        return json.dumps(d).encode()

    def matches(self, rec: dict) -> bool:
        """Whether the stored item ``rec`` is the one this update was learned from (not written again since)."""
        if self.ts is None:
            return rec["seq"] == self.seq
        return rec.get("ts") is not None and round(float(rec["ts"]) * 1000) == round(self.ts * 1000)

    @classmethod
    def from_record(cls, key: bytes, value: bytes) -> "CodeUpdate":
        """The update a codes-topic record carries (unsigned, any code length): :func:`parse_code` checks more."""
        return _code_update(key, value, None)


def model_key(version: int) -> bytes:
    return f"model-{version:012d}".encode()


def signature(key: bytes, topic: str, record_key: bytes, meta: bytes, value: bytes) -> bytes:
    """HMAC-SHA256 (hex) of one internal record. The topic is part of it, so a record signed for one pipeline's
    topic (or a code signed for the codes topic) is refused on another."""
    mac = hmac.new(key, digestmod=hashlib.sha256)
    for part in (topic.encode(), record_key or b"", meta, value or b""):
        mac.update(len(part).to_bytes(8, "big"))  # length-prefixed: no two splits of the bytes sign alike
        mac.update(part)
    return mac.hexdigest().encode()


def _reject(stage: str, record, reason: str) -> InternalRecordRejected:
    """The rejection, located at its record when there is one (``CodeUpdate.from_record`` has only key and value)."""
    where = "" if record is None else f"{record.topic}[{record.partition}] offset {record.offset}: "
    return InternalRecordRejected(stage, where + reason)


def _header(record, name: str, stage: str) -> bytes | None:
    values = [v for k, v in (record.headers or []) if k == name]
    if len(values) > 1:
        raise _reject(stage, record, f"{len(values)} {name} headers (one expected)")
    return values[0] if values else None


def _verify(record, stage: str, key: bytes | None, meta: bytes) -> None:
    if key is None:
        return
    got = _header(record, SIGNATURE_HEADER, stage)
    if got is None:
        raise _reject(stage, record, f"not signed (no {SIGNATURE_HEADER} header) and a model key is set")
    if not hmac.compare_digest(got, signature(key, record.topic, record.key, meta, record.value)):
        raise _reject(stage, record, "bad signature: not signed with this pipeline's model key")


def _count(d: dict, name: str, record, stage: str, *, low: int = 1, high: int = MAX_VERSION) -> int:
    v = d.get(name)
    if type(v) is not int or not low <= v <= high:  # bool is an int subclass: refused, as are floats and strings
        raise _reject(stage, record, f"{name} must be an integer in {low}..{high}, got {v!r}"[:300])
    return v


def parse_model(record, key: bytes | None = None) -> ModelAnnouncement:
    """A models-topic record as an announcement, or :class:`InternalRecordRejected` (stage ``models``) saying why.
    Only the form is checked here; :class:`ModelReader` checks the order and runs the content check."""
    raw_meta = _header(record, MODEL_HEADER, "models")
    if raw_meta is None:
        raise _reject("models", record, f"no {MODEL_HEADER} header")
    if len(raw_meta) > MAX_META_BYTES:
        raise _reject("models", record, f"{MODEL_HEADER} header of {len(raw_meta)} bytes (at most {MAX_META_BYTES})")
    _verify(record, "models", key, raw_meta)
    try:
        meta = json.loads(raw_meta)
    except ValueError as exc:
        raise _reject("models", record, f"{MODEL_HEADER} header is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise _reject("models", record, f"{MODEL_HEADER} header must be a JSON object, got {type(meta).__name__}")
    version = _count(meta, "version", record, "models")
    generation = _count(meta, "generation", record, "models", high=version)  # one generation at most per version
    reencode, published = meta.get("reencode"), meta.get("published", 0.0)
    if type(reencode) is not bool:
        raise _reject("models", record, f"reencode must be true or false, got {reencode!r}"[:300])
    if type(published) not in (int, float) or not math.isfinite(published):
        raise _reject("models", record, f"published must be a number of seconds, got {published!r}"[:300])
    value = record.value
    if not value or len(value) > MAX_MODEL_BYTES:
        raise _reject("models", record, f"a network of {len(value or b'')} bytes (1..{MAX_MODEL_BYTES})")
    if record.key is not None and record.key != model_key(version):
        raise _reject("models", record, f"key {record.key[:64]!r} is not {model_key(version)!r} for version {version}")
    return ModelAnnouncement(version, generation, reencode, value, float(published))


def parse_code(record, code_bytes: int, key: bytes | None = None) -> CodeUpdate:
    """A codes-topic record as an update for a shard of ``code_bytes``-byte codes, or :class:`InternalRecordRejected`
    (stage ``codes``). Whether the item (and its seq) is in the shard is the store's to say (missing, stale)."""
    if record.value is None or len(record.value) > MAX_CODE_VALUE_BYTES:
        raise _reject("codes", record, f"a value of {len(record.value or b'')} bytes (1..{MAX_CODE_VALUE_BYTES})")
    _verify(record, "codes", key, b"")
    u = _code_update(record.key, record.value, record)
    if u.kind == "learned" and len(u.code) != code_bytes:
        raise _reject("codes", record, f"a learned code of {len(u.code)} bytes; this index's codes have {code_bytes}")
    if u.kind == "quarantine" and u.code:
        raise _reject("codes", record, "a quarantine mark carries no code")
    return u


def _code_update(key: bytes | None, value: bytes, record) -> CodeUpdate:
    try:
        item_id = key.decode() if key else ""
        d = json.loads(value)
    except (ValueError, AttributeError) as exc:
        raise _reject("codes", record, f"not a UTF-8 key and a JSON value: {exc}"[:300]) from None
    if not item_id or len(key) > 256:
        raise _reject("codes", record, "the key must be an item id of 1..256 bytes")
    if not isinstance(d, dict):
        raise _reject("codes", record, f"the value must be a JSON object, got {type(d).__name__}")
    kind = d.get("kind")
    if kind not in ("learned", "quarantine"):
        raise _reject("codes", record, f"unknown code update kind {kind!r}"[:300])
    seq = _count(d, "seq", record, "codes", low=0, high=2**63 - 1)
    version = _count(d, "model_version", record, "codes")
    code = d.get("code") or ""
    if not isinstance(code, str):
        raise _reject("codes", record, f"code must be a hex string, got {type(code).__name__}")
    try:
        raw = bytes.fromhex(code)
    except ValueError:
        raise _reject("codes", record, f"code is not hex: {code[:40]!r}") from None
    ts = d.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts)):
        raise _reject("codes", record, f"ts must be a finite number, got {ts!r}"[:300])
    return CodeUpdate(item_id, seq, kind, version, raw, None if ts is None else float(ts))


class ModelPublisher:
    """The learner's producer: a model version, then the codes learned with it; each call returns once acknowledged.
    With a ``key`` every record carries its HMAC signature (:func:`signature`)."""

    def __init__(self, kafka: KafkaSettings, producer: KafkaProducer | None = None, *, key: bytes | None = None):
        self.kafka, self.key = kafka, key
        self.producer = producer or KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=5, retries=5,
                                                  max_request_size=MAX_MODEL_BYTES, batch_size=262_144)

    def _headers(self, topic: str, record_key: bytes, meta: bytes, value: bytes) -> list[tuple[str, bytes]]:
        if self.key is None:
            return []
        return [(SIGNATURE_HEADER, signature(self.key, topic, record_key, meta, value))]

    def publish_model(self, a: ModelAnnouncement) -> None:
        topic, key = self.kafka.models_topic, model_key(a.version)
        meta = json.dumps({"version": a.version, "generation": a.generation, "reencode": a.reencode,
                           "published": time.time()}).encode()
        fut = self.producer.send(topic, key=key, value=a.raw, partition=0,
                                 headers=[(MODEL_HEADER, meta)] + self._headers(topic, key, meta, a.raw))
        self.producer.flush()
        fut.get(timeout=self.kafka.request_timeout_ms / 1000)  # raises when the broker did not take it

    def publish_codes(self, updates: list[tuple[int, CodeUpdate]]) -> None:
        """``(partition, update)`` pairs: each to the codes partition of its item's shard."""
        topic = self.kafka.codes_topic
        futs = []
        for p, u in updates:
            key, value = u.item_id.encode(), u.to_value()
            futs.append(self.producer.send(topic, key=key, value=value, partition=p,
                                           headers=self._headers(topic, key, b"", value)))
        self.producer.flush()
        for f in futs:
            f.get(timeout=self.kafka.request_timeout_ms / 1000)

    def close(self) -> None:
        self.producer.close(timeout=5)


def log_rejected(record, exc: InternalRecordRejected) -> None:
    """The default ``on_reject``: counted and a warning (a worker also dead-letters it; the learner and tools have no
    dead-letter producer)."""
    INTERNAL_REJECTED.labels(topic=exc.stage).inc()
    log.warning("skipping a record of %s: %s", record.topic, exc)


class ModelReader:
    """Reads ``streamhash.models`` from its start (no group: every reader sees every version).

    A version is handed out only if it parses (:func:`parse_model`, signed when ``key`` is set), comes in
    order — the next version after the last one handed out, in the same or the next generation; the first one
    read may be any (older ones were compacted away or the log was reset) — and passes ``check`` (which may
    return the announcement with its loaded network). Anything else goes to ``on_reject(record, error)``.
    A record of the version last handed out with the same bytes (a producer retry) is skipped silently.
    """

    def __init__(self, kafka: KafkaSettings, *, key: bytes | None = None,
                 check: Callable[[ModelAnnouncement], ModelAnnouncement] | None = None,
                 on_reject: Callable[[object, InternalRecordRejected], None] = log_rejected):
        self.kafka, self.key, self.check, self.on_reject = kafka, key, check, on_reject
        self.last: ModelAnnouncement | None = None
        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", max_partition_fetch_bytes=MAX_MODEL_BYTES,
                                      fetch_max_bytes=MAX_MODEL_BYTES, client_id="streamhash-models",
                                      # the embedded broker holds a fetch this long even when data has come
                                      # (config.KafkaSettings): a new version is adopted that much sooner
                                      fetch_max_wait_ms=kafka.fetch_max_wait_ms)
        self.tp = TopicPartition(kafka.models_topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)

    def poll(self, timeout_s: float = 0.0) -> list[ModelAnnouncement]:
        """New versions that passed every check, in offset order."""
        out = []
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        hw = self.consumer.highwater(self.tp)
        if hw is not None and self.consumer.position(self.tp) > hw:
            # The log is behind what was read: the broker's log was reset or the topic re-created. Its versions
            # come again from its start, and the first one read sets the order anew (the learner goes on numbering).
            log.warning("%s is behind what was read (offset %d, end %d): the log was reset; reading it from its start",
                        self.tp.topic, self.consumer.position(self.tp), hw)
            self.consumer.seek_to_beginning(self.tp)
            self.last = None
            return out
        for batch in polled.values():
            for rec in batch:
                try:
                    a = self.admit(rec)
                except InternalRecordRejected as exc:
                    self.on_reject(rec, exc)
                    continue
                if a is not None:
                    out.append(a)
        return out

    def admit(self, rec) -> ModelAnnouncement | None:
        a, last = parse_model(rec, self.key), self.last
        if last is not None:
            if a.version == last.version and a.raw == last.raw:
                return None
            if a.version != last.version + 1:
                raise _reject("models", rec, f"version {a.version} after version {last.version}: versions are "
                                             f"published one by one, never again, backwards or past a gap")
            if a.generation not in (last.generation, last.generation + 1):
                raise _reject("models", rec, f"generation {a.generation} after generation {last.generation}: it "
                                             f"stays or moves up by one")
        if self.check is not None:
            a = self.check(a)
        self.last = a
        return a

    def read_to_end(self, timeout_s: float = 30.0) -> list[ModelAnnouncement]:
        """Every version published so far (:func:`~streamhash.kafka.reading.read_to_end`)."""
        return read_to_end(self.consumer, [self.tp], self.poll, timeout_s)

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def latest(announcements: list[ModelAnnouncement]) -> ModelAnnouncement | None:
    return max(announcements, key=lambda a: a.version, default=None)

