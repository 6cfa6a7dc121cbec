"""What the store holds on disk: its sub-databases, their keys and values, and the schema check.

==========  ===========================================  ==========================================
``items``   item id (UTF-8)                              JSON: labels, ts, seq, shard, ctype, model, ...
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

Meta keys and their writers: ``schema_version``, ``bits``, ``shard``, ``backbone``, ``multihash_tables``
and ``created`` (here, once); ``next_seq`` (items); ``model_version`` (models, items, generations);
``generation``, ``pending_generation``, ``generation_model`` (the network the live generation was built
with) and ``pending_codes`` (items holding a code in the pending one; items lower it when a write drops
one) (generations); ``topic_ids`` (offsets). Item records carry
``recoded``, ``learned`` (a learned code replaced the inferred one), ``learned_by`` (the model version it was
learned with, when it came from the learner's codes topic) and ``quarantined`` besides.
"""

from __future__ import annotations

import struct
import time

import orjson

from streamhash.errors import SchemaMismatchError, StoreError

SCHEMA_VERSION = 1
DB_NAMES = ("items", "codes", "blobs", "tables", "models", "offsets", "meta", "changes")
_U64 = struct.Struct(">Q")


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def offset_key(topic: str, partition: int) -> bytes:
    return f"{topic}\0{partition}".encode()


def db_flags(name: str) -> dict:
    if name == "tables":
        from streamhash.index.multihash import TABLES_DB_FLAGS

        return dict(TABLES_DB_FLAGS)
    return {}


def labels_of_record(raw: bytes) -> tuple[int, ...] | None:
    labels = orjson.loads(raw)["labels"]  # per hit of every search: ~3x faster than json.loads on these records
    return tuple(labels) if labels is not None else None


def init_meta(env, *, bits: int | None, shard: int, backbone: str | None) -> dict:
    """The meta of a writable store: written for a new one, checked against this build and the settings otherwise."""
    meta = env.read_meta()
    if not meta:
        if bits is None:
            raise StoreError(f"new store at {env.path} needs `bits`")
        from streamhash.index.multihash import MultiHashTables

        meta = {
            "schema_version": SCHEMA_VERSION, "bits": bits, "shard": shard, "backbone": backbone,
            "generation": 1, "model_version": 0, "next_seq": 1,
            "multihash_tables": MultiHashTables.default_m(bits), "created": time.time(),
        }
        env.write(lambda txn: env.put_meta(txn, meta))
        return meta
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"store {env.path} has schema {meta.get('schema_version')}, this build reads {SCHEMA_VERSION}"
        )
    if bits is not None and int(meta["bits"]) != bits:
        raise SchemaMismatchError(f"store {env.path} holds {meta['bits']}-bit codes, configured bits={bits}")
    if backbone is not None and meta.get("backbone") not in (None, backbone):
        raise SchemaMismatchError(f"store {env.path} was built with backbone {meta['backbone']}, not {backbone}")
    return meta
