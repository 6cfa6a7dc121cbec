"""The worker's batch pipeline: poll → parse → encode → checkpoint.

**poll** (:class:`~streamhash.kafka.positions.Positions` drops what a shard already holds and rewinds reset
logs); **parse** each message (:mod:`streamhash.records`; the learner's code updates through the model
follower; rejects go to the dead-letter producer); **encode** each record with the network its shard serves,
on the encoder thread (torch releases the GIL, so the next batch is polled and parsed meanwhile); **commit**
through :class:`~streamhash.kafka.checkpoint.Checkpoint`: DLQ flush → one :class:`ShardWrite` per shard
(its items, then the learner's code updates for it, each with its partitions' offsets) → Kafka commit.

A record with a null value (a Kafka tombstone) removes its item from the shard: codes, blob, record, and
through the shard's ``deletes`` log the query servers' and the learner's copies. Within a batch each id's
last operation wins (written then removed: removed; removed then written again: written).

A failure while handling one message (parse, decode, encode, a malformed code update) sends that message
to the DLQ and never stops the partition.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from streamhash import metrics as m
from streamhash.errors import GenerationChanged, InternalRecordRejected, RecordRejected, StoreError
from streamhash.index import label_names
from streamhash.index.store import ItemWrite
from streamhash.index.store.root import ShardKey
from streamhash.kafka.modelbus import CodeUpdate
from streamhash.records import ImageRecord, parse_key, parse_message

log = logging.getLogger("streamhash.worker")


@dataclass
class Prepared:
    """One batch between parse and commit."""

    valid: list[ImageRecord]
    sources: list  # the Kafka record of each valid one, to dead-letter it if it cannot be encoded
    stamps: list[float]
    shards: list[ShardKey]  # the shard of each valid one
    updates: dict[ShardKey, list[CodeUpdate]]  # the learner's code updates, by shard
    next_offsets: dict[tuple[str, int], int]
    removals: dict[ShardKey, list[str]]  # ids whose last operation in the batch is a tombstone, by shard
    codes: Future  # -> (generation and model version of each record, codes (len(valid), bits/8), stored inputs)
    epoch: int  # Positions.epoch when polled: partitions rewound since then are dropped from the batch

    def keep(self, rows: list[int]) -> None:
        """Keep only these valid records (the others were dead-lettered or belong to a rewound log)."""
        self.valid = [self.valid[i] for i in rows]
        self.sources = [self.sources[i] for i in rows]
        self.stamps = [self.stamps[i] for i in rows]
        self.shards = [self.shards[i] for i in rows]


@dataclass
class ShardWrite:
    """One shard's part of a batch, as data for the checkpoint: its items encoded with its network, then the
    learner's code updates for it, each in one transaction with its partitions' offsets."""

    key: ShardKey
    store: object
    records: list[ImageRecord]
    stamps: list[float]
    serving: tuple[int, int]  # (generation, model version) the codes were encoded for
    codes: np.ndarray
    image_offsets: dict[tuple[str, int], int]
    updates: list[CodeUpdate]
    code_offsets: dict[tuple[str, int], int]
    reencode: object  # (records, their stored inputs) -> codes for the shard's current network (after a re-encode swapped it)
    removals: list[str] = field(default_factory=list)
    features: list[bytes] | None = None  # each record's stored input (a frozen backbone's output), kept with it
    offsets: dict[tuple[str, int], int] = field(init=False)

    def __post_init__(self):
        self.offsets = {**self.image_offsets, **self.code_offsets}

    def write(self) -> None:
        generation, version = self.serving
        codes = self.codes
        label_names.record(self.store, self.records, self.stamps)  # before the items: a reader finds their names
        while True:
            feats = self.features or [None] * len(self.records)
            items = [ItemWrite(r.id, codes[j].tobytes(), r.value, r.content_type, r.labels, self.stamps[j], feats[j])
                     for j, r in enumerate(self.records)]
            try:
                self.store.write_batch(items, self.image_offsets, generation=generation, model_version=version,
                                       deletes=self.removals)
                break
            except GenerationChanged:  # the re-encoder swapped this shard while the batch was encoded
                (generation, version), codes = self.reencode(self.records, self.features)
        m.ITEMS_INDEXED.inc(len(items))
        m.TOMBSTONES.inc(len(self.removals))
        if self.code_offsets or self.updates:
            for result, n in self.store.apply_updates(self.updates, self.code_offsets).items():
                if n:
                    m.CODE_UPDATES.labels(result=result).inc(n)


class BatchPipeline:
    """Parse, encode and commit batches for the shards ``owner`` holds, with the networks ``follower`` loads."""

    def __init__(self, *, owner, follower, spec, encoder, dead_letters, positions, checkpoint, codes_topic: str,
                 bits: int, encode_batch: int, rehome=None):
        self.owner, self.follower, self.spec, self.encoder = owner, follower, spec, encoder
        self.rehome = rehome  # a record away from its key's home partition goes there (services/worker/rehome.py)
        self.dead_letters, self.positions, self.checkpoint = dead_letters, positions, checkpoint
        self.codes_topic, self.bits, self.encode_batch = codes_topic, bits, encode_batch

    def prepare(self, records) -> Prepared:
        """Parse, send rejects to the DLQ producer, and start encoding on the encoder thread."""
        shards = self.owner.shards
        valid: list[ImageRecord] = []
        sources, stamps, keys = [], [], []
        updates: dict[ShardKey, list[CodeUpdate]] = defaultdict(list)
        next_offsets: dict[tuple[str, int], int] = {}
        removed: dict[tuple[ShardKey, str], bool] = {}  # (shard, id) -> whether its last operation so far removes it
        for rec in records:
            tp = (rec.topic, rec.partition)
            next_offsets[tp] = max(next_offsets.get(tp, 0), rec.offset + 1)
            try:
                if rec.topic == self.codes_topic:
                    updates[shards.key_of(*tp)].append(self.follower.code_update(rec))
                    continue
                if self.rehome is not None and self.rehome.away(rec):
                    continue  # produced to its home partition; its offset commits with this batch
                m.MESSAGES_CONSUMED.inc()
                if rec.value is None:  # a tombstone
                    removed[(shards.key_of(*tp), parse_key(rec.key))] = True
                    continue
                valid.append(parse_message(rec.key, rec.value, rec.headers, self.spec))
                removed[(shards.key_of(*tp), valid[-1].id)] = False
            except Exception as exc:  # RecordRejected, or a bug: either way this record, not the partition
                if rec.topic == self.codes_topic:
                    m.INTERNAL_REJECTED.labels(topic="codes").inc()
                    if not isinstance(exc, InternalRecordRejected):
                        exc = InternalRecordRejected("codes", f"{type(exc).__name__}: {exc}")
                self.dead_letters.send(rec, exc)
                continue
            sources.append(rec)
            stamps.append(rec.timestamp / 1000.0)
            keys.append(shards.key_of(*tp))
        removals: dict[ShardKey, list[str]] = defaultdict(list)
        for (key, item_id), gone in removed.items():
            if gone:
                removals[key].append(item_id)
        if removals:  # a write followed by a removal of its id in this batch is not written
            keep = [i for i, r in enumerate(valid) if not removed[(keys[i], r.id)]]
            valid, sources, stamps, keys = ([xs[i] for i in keep] for xs in (valid, sources, stamps, keys))
        serving = {k: self.owner.serving(k) for k in set(keys)}
        return Prepared(valid, sources, stamps, keys, dict(updates), next_offsets, dict(removals),
                        self.encoder.submit(self.encode, valid, [serving[k] for k in keys]), self.positions.epoch)

    def finish(self, p: Prepared) -> None:
        """Wait for the codes, commit the batch (Checkpoint: DLQ flush, each shard's transaction, Kafka)."""
        serving, codes, stored = self._codes_of(p)
        if self.rehome is not None:  # a re-routed copy older than its id's standing write is not written (rehome.py)
            keep = self.rehome.current(p.valid, p.sources, p.stamps, p.shards, self.owner.shards.get)
            if len(keep) < len(p.valid):
                p.keep(keep)
                serving, codes = [serving[i] for i in keep], codes[keep]
                stored = None if stored is None else stored[keep]
        rewound = self.positions.rewound_since(p.epoch)
        if rewound:  # the log was reset under this batch: its records come again from the new log's start
            keep = [i for i, src in enumerate(p.sources) if (src.topic, src.partition) not in rewound]
            p.keep(keep)
            serving, codes = [serving[i] for i in keep], codes[keep]
            stored = None if stored is None else stored[keep]
            p.next_offsets = {k: v for k, v in p.next_offsets.items() if k not in rewound}
            p.updates = {k: u for k, u in p.updates.items() if (self.codes_topic, k.partition) not in rewound}
            p.removals = {k: r for k, r in p.removals.items() if (k.topic, k.partition) not in rewound}
        with m.COMMIT_SECONDS.time():
            self.checkpoint.commit(self.shard_writes(p, serving, codes, stored), p.next_offsets)
        for key in {self.owner.shards.key_of(*tp) for tp in p.next_offsets}:
            self.owner.report(key)
        m.BATCHES.inc()
        m.LAST_COMMIT.set(time.time())
        m.INDEX_ITEMS.labels(process="worker").set(sum(s.count() for _, s in self.owner.shards))

    def shard_writes(self, p: Prepared, serving, codes, stored: np.ndarray | None = None) -> list[ShardWrite]:
        """The batch as one write per shard. Shards with images first: a shard holding only code updates may wait
        on its LMDB writer lock (for the one re-encode transaction in progress, ~10 ms), and images need not
        wait behind it."""
        rows: dict[ShardKey, list[int]] = defaultdict(list)
        for i, key in enumerate(p.shards):
            rows[key].append(i)
        offsets: dict[ShardKey, dict] = defaultdict(dict)
        for (topic, part), nxt in p.next_offsets.items():
            offsets[self.owner.shards.key_of(topic, part)][(topic, part)] = nxt
        writes = []
        for key in sorted(offsets, key=lambda k: (k not in rows, k)):
            store = self.owner.shards.get(key)
            if store is None:
                raise StoreError(f"shard {key} was closed with a batch in flight")
            mine = rows.get(key, [])
            shard_serving = serving[mine[0]] if mine else self.owner.serving(key)
            shard_codes = codes[mine] if mine else codes[:0]
            records = [p.valid[i] for i in mine]
            feats = None if stored is None else [stored[i].tobytes() for i in mine]
            if len({serving[i] for i in mine}) > 1:  # a model changed between two records of one shard: never mix
                shard_serving, shard_codes = self._reencode(key, records, feats)
            writes.append(ShardWrite(
                key, store, records, [p.stamps[i] for i in mine], shard_serving, shard_codes,
                {tp: o for tp, o in offsets[key].items() if tp[0] != self.codes_topic}, p.updates.get(key, []),
                {tp: o for tp, o in offsets[key].items() if tp[0] == self.codes_topic},
                lambda recs, fs, key=key: self._reencode(key, recs, fs), p.removals.get(key, []), feats))
        return writes

    def _reencode(self, key: ShardKey, records: list[ImageRecord],
                  features: list[bytes] | None = None) -> tuple[tuple[int, int], np.ndarray]:
        """The records' codes under the network the shard serves now: from their stored inputs when they have
        them (the frozen part is the same in every version of a network: it never runs twice on an image)."""
        now = self.owner.serving(key)
        net = self.follower.nets.get(now[1])
        if features is not None and net.frozen and records:
            stored = np.stack([np.frombuffer(f, net.stored_dtype).reshape(net.stored_shape) for f in features])
            return now, net.encode(stored, self.encode_batch)
        return now, self.encode(records, [now] * len(records))[1]

    def _codes_of(self, p: Prepared) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray | None]:
        """The batch's codes; if encoding the batch fails, each record alone, dead-lettering those that fail."""
        try:
            return p.codes.result()
        except Exception as exc:
            log.warning("encoding a batch of %d failed (%r); encoding its records one by one", len(p.valid), exc)
        keep = []
        for i, r in enumerate(p.valid):
            try:
                self.encode([r], [self.owner.serving(p.shards[i])])
                keep.append(i)
            except Exception as exc:
                self.dead_letters.send(p.sources[i], RecordRejected("encode", f"{type(exc).__name__}: {exc}"))
        p.keep(keep)
        return self.encode(p.valid, [self.owner.serving(k) for k in p.shards])

    def encode(self, valid: list[ImageRecord], serving: list[tuple[int, int]]
               ) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray | None]:
        """Each record encoded by the network of the (generation, model version) its shard serves; one call
        per version (usually one). Also returns the records' stored inputs where the network has a frozen part
        (its output, computed here once per image, in batches, and written with the item), else None."""
        codes = np.zeros((len(valid), self.bits // 8), np.uint8)
        stored = None
        with m.ENCODE_SECONDS.time():
            for version in {v for _, v in serving}:
                rows = [i for i, (_, v) in enumerate(serving) if v == version]
                net = self.follower.nets.get(version)
                x = net.prepare(np.stack([valid[i].image for i in rows]))  # small_cnn: the images themselves
                if net.frozen:
                    if stored is None:
                        stored = np.zeros((len(valid), *net.stored_shape), net.stored_dtype)
                    stored[rows] = x
                codes[rows] = net.encode(x, self.encode_batch)
        return serving, codes, stored
