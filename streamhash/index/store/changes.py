"""Reads through the change log (``changes``: arrival seq -> item id, one entry per live item, in arrival order;
``recodes``: seq of an item's latest learned code -> item id).

:class:`~streamhash.index.store.items.Items` writes both; here are the followers' reads: what changed after a
seq, the whole current generation in arrival order (as objects, or in chunks that keep no per-item Python
object), and what an arrival seq or an id stands for now. Each read is one MVCC snapshot, so the generation,
model version and codes it returns agree with each other.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from streamhash.index.store.env import Environment
from streamhash.index.store.items import arrival
from streamhash.index.store.layout import from_u64, labels_of_record, u64

log = logging.getLogger(__name__)


@dataclass
class Change:
    seq: int
    id: str
    code: bytes  # empty for a removal
    labels: tuple[int, ...] | None
    ts: float | None  # Kafka timestamp of a message just ingested; None for a code update (put_codes) or a removal
    deleted: bool = False  # the item was removed (a tombstone): drop it
    arrived: int | None = None  # a learned code's item arrived under this seq (its place); None: under ``seq``

    @property
    def arrival(self) -> int:
        """The seq the item arrived under: its id in the in-memory index, its place in the order ties break in."""
        return self.seq if self.arrived is None else self.arrived


@dataclass
class Snapshot:
    """Every live item, in arrival order."""

    generation: int
    model_version: int
    seqs: np.ndarray  # int64 (n,): each item's latest write (what a learned code for it names)
    codes: np.ndarray  # uint8 (n, bits/8)
    ids: list[str]
    labels: list[tuple[int, ...] | None]
    learned: np.ndarray  # bool (n,): the code was learned from labels (DCC), not inferred by the network
    quarantined: np.ndarray  # bool (n,): excluded from learning after a round failed on it
    arrivals: np.ndarray  # int64 (n,): the seq each item arrived under (increasing: the order), its in-memory index id


class ChangeLog:
    def __init__(self, env: Environment, code_bytes: int):
        self.env, self.code_bytes = env, code_bytes
        self._warned = False

    def changes_since(self, after_seq: int, limit: int = 100_000) -> tuple[int, int, list[Change]]:
        """(generation, model version, items written after ``after_seq`` in seq order), from one snapshot."""
        return self.env.read(lambda txn: self._changes(txn, after_seq, limit))

    def changes_if_committed(self, after_seq: int, seen_txnid: int,
                             limit: int = 100_000) -> tuple[int, int, int, list[Change]] | None:
        """(snapshot's txn id, generation, model version, changes) as :meth:`changes_since`, or None when
        nothing was committed since the snapshot of ``seen_txnid``: a follower woken for nothing (a
        commit's page writes before its meta page, a re-check) then opens no transaction and parses no meta."""
        if self.env.last_txnid() == seen_txnid:
            return None
        return self.env.read(lambda txn: (txn.id(), *self._changes(txn, after_seq, limit)))

    def _changes(self, txn, after_seq: int, limit: int) -> tuple[int, int, list[Change]]:
        """Arrivals and learned codes after ``after_seq``, and removals, merged in seq order and cut at ``limit``. Each
        carries the item's current code: an item that arrived and was recoded since comes twice, with one code."""
        db = self.env.db
        meta = self.env.read_meta(txn)
        gen, model_version = int(meta["generation"]), int(meta["model_version"])
        gen_prefix = u64(gen)
        out: list[Change] = []
        cut = False  # a log was read up to ``limit``: more may follow the last change returned
        for name in ("changes", "recodes"):
            if db[name] is None:  # recodes, in a shard at schema 1-3 when this process opened it
                self._warn_unfollowed(meta)
                continue
            cur, got = txn.cursor(db=db[name]), 0
            if cur.set_range(u64(after_seq + 1)):
                for k, key in cur:
                    rec = orjson.loads(txn.get(key, db=db["items"]))  # the follower's per-change cost: ~3x json.loads
                    seq, arrived = from_u64(k), arrival(rec)
                    labels = tuple(rec["labels"]) if rec["labels"] is not None else None
                    out.append(Change(seq, key.decode(), txn.get(gen_prefix + key, db=db["codes"]), labels,
                                      None if rec.get("recoded") else rec["ts"], arrived=None if arrived == seq else arrived))
                    got += 1
                    if got >= limit:
                        cut = True
                        break
        out.sort(key=lambda c: c.seq)
        cut |= len(out) > limit  # each log's unread entries come after its last one read, so after all kept here
        del out[limit:]
        if db["deletes"] is not None:
            # Removals in seq order with the writes. When the writes were cut at ``limit``, only removals up to the
            # last write read: the follower goes on from the last seq it gets, and must not step over the rest.
            upto = out[-1].seq if cut else None
            cur = txn.cursor(db=db["deletes"])
            removed = []
            if cur.set_range(u64(after_seq + 1)):
                for k, key in cur:
                    seq = from_u64(k)
                    if upto is not None and seq > upto:
                        break
                    removed.append(Change(seq, key.decode(), b"", None, None, deleted=True))
            if removed:
                out = sorted(out + removed, key=lambda c: c.seq)
        return gen, model_version, out

    def _warn_unfollowed(self, meta: dict) -> None:
        if meta.get("schema_version", 0) >= 4 and not self._warned:
            self._warned = True
            log.warning("store %s was migrated to schema %s after this process opened it: learned codes applied "
                        "since are not followed until it opens the shard again", self.env.path, meta["schema_version"])

    def snapshot(self) -> Snapshot:
        """Every live item of the current generation, in arrival order, from one MVCC snapshot."""
        db = self.env.db

        def read(txn):
            meta = self.env.read_meta(txn)
            gen_prefix = u64(int(meta["generation"]))
            arrivals, seqs, codes, ids, labels, learned, quarantined = [], [], [], [], [], [], []
            for k, key in txn.cursor(db=db["changes"]):
                rec = json.loads(txn.get(key, db=db["items"]))
                arrivals.append(from_u64(k))
                seqs.append(int(rec["seq"]))
                codes.append(txn.get(gen_prefix + key, db=db["codes"]))
                ids.append(key.decode())
                labels.append(tuple(rec["labels"]) if rec["labels"] is not None else None)
                learned.append(bool(rec.get("learned")))
                quarantined.append(bool(rec.get("quarantined")))
            arr = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), self.code_bytes)
            return Snapshot(int(meta["generation"]), int(meta["model_version"]), np.array(seqs, np.int64), arr, ids,
                            labels, np.array(learned, bool), np.array(quarantined, bool), np.array(arrivals, np.int64))

        return self.env.read(read)

    def read_generation(self, on_chunk, chunk: int = 65536) -> tuple[int, int, int]:
        """Every live item of the current generation in arrival order, handed to ``on_chunk(seqs, codes, ids)``
        (int64 (m,) arrival seqs, uint8 (m, bits/8), list of m ids) a chunk at a time.

        Unlike :meth:`snapshot` no per-item Python object outlives its chunk (a million ids and
        label tuples held at once left the process ~150 MB larger). Returns (generation, model version,
        the last seq of an arrival or a learned code read, 0 when empty): a follower goes on after it.
        """
        db = self.env.db

        def read(txn):
            meta = self.env.read_meta(txn)
            gen_prefix = u64(int(meta["generation"]))
            seqs, codes, ids = [], [], []

            def flush():
                if seqs:
                    arr = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), self.code_bytes)
                    on_chunk(np.array(seqs, np.int64), arr, list(ids))
                    seqs.clear(), codes.clear(), ids.clear()

            for k, key in txn.cursor(db=db["changes"]):
                seqs.append(from_u64(k))
                codes.append(txn.get(gen_prefix + key, db=db["codes"]))
                ids.append(key.decode())
                if len(seqs) >= chunk:
                    flush()
            flush()
            return int(meta["generation"]), int(meta["model_version"]), self.last_seq(txn)

        return self.env.read(read)

    def last_seq(self, txn) -> int:
        """The last seq an arrival or a learned code of a live item holds (0: none)."""
        last = 0
        for db in (self.env.db["changes"], self.env.db["recodes"]):
            cur = txn.cursor(db=db) if db is not None else None
            if cur is not None and cur.last():
                last = max(last, from_u64(cur.key()))
        return last

    def items_at(self, seqs: Sequence[int]) -> list[tuple[str, tuple[int, ...] | None] | None]:
        """(id, labels) of the item that arrived under each seq; None for a seq the store no longer holds
        (its item was written again, arriving under a newer seq, or removed)."""
        changes, items = self.env.db["changes"], self.env.db["items"]
        keys = [u64(int(s)) for s in seqs]

        def read(txn):
            # Per hit of every search (~17% of a batch's time at 8 connections): keys packed and names bound
            # outside the loop (3.4 -> 3.2 us a hit, 10 hits a call over 250k items).
            get, out = txn.get, []
            for key in keys:
                item = get(key, None, changes)
                out.append(None if item is None else (item.decode(), labels_of_record(get(item, None, items))))
            return out

        return self.env.read(read)

    def labels_of(self, ids: Sequence[str]) -> list[tuple[int, ...] | None]:
        """Current labels of stored items (None: unlabeled or absent)."""

        def read(txn):
            raws = (txn.get(i.encode(), db=self.env.db["items"]) for i in ids)
            return [None if raw is None else labels_of_record(raw) for raw in raws]

        return self.env.read(read)

    def ids_after(self, after_seq: int) -> list[str]:
        """Ids of the items that arrived after ``after_seq``, in arrival order."""

        def read(txn):
            cur = txn.cursor(db=self.env.db["changes"])
            if not cur.set_range(u64(after_seq + 1)):
                return []
            return [key.decode() for _, key in cur]

        return self.env.read(read)

    def seqs_live(self, seqs: Sequence[int]) -> np.ndarray:
        """Whether each seq is still the arrival seq of a stored item (bool array)."""

        def read(txn):
            db = self.env.db["changes"]
            return np.fromiter((txn.get(u64(int(s)), db=db) is not None for s in seqs), bool, len(seqs))

        return self.env.read(read)
