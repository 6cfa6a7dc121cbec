"""Re-routing: a record that arrived on a partition other than its key's home goes to its home partition.

An id must live in exactly one shard (re-sending it overwrites it), and each partition is a shard. Kafka leaves
the partition to the producer: a librdkafka producer (CRC32) and a Java or kafka-python one (murmur2) put one key
on different partitions, and a producer may name a partition itself. Measured before this: 500 ids re-sent
through another partitioner each lived in two shards — a search returned 9,813 distinct ids in 10,000 hits,
``GET /items`` answered a stale label, ``index_size`` overcounted by 500.

Two ways out were weighed (issue 25, item 4):

- **re-route** (built): the worker computes the key's home under ``kafka.partitioner``
  (:mod:`streamhash.kafka.partitioner`) and produces a misplaced record to its home partition — same key, value
  (a tombstone stays a tombstone), headers and timestamp, plus ``streamhash.rehomed-from: <partition>:<offset>`` —
  instead of indexing it. The produce is acknowledged before the source offset is committed (the checkpoint
  flushes it with the dead letters, :mod:`streamhash.kafka.checkpoint`), so a crash between the two re-routes it
  again at worst (a second copy at home, like any replayed record). Every shard stays the one its partition is:
  the query side, the learner's codes (published to the item's shard's partition) and a tombstone's removal
  each find an id where it is, with no lookup across shards.
- **resolve across shards** (newest wins, stale copy deleted): every write would have to look the id up in every
  shard, shards owned by other workers and, on several machines (issue 25, item 1), other disks; a write would
  need a cross-shard transaction or a repair protocol. Rejected.

Cost: a misplaced record crosses the broker twice (~2x its bytes) and reaches the index after a second fetch.
A key that cannot be hashed (none, or not a valid id) is not re-routed: it is dead-lettered where it is, by the
existing contract. A record already re-routed once is never re-routed again (two workers disagreeing on the
partition count or the partitioner would bounce it forever): it is indexed where it is, with a warning.
Order: within a partition Kafka keeps it; a re-routed copy joins its home partition when the worker reaches it,
which may be after a newer send of the same id went there directly (a worker behind by minutes, or one that
crashed between a re-route and its commit and re-routes again). So at home a re-routed copy keeps the
producer's timestamp and is written only if it is not older than what the shard holds for its id (or an
earlier record of the batch): :meth:`Rehome.current`. Records sent to their home directly are never dropped
(their partition orders them). What this cannot order: sends whose producers' clocks disagree by more than
the time between them, and tombstones: the shard keeps no time for an id it removed, so a re-routed copy older
than a removal that came first brings the id back, and a re-routed tombstone is applied whatever its time (one
older than a newer direct write removes it). Kafka gives no order across partitions either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kafka.errors import KafkaError

from streamhash import metrics as m
from streamhash.errors import RecordRejected
from streamhash.kafka.partitioner import home_partitioner
from streamhash.records import MAX_HEADERS, parse_key

log = logging.getLogger("streamhash.worker")

HEADER = "streamhash.rehomed-from"


class Rehome:
    """Sends records of ``topic`` that are away from their home partition there; :meth:`flush` makes them durable
    before the batch's offsets move (the dead letters' contract, :class:`~streamhash.kafka.dlq.DeadLetters`).

    ``partitions(topic)`` is the topic's partition ids as the consumer's metadata knows them; ``max_value_bytes``
    the contract's limit (a larger value is dead-lettered where it is, with its reason, not sent twice)."""

    def __init__(self, producer, topic: str, partitioner: str, partitions: Callable[[str], set[int]],
                 max_value_bytes: int):
        self.producer, self.topic, self.partitions = producer, topic, partitions
        self.home = home_partitioner(partitioner)
        self.max_value_bytes = max_value_bytes
        self._pending: list = []  # (record, home partition, future)

    def away(self, rec) -> bool:
        """Whether ``rec`` belongs on another partition; if so it is sent there (acknowledged at :meth:`flush`) and
        the caller leaves it out of the batch (its offset still commits with the batch)."""
        if rec.topic != self.topic:
            return False
        n = len(self.partitions(rec.topic) or ())
        if n <= 1:
            return False
        try:
            parse_key(rec.key)
        except RecordRejected:
            return False  # dead-lettered here, with the reason
        home = self.home(rec.key, n)
        if home == rec.partition:
            return False
        if rec.value is not None and len(rec.value) > self.max_value_bytes:
            return False
        headers = list(rec.headers or [])
        if any(name == HEADER for name, _ in headers):
            log.warning("%s[%d]@%d was re-routed here already (%s) yet belongs on partition %d under this worker's "
                        "partitioner and %d partitions: indexed here; do the workers agree on kafka.partitioner?",
                        rec.topic, rec.partition, rec.offset, dict(headers)[HEADER].decode(errors="replace"), home, n)
            return False
        self._pending.append((rec, home, self._send(rec, home)))
        return True

    def _send(self, rec, home: int):
        headers = list(rec.headers or [])
        if len(headers) < MAX_HEADERS:  # one more would make a valid record invalid at home: send it without
            headers.append((HEADER, f"{rec.partition}:{rec.offset}".encode()))
        return self.producer.send(self.topic, key=rec.key, value=rec.value, headers=headers, partition=home,
                                  timestamp_ms=rec.timestamp if rec.timestamp and rec.timestamp > 0 else None)

    def use(self, producer) -> None:
        """Send on ``producer`` from now on, what is pending again on it."""
        self.producer = producer
        self._pending = [(rec, home, self._send(rec, home)) for rec, home, _ in self._pending]

    def flush(self, timeout: float = 30.0) -> int:
        """Block until every re-routed record is acknowledged, then count them. A failed one is sent again and the
        first error raised: the caller retries the batch (it is not committed)."""
        if not self._pending:
            return 0
        self.producer.flush(timeout)
        done, failed, first = 0, [], None
        for rec, home, fut in self._pending:
            try:
                fut.get(timeout=0)
                done += 1
            except KafkaError as exc:
                first = first or exc
                failed.append((rec, home, self._send(rec, home)))
        self._pending = failed
        m.REROUTED.labels(topic=self.topic).inc(done)
        if first is not None:
            raise first
        return done

    def current(self, records, sources, stamps, shards, store_of) -> list[int]:
        """The rows of a batch to write (indexes into these parallel lists): every record that came to its home
        directly, and each re-routed one unless its id's newest write so far — an earlier record of the batch, or
        what its shard holds (``store_of(shard).get_item``) — has a later timestamp. Called after the batch
        before it committed, so the shard is up to date."""
        keep, newest = [], {}  # (shard, id) -> timestamp of the write that stands so far in this batch
        for i, (rec, src, ts, shard) in enumerate(zip(records, sources, stamps, shards)):
            if any(name == HEADER for name, _ in src.headers or ()):
                if (shard, rec.id) not in newest:
                    store = store_of(shard)  # None: revoked under the batch, which then fails as a whole
                    held = store.get_item(rec.id) if store is not None else None
                    newest[(shard, rec.id)] = held["ts"] if held else None
                stands = newest[(shard, rec.id)]
                if stands is not None and stands > ts:
                    m.REROUTED_STALE.labels(topic=self.topic).inc()
                    continue
            newest[(shard, rec.id)] = ts
            keep.append(i)
        return keep
