"""The LMDB store: the single source of truth for items, codes, image blobs, models and offsets.

Named sub-databases (DESIGN.md), keys and values:

==========  ===========================================  ==========================================
``items``   item id (UTF-8)                              JSON: labels, ts, seq, gen, shard, ctype
``codes``   generation (8 B) + item id                   packed code, ``bits/8`` bytes
``blobs``   item id                                      the image bytes as received
``tables``  owned by :mod:`streamhash.index.multihash`   multi-index hash buckets, per generation
``models``  model version (8 B)                          serialised hash network
``offsets`` ``topic\\0partition``                         next offset to consume (8 B)
``meta``    name                                         JSON value: schema, bits, generation, ...
``changes`` seq (8 B)                                    item id
==========  ===========================================  ==========================================

``changes`` is our addition to the design's list: every write gives the item a new, increasing
``seq`` and removes the item's previous entry, so ``changes`` holds exactly one entry per live item
in insertion order. Followers (the query worker) read it from their last seen seq, which makes
staying live an O(new items) read instead of a scan. ``seq`` is also the int64 id that the
in-memory Hamming index uses, so ties break by insertion order.

Writes are one transaction per batch: items, codes, blobs, hash tables, changes and the Kafka
offset map commit together or not at all.

Concurrency, within a process: one write transaction at a time (``_writer``, our lock, taken before
LMDB's own), and the map is resized only by the thread holding it, after its transaction aborted and
while no reader transaction is open in this process (``_resize``: readers shared, resize exclusive).
LMDB forbids ``set_mapsize`` with any transaction of the process open; two writing threads that grew
the map on their own failed with "Cannot set_mapsize while a write transaction is active" or a
deadlock. Across processes: one writable handle per environment, enforced by an exclusive ``flock`` on
``writer.lock`` beside ``data.mdb``; read-only handles in other processes adopt growth on
``MapResizedError``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import lmdb
import numpy as np

from streamhash.errors import GenerationChanged, SchemaMismatchError, StoreError, StoreFullError, StoreLockedError
from streamhash.rwlock import RWLock

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAMES = ("items", "codes", "blobs", "tables", "models", "offsets", "meta", "changes")
_U64 = struct.Struct(">Q")
_MIN_GROWTH = 64 << 10


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


@dataclass
class ItemWrite:
    """One item as the worker writes it."""

    id: str
    code: bytes
    blob: bytes
    content_type: str
    labels: tuple[int, ...] | None
    ts: float = field(default_factory=time.time)


@dataclass
class Change:
    seq: int
    id: str
    code: bytes
    labels: tuple[int, ...] | None
    ts: float | None  # Kafka timestamp of a message just ingested; None for a code update (put_codes)


@dataclass
class Snapshot:
    generation: int
    model_version: int
    seqs: np.ndarray  # int64 (n,)
    codes: np.ndarray  # uint8 (n, bits/8)
    ids: list[str]
    labels: list[tuple[int, ...] | None]
    learned: np.ndarray  # bool (n,): the code was learned from labels (DCC), not inferred by the network
    quarantined: np.ndarray  # bool (n,): excluded from learning after a round failed on it


def offset_key(topic: str, partition: int) -> bytes:
    return f"{topic}\0{partition}".encode()


class Store:
    """An LMDB environment holding one shard of the index.

    Open it writable in exactly one process (the worker owning the shard) and read-only in any
    number of others. Read-only handles see consistent MVCC snapshots and follow map growth.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        bits: int | None = None,
        readonly: bool = False,
        shard: int = 0,
        backbone: str | None = None,
        initial_map_size: int = 64 << 20,
        max_map_size: int = 1 << 40,
        multihash_tables: int = 0,
        map_growth_factor: float = 2.0,
    ):
        self.path = Path(path)
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.map_growth_factor = map_growth_factor
        self._writer = threading.Lock()
        self._resize = RWLock()
        self._lock_file = None
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreError(f"no index at {self.path} (start a worker first, or check STREAMHASH_STORE__PATH)")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock_exclusively(self.path / "writer.lock")
        self.env = lmdb.open(
            str(self.path), map_size=initial_map_size, max_dbs=len(DB_NAMES) + 2, readonly=readonly,
            subdir=True, lock=True, readahead=False, meminit=False, max_readers=256,
        )
        self.db = {
            name: self.env.open_db(name.encode(), create=not readonly, **self._db_flags(name)) for name in DB_NAMES
        }
        self.meta = self._init_meta(bits=bits, shard=shard, backbone=backbone) if not readonly else self.read_meta()
        self.bits = int(self.meta["bits"])
        self.code_bytes = self.bits // 8
        self.tables = self._make_tables(multihash_tables)

    @staticmethod
    def _db_flags(name: str) -> dict:
        if name == "tables":
            from streamhash.index.multihash import TABLES_DB_FLAGS

            return dict(TABLES_DB_FLAGS)
        return {}

    def _make_tables(self, m: int):
        from streamhash.index.multihash import MultiHashTables

        m = m or int(self.meta.get("multihash_tables") or 0) or MultiHashTables.default_m(self.bits)
        return MultiHashTables(self.bits, m)

    # ---------------------------------------------------------------- meta
    def _init_meta(self, *, bits: int | None, shard: int, backbone: str | None) -> dict:
        meta = self.read_meta()
        if not meta:
            if bits is None:
                raise StoreError(f"new store at {self.path} needs `bits`")
            from streamhash.index.multihash import MultiHashTables

            meta = {
                "schema_version": SCHEMA_VERSION, "bits": bits, "shard": shard, "backbone": backbone,
                "generation": 1, "model_version": 0, "next_seq": 1,
                "multihash_tables": MultiHashTables.default_m(bits), "created": time.time(),
            }
            self._write(lambda txn: self._put_meta(txn, meta))
            return meta
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise SchemaMismatchError(
                f"store {self.path} has schema {meta.get('schema_version')}, this build reads {SCHEMA_VERSION}"
            )
        if bits is not None and int(meta["bits"]) != bits:
            raise SchemaMismatchError(f"store {self.path} holds {meta['bits']}-bit codes, configured bits={bits}")
        if backbone is not None and meta.get("backbone") not in (None, backbone):
            raise SchemaMismatchError(f"store {self.path} was built with backbone {meta['backbone']}, not {backbone}")
        return meta

    def _put_meta(self, txn, meta: dict) -> None:
        for k, v in meta.items():
            txn.put(k.encode(), json.dumps(v).encode(), db=self.db["meta"])

    def read_meta(self, txn=None) -> dict:
        def read(t):
            return {k.decode(): json.loads(v) for k, v in t.cursor(db=self.db["meta"])}

        return read(txn) if txn is not None else self._read(read)

    # ---------------------------------------------------------------- txn helpers
    def _read(self, fn):
        for _ in range(3):
            try:
                with self._resize.read(), self.env.begin(buffers=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                # Another process grew the map; adopt its size (no transaction of ours may be open).
                with self._resize.write():
                    self.env.set_mapsize(0)
        raise StoreError("map kept resizing under a reader")

    def _write(self, fn):
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full.

        Disk-full conditions are raised as StoreFullError in every form LMDB reports them: MDB_MAP_FULL
        at the ceiling, ENOSPC, and EIO (what tmpfs and some filesystems return from the commit's write).
        """
        if self.readonly:
            raise StoreError("store opened read-only")
        with self._writer:
            while True:
                try:
                    with self.env.begin(write=True) as txn:
                        return fn(txn)
                except lmdb.MapFullError:
                    self._grow()
                except lmdb.MapResizedError:
                    with self._resize.write():
                        self.env.set_mapsize(0)
                except lmdb.Error as exc:
                    if _is_disk_full(exc):
                        raise StoreFullError(f"disk full writing {self.path}: {exc}") from exc
                    raise

    def _grow(self) -> None:
        """Double the map (called with ``_writer`` held and no write transaction open)."""
        size = self.env.info()["map_size"]
        new = min(max(int(size * self.map_growth_factor), size + _MIN_GROWTH), self.max_map_size)
        if new <= size:
            raise StoreFullError(
                f"store {self.path} reached its map-size ceiling of {size} bytes "
                f"(raise STREAMHASH_STORE__MAX_MAP_SIZE_BYTES)"
            )
        free = shutil.disk_usage(self.path).free
        used = (self.path / "data.mdb").stat().st_size
        if new - used > free:
            new = used + free
            if new <= size:
                raise StoreFullError(f"disk full: {free} bytes free under {self.path}, store needs more than {size}")
        log.info("growing LMDB map of %s from %d to %d bytes", self.path, size, new)
        with self._resize.write():
            self.env.set_mapsize(new)

    # ---------------------------------------------------------------- writes
    def write_batch(self, items: Iterable[ItemWrite], offsets: dict[tuple[str, int], int] | None = None,
                    *, generation: int | None = None, model_version: int | None = None) -> list[int]:
        """Write items (overwriting re-sent ids) and the offset map in one transaction; return their seqs.

        ``generation``: the generation the codes were encoded for; if a re-encode swapped in another
        one meanwhile, GenerationChanged is raised and nothing is written (encode again, retry).
        ``model_version``: the network that inferred the codes, recorded with each item.
        """
        items = list(items)
        for it in items:
            if len(it.code) != self.code_bytes:
                raise StoreError(f"code of {len(it.code)} bytes for item {it.id!r}, store holds {self.code_bytes}")

        def txn_fn(txn):
            meta = self.read_meta(txn)
            gen, seq = int(meta["generation"]), int(meta["next_seq"])
            if generation is not None and generation != gen:
                raise GenerationChanged(gen, f"codes encoded for generation {generation}, store is at {gen}")
            gens = self._live_gens(meta)
            seqs = []
            for it in items:
                key = it.id.encode()
                old = txn.get(key, db=self.db["items"])
                if old is not None:
                    self._unlink(txn, key, json.loads(old), gens)
                rec = {"labels": list(it.labels) if it.labels is not None else None, "ts": it.ts,
                       "shard": meta["shard"], "ctype": it.content_type, "model": model_version}
                self._link(txn, key, rec, gen, seq, it.code)
                txn.put(key, it.blob, db=self.db["blobs"])
                seqs.append(seq)
                seq += 1
            for (topic, partition), nxt in (offsets or {}).items():
                txn.put(offset_key(topic, partition), u64(nxt), db=self.db["offsets"])
            txn.put(b"next_seq", json.dumps(seq).encode(), db=self.db["meta"])
            return seqs

        return self._write(txn_fn)

    @staticmethod
    def _live_gens(meta: dict) -> list[int]:
        """The current generation and, during a re-encode, the one being built beside it: a rewrite
        must drop the item's old code from both (the pending one catches it up before its swap)."""
        return [int(meta["generation"])] + ([int(meta["pending_generation"])] if meta.get("pending_generation") else [])

    def _link(self, txn, key: bytes, rec: dict, gen: int, seq: int, code: bytes) -> None:
        """Write an item under a fresh ``seq``: its record, its code and hash-table entries in ``gen``, its change."""
        rec["seq"] = seq
        txn.put(key, json.dumps(rec).encode(), db=self.db["items"])
        txn.put(u64(gen) + key, code, db=self.db["codes"])
        txn.put(u64(seq), key, db=self.db["changes"])
        self.tables.add(txn, self.db["tables"], gen, seq, code)

    def _unlink(self, txn, key: bytes, rec: dict, gens: list[int]) -> None:
        for gen in gens:
            old_code = txn.get(u64(gen) + key, db=self.db["codes"])
            if old_code is not None:
                self.tables.remove(txn, self.db["tables"], gen, rec["seq"], old_code)
                txn.delete(u64(gen) + key, db=self.db["codes"])
        txn.delete(u64(rec["seq"]), db=self.db["changes"])

    def put_model(self, raw: bytes, *, make_current: bool = False) -> int:
        """Store a serialised model under the next version number."""

        def txn_fn(txn):
            cur = txn.cursor(db=self.db["models"])
            version = from_u64(cur.key()) + 1 if cur.last() else 1
            txn.put(u64(version), raw, db=self.db["models"])
            if make_current:
                txn.put(b"model_version", json.dumps(version).encode(), db=self.db["meta"])
            return version

        return self._write(txn_fn)

    # ---------------------------------------------------------------- generations
    def begin_generation(self) -> tuple[int, int]:
        """Open generation ``current + 1`` beside the live one; returns (generation, seq watermark).

        Items written after the watermark are caught up by :meth:`swap_generation`. Leftovers of an
        earlier, interrupted build of the same generation are cleared first.
        """
        meta = self.read_meta()
        gen = int(meta["generation"]) + 1
        self.drop_generation(gen)
        self._write(lambda txn: self._put_meta(txn, {"pending_generation": gen}))
        return gen, int(meta["next_seq"]) - 1

    def put_generation_codes(self, gen: int, ids: list[str], codes: np.ndarray) -> None:
        """Write codes (and their hash-table entries) of a pending generation; ids gone meanwhile are skipped."""
        self._write(lambda txn: self._put_gen_codes(txn, gen, ids, codes))

    def _put_gen_codes(self, txn, gen: int, ids: list[str], codes: np.ndarray) -> None:
        prefix = u64(gen)
        for item_id, code in zip(ids, np.asarray(codes, np.uint8)):
            key = item_id.encode()
            raw = txn.get(key, db=self.db["items"])
            if raw is None:
                continue
            seq = json.loads(raw)["seq"]
            old = txn.get(prefix + key, db=self.db["codes"])
            if old is not None:
                self.tables.remove(txn, self.db["tables"], gen, seq, old)
            txn.put(prefix + key, code.tobytes(), db=self.db["codes"])
            self.tables.add(txn, self.db["tables"], gen, seq, code.tobytes())

    def ids_missing_from(self, gen: int, after_seq: int = 0) -> list[str]:
        """Ids written after ``after_seq`` that have no code in generation ``gen`` yet."""
        return self._read(lambda txn: self._ids_missing(txn, gen, after_seq))

    def _ids_missing(self, txn, gen: int, after_seq: int) -> list[str]:
        cur, prefix, out = txn.cursor(db=self.db["changes"]), u64(gen), []
        if cur.set_range(u64(after_seq + 1)):
            for _, key in cur:
                if txn.get(prefix + key, db=self.db["codes"]) is None:
                    out.append(key.decode())
        return out

    def swap_generation(self, gen: int, model_version: int, ids: list[str], codes: np.ndarray, *,
                        after_seq: int = 0, encode_blobs=None) -> int:
        """Write the last codes of ``gen`` and make it current with ``model_version``, in one transaction.

        Items written after ``after_seq`` that still lack a code in ``gen`` (the ingest path kept
        writing while the caller caught up) are encoded inside the transaction by
        ``encode_blobs([(blob, content_type), ...]) -> codes`` when given: ingestion waits for that
        short step instead of the catch-up chasing it forever. Without it, or if an older item lacks a
        code, StoreError: readers switch to a complete generation or not at all.
        Returns the generation that was replaced.
        """

        def txn_fn(txn):
            meta = self.read_meta(txn)
            if meta.get("pending_generation") != gen:
                raise StoreError(f"generation {gen} is not being built (pending: {meta.get('pending_generation')})")
            self._put_gen_codes(txn, gen, ids, codes)
            late = self._ids_missing(txn, gen, after_seq)
            if late and encode_blobs is not None:
                blobs = [(txn.get(k.encode(), db=self.db["blobs"]), json.loads(txn.get(k.encode(), db=self.db["items"]))["ctype"])
                         for k in late]
                self._put_gen_codes(txn, gen, late, encode_blobs(blobs))
            missing = self._ids_missing(txn, gen, 0)
            if missing:
                raise StoreError(f"item {missing[0]!r} has no code in generation {gen}; catch it up first")
            self._put_meta(txn, {"generation": gen, "model_version": model_version, "pending_generation": None})
            return int(meta["generation"])

        return self._write(txn_fn)

    def abandon_pending_generation(self) -> int | None:
        """Drop a generation a crashed re-encode left half built (its codes and table rows); return it."""
        gen = self.read_meta().get("pending_generation")
        if not gen:
            return None
        dropped = self.drop_generation(int(gen))
        self._write(lambda txn: self._put_meta(txn, {"pending_generation": None}))
        log.warning("dropped generation %d left half built by an interrupted re-encode (%d entries)", gen, dropped)
        return int(gen)

    def topic_ids(self) -> dict[str, str]:
        """topic -> the broker's id of it when its offsets were stored."""
        return dict(self.read_meta().get("topic_ids") or {})

    def set_topic_id(self, topic: str, topic_id: str) -> None:
        def txn_fn(txn):
            ids = self.read_meta(txn).get("topic_ids") or {}
            self._put_meta(txn, {"topic_ids": {**ids, topic: topic_id}})

        self._write(txn_fn)

    def set_offset(self, topic: str, partition: int, next_offset: int) -> None:
        """Move a partition's stored offset (backwards too: after the broker's log was reset)."""
        self._write(lambda txn: txn.put(offset_key(topic, partition), u64(next_offset), db=self.db["offsets"]))

    def drop_generation(self, gen: int, chunk: int = 10_000) -> int:
        """Delete every code and table entry of ``gen`` (a replaced or abandoned one), in bounded transactions."""
        prefix, dropped = u64(gen), 0
        for db in (self.db["codes"], self.db["tables"]):
            while True:
                def txn_fn(txn, db=db):
                    cur, n = txn.cursor(db=db), 0
                    if not cur.set_range(prefix):
                        return 0
                    while n < chunk and cur.key().startswith(prefix):
                        # delete(dupdata=True) removes every duplicate of a table key at once
                        if not cur.delete(dupdata=True):
                            break
                        n += 1
                    return n

                n = self._write(txn_fn)
                dropped += n
                if n < chunk:
                    break
        return dropped

    def put_codes(self, ids: list[str], codes: np.ndarray, *, model_version: int | None = None) -> list[int]:
        """Replace codes of existing items in the current generation (learned codes of new items),
        optionally making ``model_version`` current in the same transaction.

        Each updated item gets a new seq, so followers pick the change up like any write.
        """

        def txn_fn(txn):
            meta = self.read_meta(txn)
            gen, seq = int(meta["generation"]), int(meta["next_seq"])
            gens, seqs = self._live_gens(meta), []
            for item_id, code in zip(ids, np.asarray(codes, np.uint8)):
                key = item_id.encode()
                raw = txn.get(key, db=self.db["items"])
                if raw is None:
                    continue
                rec = json.loads(raw)
                rec["recoded"] = True  # not a new message: followers must not count it as fresh
                rec["learned"] = True  # a DCC code: the learner must not take it as pending after a restart
                self._unlink(txn, key, rec, gens)
                self._link(txn, key, rec, gen, seq, code.tobytes())
                seqs.append(seq)
                seq += 1
            txn.put(b"next_seq", json.dumps(seq).encode(), db=self.db["meta"])
            if model_version is not None:
                txn.put(b"model_version", json.dumps(model_version).encode(), db=self.db["meta"])
            return seqs

        return self._write(txn_fn)

    def quarantine(self, ids: list[str]) -> None:
        """Mark items as never to be learned from (a learning round failed on them); they stay indexed.
        Not a change of code, so their seq stays and followers see nothing."""

        def txn_fn(txn):
            for item_id in ids:
                raw = txn.get(item_id.encode(), db=self.db["items"])
                if raw is not None:
                    txn.put(item_id.encode(), json.dumps({**json.loads(raw), "quarantined": True}).encode(), db=self.db["items"])

        self._write(txn_fn)

    # ---------------------------------------------------------------- reads
    def get_model(self, version: int | None = None) -> tuple[int, bytes | None]:
        def read(txn):
            v = int(self.read_meta(txn)["model_version"]) if version is None else version
            return v, txn.get(u64(v), db=self.db["models"])

        return self._read(read)

    def offsets(self) -> dict[tuple[str, int], int]:
        def read(txn):
            out = {}
            for k, v in txn.cursor(db=self.db["offsets"]):
                topic, part = k.decode().rsplit("\0", 1)
                out[(topic, int(part))] = from_u64(v)
            return out

        return self._read(read)

    def count(self) -> int:
        return self._read(lambda txn: txn.stat(self.db["items"])["entries"])

    def get_item(self, item_id: str, *, with_blob: bool = False) -> dict | None:
        def read(txn):
            key = item_id.encode()
            raw = txn.get(key, db=self.db["items"])
            if raw is None:
                return None
            rec = json.loads(raw)
            rec["id"] = item_id
            rec["generation"] = int(self.read_meta(txn)["generation"])
            rec["code"] = txn.get(u64(rec["generation"]) + key, db=self.db["codes"])
            if with_blob:
                rec["blob"] = txn.get(key, db=self.db["blobs"])
            return rec

        return self._read(read)

    def get_blobs(self, ids: Iterable[str]) -> list[tuple[bytes, str] | None]:
        """Image bytes and content type for each id (None where absent), from one snapshot."""

        def read(txn):
            out = []
            for item_id in ids:
                key = item_id.encode()
                rec, blob = txn.get(key, db=self.db["items"]), txn.get(key, db=self.db["blobs"])
                out.append(None if rec is None or blob is None else (blob, json.loads(rec)["ctype"]))
            return out

        return self._read(read)

    def changes_since(self, after_seq: int, limit: int = 100_000) -> tuple[int, int, list[Change]]:
        """(generation, model version, items written after ``after_seq`` in seq order), from one snapshot."""

        def read(txn):
            meta = self.read_meta(txn)
            gen, model_version = int(meta["generation"]), int(meta["model_version"])
            gen_prefix = u64(gen)
            out: list[Change] = []
            cur = txn.cursor(db=self.db["changes"])
            if not cur.set_range(u64(after_seq + 1)):
                return gen, model_version, out
            for k, key in cur:
                rec = json.loads(txn.get(key, db=self.db["items"]))
                code = txn.get(gen_prefix + key, db=self.db["codes"])
                labels = tuple(rec["labels"]) if rec["labels"] is not None else None
                out.append(Change(from_u64(k), key.decode(), code, labels, None if rec.get("recoded") else rec["ts"]))
                if len(out) >= limit:
                    break
            return gen, model_version, out

        return self._read(read)

    def snapshot(self) -> Snapshot:
        """Every live item of the current generation, in seq order, from one MVCC snapshot."""

        def read(txn):
            meta = self.read_meta(txn)
            gen_prefix = u64(int(meta["generation"]))
            seqs, codes, ids, labels, learned, quarantined = [], [], [], [], [], []
            for k, key in txn.cursor(db=self.db["changes"]):
                rec = json.loads(txn.get(key, db=self.db["items"]))
                seqs.append(from_u64(k))
                codes.append(txn.get(gen_prefix + key, db=self.db["codes"]))
                ids.append(key.decode())
                labels.append(tuple(rec["labels"]) if rec["labels"] is not None else None)
                learned.append(bool(rec.get("learned")))
                quarantined.append(bool(rec.get("quarantined")))
            arr = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), self.code_bytes)
            return Snapshot(int(meta["generation"]), int(meta["model_version"]), np.array(seqs, np.int64), arr, ids,
                            labels, np.array(learned, bool), np.array(quarantined, bool))

        return self._read(read)

    # reads for a follower that keeps no per-item Python object (the query side's live index)
    def read_generation(self, on_chunk, chunk: int = 65536) -> tuple[int, int, int]:
        """Every live item of the current generation in seq order, handed to ``on_chunk(seqs, codes, ids)``
        (int64 (m,), uint8 (m, bits/8), list of m ids) a chunk at a time.

        Unlike :meth:`Store.snapshot` no per-item Python object outlives its chunk (a million ids and
        label tuples held at once left the process ~150 MB larger). Returns (generation, model version,
        last seq, 0 when empty).
        """

        def read(txn):
            meta = self.read_meta(txn)
            gen_prefix = u64(int(meta["generation"]))
            seqs, codes, ids, last = [], [], [], 0

            def flush():
                if seqs:
                    arr = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), self.code_bytes)
                    on_chunk(np.array(seqs, np.int64), arr, list(ids))
                    seqs.clear(), codes.clear(), ids.clear()

            for k, key in txn.cursor(db=self.db["changes"]):
                last = from_u64(k)
                seqs.append(last)
                codes.append(txn.get(gen_prefix + key, db=self.db["codes"]))
                ids.append(key.decode())
                if len(seqs) >= chunk:
                    flush()
            flush()
            return int(meta["generation"]), int(meta["model_version"]), last

        return self._read(read)


    def items_at(self, seqs: Sequence[int]) -> list[tuple[str, tuple[int, ...] | None] | None]:
        """(id, labels) of the item each seq belongs to now; None for a seq the store no longer holds
        (its item was written again under a newer seq)."""

        def read(txn):
            out = []
            for s in seqs:
                key = txn.get(u64(int(s)), db=self.db["changes"])
                out.append(None if key is None else (key.decode(), _labels_of_record(txn.get(key, db=self.db["items"]))))
            return out

        return self._read(read)


    def labels_of(self, ids: Sequence[str]) -> list[tuple[int, ...] | None]:
        """Current labels of stored items (None: unlabeled or absent)."""

        def read(txn):
            raws = (txn.get(i.encode(), db=self.db["items"]) for i in ids)
            return [None if raw is None else _labels_of_record(raw) for raw in raws]

        return self._read(read)


    def ids_after(self, after_seq: int) -> list[str]:
        """Ids of the items written after ``after_seq``, in seq order."""

        def read(txn):
            cur = txn.cursor(db=self.db["changes"])
            if not cur.set_range(u64(after_seq + 1)):
                return []
            return [key.decode() for _, key in cur]

        return self._read(read)


    def seqs_live(self, seqs: Sequence[int]) -> np.ndarray:
        """Whether each seq is still an item's current seq (bool array)."""

        def read(txn):
            db = self.db["changes"]
            return np.fromiter((txn.get(u64(int(s)), db=db) is not None for s in seqs), bool, len(seqs))

        return self._read(read)

    def close(self) -> None:
        self.env.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None


def _labels_of_record(raw: bytes) -> tuple[int, ...] | None:
    labels = json.loads(raw)["labels"]
    return tuple(labels) if labels is not None else None


def _lock_exclusively(path: Path):
    """An open file holding an exclusive ``flock`` on ``path``; StoreLockedError if another handle has it.

    flock (not a pid file): the kernel releases it when the holder dies, kill -9 included, so a crash
    never leaves a stale lock behind.
    """
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreLockedError(
            f"store {path.parent} is already open for writing by {holder}; one worker per store "
            f"(give each worker its own STREAMHASH_STORE__PATH)"
        ) from None
    fh.truncate(0)
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _is_disk_full(exc: Exception) -> bool:
    """LMDB's errors carry no errno attribute: the message is ``mdb_txn_commit: <strerror>``."""
    if getattr(exc, "errno", None) in _DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return any(os.strerror(e) in text for e in _DISK_FULL_ERRNOS)
