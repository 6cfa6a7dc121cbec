"""The changelog-fed learner's own state store: one LMDB environment in its data directory, never a shard.

It holds what the learner knows of every item of every partition, as the changelog says it (Kafka Streams' state
store over a changelog, read-only here): ``items`` (id -> JSON: partition, timestamp, labels, the code the index
holds, the network that inferred it, learned / quarantined), ``inputs`` (id -> the network's stored input as the
record carried it: a frozen backbone's feature, else the image blob with its content type) and ``meta`` (each
changelog partition's next offset, written in the same transaction as the items it covers: a restart reads only
the tail). Blobs stay on disk: a round reads the few hundred it samples (:meth:`inputs`), never all of them.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import lmdb

from streamhash.errors import StoreError

_DBS = (b"items", b"inputs", b"meta")
_LEN = struct.Struct(">H")
FEATURE, BLOB = b"F", b"B"


def pack_input(feature: bytes | None, blob: bytes, ctype: str) -> bytes:
    """A stored input: the feature where the record has one (the network never decodes the image), else the blob."""
    if feature is not None:
        return FEATURE + feature
    c = ctype.encode()
    return BLOB + _LEN.pack(len(c)) + c + blob


def unpack_input(raw: bytes) -> tuple[bytes | None, tuple[bytes, str] | None]:
    """(feature, None) or (None, (blob, content type))."""
    if raw[:1] == FEATURE:
        return raw[1:], None
    (n,) = _LEN.unpack_from(raw, 1)
    return None, (raw[3 + n:], raw[3:3 + n].decode())


class LearnerState:
    """The learner's items and changelog offsets; single-threaded (the learner's loop reads and writes it)."""

    def __init__(self, path: str | Path, topic: str, *, initial_map_size: int = 64 << 20, max_map_size: int = 1 << 40):
        self.path, self.topic = Path(path), topic
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_map_size = max_map_size
        self.env = lmdb.open(str(self.path), map_size=initial_map_size, max_dbs=len(_DBS), subdir=True)
        self.db = {name.decode(): self.env.open_db(name) for name in _DBS}
        with self.env.begin() as txn:
            held = txn.get(b"topic", db=self.db["meta"])
        if held is not None and held.decode() != topic:
            self.env.close()
            raise StoreError(f"learner state at {self.path} follows {held.decode()!r}, not {topic!r}: another "
                             f"pipeline's (learn.state_path)")

    def write(self, fn):
        """``fn(txn)`` in one write transaction; the map grows (doubled) when full."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    txn.put(b"topic", self.topic.encode(), db=self.db["meta"])
                    return fn(txn)
            except lmdb.MapFullError:
                size = self.env.info()["map_size"] * 2
                if size > self.max_map_size:
                    raise StoreError(f"learner state at {self.path} is full ({size // 2} bytes)") from None
                self.env.set_mapsize(size)

    def offsets(self) -> dict[int, int]:
        """Changelog partition -> the next offset to read."""
        with self.env.begin() as txn:
            raw = txn.get(b"offsets", db=self.db["meta"])
        return {int(p): int(o) for p, o in json.loads(raw)} if raw else {}

    def put_offsets(self, txn, offsets: dict[int, int]) -> None:
        merged = {**self.offsets_in(txn), **offsets}
        txn.put(b"offsets", json.dumps(sorted(merged.items())).encode(), db=self.db["meta"])

    def offsets_in(self, txn) -> dict[int, int]:
        raw = txn.get(b"offsets", db=self.db["meta"])
        return {int(p): int(o) for p, o in json.loads(raw)} if raw else {}

    def get(self, txn, item_id: str) -> dict | None:
        raw = txn.get(item_id.encode(), db=self.db["items"])
        return None if raw is None else json.loads(raw)

    def put(self, txn, item_id: str, rec: dict, stored_input: bytes | None = None) -> None:
        txn.put(item_id.encode(), json.dumps(rec).encode(), db=self.db["items"])
        if stored_input is not None:
            txn.put(item_id.encode(), stored_input, db=self.db["inputs"])

    def delete(self, txn, item_id: str) -> None:
        for name in ("items", "inputs"):
            txn.delete(item_id.encode(), db=self.db[name])

    def records(self, ids: list[str]) -> list[dict | None]:
        with self.env.begin() as txn:
            return [self.get(txn, i) for i in ids]

    def inputs(self, ids: list[str]) -> list[bytes | None]:
        with self.env.begin(buffers=False) as txn:
            return [txn.get(i.encode(), db=self.db["inputs"]) for i in ids]

    def scan(self, chunk: int = 10_000) -> Iterator[list[tuple[str, dict]]]:
        """Every item, ``chunk`` at a time (one short read transaction per chunk: a scan never pins old pages)."""
        after = b""
        while True:
            out = []
            with self.env.begin() as txn:
                cur = txn.cursor(db=self.db["items"])
                found = cur.set_range(after)
                if found and after and cur.key() == after:
                    found = cur.next()
                while found and len(out) < chunk:
                    out.append((cur.key().decode(), json.loads(cur.value())))
                    found = cur.next()
            if not out:
                return
            yield out
            after = out[-1][0].encode()

    def drop_partition(self, partition: int) -> int:
        """Forget a partition's items and offset (its changelog offset fell below the log start); returns how many."""
        gone = [i for batch in self.scan() for i, rec in batch if rec["p"] == partition]

        def fn(txn):
            for i in gone:
                self.delete(txn, i)
            offsets = self.offsets_in(txn)
            offsets.pop(partition, None)
            txn.put(b"offsets", json.dumps(sorted(offsets.items())).encode(), db=self.db["meta"])

        self.write(fn)
        return len(gone)

    def count(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self.db["items"])["entries"]

    def close(self) -> None:
        self.env.close()
