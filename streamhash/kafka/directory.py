"""Which query server serves which partition: the serving topic (``<images>.serving``), read by the router.

Each query server that advertises (``server.advertise_url``) keeps one record on this compacted, one-partition
topic, keyed by its URL: a JSON value ``{"url", "partitions", "restoring", "ts"}`` — the images partitions whose
shards it serves (not fenced: a shard whose partition moved away is left out), those of them still restoring, and
when it said so (seconds since the epoch, its clock). It publishes again when the set changes and on a heartbeat,
and a tombstone (null value) when it stops cleanly. A reader keeps the newest record per key in a
:class:`ServingMap`; a record older than the TTL is a server that died without its tombstone and is ignored.

The map routes every partition to exactly one server (:meth:`ServingMap.routes`): among the live records that name
it, a ready copy before a restoring one, then the newest record, then the URL (so every router picks alike).

With the pipeline's ``key`` (``security.model_key``) every record, tombstones included, carries the HMAC signature
of the other internal topics (:func:`streamhash.kafka.modelbus.signature`); a reader with the key refuses a record
without it or with a wrong one (:class:`~streamhash.errors.InternalRecordRejected`, stage ``serving``): whoever may
write to the topic cannot steer searches to a server of theirs, nor take a partition off the map.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamhash.config import KafkaSettings
from streamhash.errors import InternalRecordRejected
from streamhash.kafka.modelbus import SIGNATURE_HEADER, _reject, _verify, log_rejected, signature
from streamhash.kafka.reading import read_to_end

log = logging.getLogger(__name__)

STAGE = "serving"
MAX_VALUE_BYTES = 64 * 1024
MAX_URL_BYTES = 2048
MAX_PARTITION = 1 << 20


@dataclass(frozen=True)
class Advert:
    """One query server's word: the partitions it serves at ``url`` (``restoring``: a subset still restoring)."""

    url: str
    partitions: frozenset[int]
    restoring: frozenset[int] = frozenset()
    ts: float = 0.0

    def to_value(self) -> bytes:
        return json.dumps({"url": self.url, "partitions": sorted(self.partitions), "restoring": sorted(self.restoring),
                           "ts": self.ts}).encode()


def parse_advert(record, key: bytes | None = None) -> tuple[str, Advert | None]:
    """A serving-topic record as (server key, its advert or None for a tombstone), or InternalRecordRejected."""
    if not record.key or len(record.key) > MAX_URL_BYTES:
        raise _reject(STAGE, record, f"the key must be a server's URL of 1..{MAX_URL_BYTES} bytes")
    if record.value is not None and len(record.value) > MAX_VALUE_BYTES:
        raise _reject(STAGE, record, f"a value of {len(record.value)} bytes (at most {MAX_VALUE_BYTES})")
    _verify(record, STAGE, key, b"")
    try:
        server = record.key.decode()
        d = None if record.value is None else json.loads(record.value)
    except ValueError as exc:
        raise _reject(STAGE, record, f"not a UTF-8 key and a JSON value: {exc}"[:300]) from None
    if d is None:
        return server, None
    if not isinstance(d, dict):
        raise _reject(STAGE, record, f"the value must be a JSON object, got {type(d).__name__}")
    url, ts = d.get("url"), d.get("ts")
    if url != server or not url.startswith(("http://", "https://")):
        raise _reject(STAGE, record, f"url {str(url)[:80]!r} must be an http(s) URL equal to the key")
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise _reject(STAGE, record, f"ts must be a number of seconds, got {ts!r}"[:300])
    parts, restoring = (_partitions(d.get(name), name, record) for name in ("partitions", "restoring"))
    if not restoring <= parts:
        raise _reject(STAGE, record, "restoring must be a subset of partitions")
    return server, Advert(url, parts, restoring, float(ts))


def _partitions(v, name: str, record) -> frozenset[int]:
    if not isinstance(v, list) or any(type(p) is not int or not 0 <= p < MAX_PARTITION for p in v):
        raise _reject(STAGE, record, f"{name} must be a list of partition numbers, got {v!r}"[:300])
    return frozenset(v)


@dataclass(frozen=True)
class Routes:
    """Where one search goes: each server with the partitions it answers for (servers in the order of their
    lowest partition), the partitions whose only copy is restoring, and those nobody serves."""

    servers: dict[str, tuple[int, ...]]
    restoring: frozenset[int]
    missing: tuple[int, ...]

    @property
    def partial(self) -> bool:
        return bool(self.restoring or self.missing)


class ServingMap:
    """The newest advert per server key, as read from the serving topic; thread-safe."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._adverts: dict[str, Advert] = {}
        self._lock = threading.Lock()

    def apply(self, server: str, advert: Advert | None) -> None:
        with self._lock:
            if advert is None:
                self._adverts.pop(server, None)
            elif server not in self._adverts or advert.ts >= self._adverts[server].ts:
                self._adverts[server] = advert  # never an older word over a newer one (a producer's retry)

    def live(self, now: float | None = None) -> list[Advert]:
        now = time.time() if now is None else now
        with self._lock:
            return [a for a in self._adverts.values() if now - a.ts <= self.ttl_s]

    def routes(self, partitions: Iterable[int], now: float | None = None) -> Routes:
        """Every partition of ``partitions`` to one server (see the module), or missing."""
        live = self.live(now)
        chosen: dict[int, Advert] = {}
        missing = []
        for p in sorted(set(partitions)):
            found = [a for a in live if p in a.partitions]
            if not found:
                missing.append(p)
                continue
            chosen[p] = min(found, key=lambda a: (p in a.restoring, -a.ts, a.url))
        servers: dict[str, list[int]] = {}
        for p, a in chosen.items():
            servers.setdefault(a.url, []).append(p)
        return Routes({url: tuple(ps) for url, ps in servers.items()},
                      frozenset(p for p, a in chosen.items() if p in a.restoring), tuple(missing))


RETENTION_MS = 3_600_000  # an advert is worth nothing past its TTL: an hour of heartbeats kept at most


def ensure_serving_topic(kafka: KafkaSettings) -> None:
    """Create the serving topic (one partition, compacted and deleted after RETENTION_MS: a router reads it from
    its start, and a heartbeat every few seconds would otherwise grow it for ever where compaction lags) if it is
    missing: a producer's first send would otherwise auto-create it with the broker's default partitions."""
    admin = KafkaAdminClient(client_id="streamhash-admin", **kafka.client_kwargs())
    try:
        if kafka.serving_topic not in set(admin.list_topics()):
            try:
                admin.create_topics([NewTopic(kafka.serving_topic, num_partitions=1, replication_factor=1,
                                              topic_configs={"cleanup.policy": "compact,delete",
                                                             "retention.ms": str(RETENTION_MS)})])
                log.info("created topic %s", kafka.serving_topic)
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()


class Advertiser:
    """A query server's side: its advert on the serving topic, signed with ``key`` when given."""

    def __init__(self, kafka: KafkaSettings, url: str, *, key: bytes | None = None, producer: KafkaProducer | None = None):
        self.topic, self.url, self.key = kafka.serving_topic, url.rstrip("/"), key
        self.producer = producer or KafkaProducer(**kafka.client_kwargs(), acks="all", retries=5, linger_ms=0)

    def _send(self, value: bytes | None) -> None:
        record_key = self.url.encode()
        headers = [] if self.key is None else [
            (SIGNATURE_HEADER, signature(self.key, self.topic, record_key, b"", value or b""))]
        self.producer.send(self.topic, key=record_key, value=value, headers=headers, partition=0).get(timeout=30)

    def publish(self, partitions: Iterable[int], restoring: Iterable[int] = ()) -> Advert:
        advert = Advert(self.url, frozenset(partitions), frozenset(restoring), time.time())
        self._send(advert.to_value())
        return advert

    def withdraw(self) -> None:
        """The tombstone: this server serves nothing any more."""
        self._send(None)

    def close(self) -> None:
        self.producer.close(timeout=5)


class DirectoryReader:
    """The serving topic read from its start into a :class:`ServingMap`, then followed (:meth:`follow`)."""

    def __init__(self, kafka: KafkaSettings, ttl_s: float, *, key: bytes | None = None,
                 on_reject: Callable[[object, InternalRecordRejected], None] = log_rejected):
        self.map, self.key, self.on_reject = ServingMap(ttl_s), key, on_reject
        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                                      auto_offset_reset="earliest", client_id="streamhash-router",
                                      fetch_max_wait_ms=kafka.fetch_max_wait_ms)
        self.tp = TopicPartition(kafka.serving_topic, 0)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self, timeout_s: float = 0.0) -> list:
        polled = self.consumer.poll(timeout_ms=int(timeout_s * 1000))
        for batch in polled.values():
            for rec in batch:
                try:
                    server, advert = parse_advert(rec, self.key)
                except InternalRecordRejected as exc:
                    self.on_reject(rec, exc)
                    continue
                self.map.apply(server, advert)
        return []

    def read_to_end(self, timeout_s: float = 30.0) -> None:
        read_to_end(self.consumer, [self.tp], self.poll, timeout_s)

    def follow(self, also: Callable[[], None] | None = None) -> "DirectoryReader":
        """Keep reading in a thread until :meth:`close` (a broker away for a while is retried, logged once);
        ``also`` runs between polls, on that thread (the consumer is not thread-safe: use it there only)."""
        def loop():
            failing = False
            while not self._stop.is_set():
                try:
                    self.poll(0.2)
                    if also is not None:
                        also()
                    failing = False
                except Exception as exc:  # noqa: BLE001 - the router keeps routing on the map it has
                    if not failing:
                        log.warning("reading %s failed (%s: %s); retrying", self.tp.topic, type(exc).__name__, exc)
                    failing = True
                    self._stop.wait(1.0)

        self._thread = threading.Thread(target=loop, name="serving-directory", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.consumer.close(autocommit=False)
