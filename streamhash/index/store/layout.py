"""What the store holds on disk: its sub-databases, their keys and values, and the schema check.

==========  ===========================================  ==========================================
``items``   item id (UTF-8)                              JSON: labels, ts, seq, shard, ctype, model, ...
``codes``   generation (8 B) + item id                   packed code, ``bits/8`` bytes
``blobs``   item id                                      the image bytes as received
``models``  model version (8 B)                          serialised hash network
``offsets`` ``topic\\0partition``                         next offset to consume (8 B)
``meta``    name                                         JSON value: schema, bits, generation, ...
``changes`` seq (8 B)                                    item id, at the seq it arrived under
``recodes`` seq (8 B)                                    item id, at the seq of its latest learned code
``deletes`` seq (8 B)                                    item id of an item removed (a tombstone)
``features`` item id                                     the network's stored input (float16 bytes)
==========  ===========================================  ==========================================

``changes`` is our addition to the design's list: every write gives the item a new, increasing
``seq``. An arrival (a new item, or a re-sent id) removes the item's previous entries and enters it in ``changes``,
so ``changes`` holds exactly one entry per live item, in arrival order. A learned code applied to a stored item
(``put_codes``, ``apply_updates``) leaves that entry where it is and enters the new seq in ``recodes``, after
removing the item's earlier one there: ``recodes`` holds one entry per item whose code was learned since it arrived.
Followers (the query worker, the learner) read both from their last seen seq, which makes staying live an
O(new items) read instead of a scan. A removed item (a Kafka tombstone: a null value for
its key) leaves ``changes`` and takes a seq in ``deletes``, so followers read removals in the same seq
order as writes. A tombstone keeps the removed id (not its image, labels or code) for as long as the shard
lives: a follower that was behind (the learner across a re-encode) still learns of the removal. The arrival seq
(an item's key in ``changes``; ``arrived`` in the record of an item recoded since) is the int64 id the in-memory
Hamming index uses, so ties break by arrival order: a learned code replaces the item's code where it stands,
and at equal distance learned and inferred codes rank in the order their items came (issue 24: when a learned
code moved its item to the end, 0.96-0.99 of each query's top 10 were inferred codes, against 0.75 of the index).
``seq`` in a record is the item's latest write, the version a learned code for it must name (``apply_updates``).

Meta keys and their writers: ``schema_version``, ``bits``, ``shard``, ``backbone`` and ``created`` (here,
once); ``next_seq`` (items); ``model_version`` (models, items, generations);
``generation``, ``pending_generation``, ``generation_model`` (the network the live generation was built
with) and ``pending_codes`` (items holding a code in the pending one; items lower it when a write drops
one) (generations); ``topic_ids`` (offsets); ``label_names``, each label's class name
(:mod:`streamhash.index.label_names`, the worker and a restore). Item records carry
``arrived`` (a recoded item's arrival seq), ``recoded``, ``learned`` (a learned code replaced the inferred one),
``learned_by`` (the model version it was learned with, when it came from the learner's codes topic) and
``quarantined`` besides.

``features`` (issue 23): for a network whose backbone is frozen (a pretrained one), what its frozen part gives
the item's image — the pooled feature, or the activation at the network's cut — written once, with the item,
in its transaction, and deleted with it; learning rounds and re-encodes read it instead of decoding the blob.
Meta ``features`` (``{"backbone", "cut", "feature_shape", "dtype"}``, and ``input_size`` where the backbone has one:
its pooled feature has one shape at every input size, not the same values) is written with the first item that has
one; a writer opened with another spec is refused (:class:`~streamhash.errors.FeatureSpecMismatch`). The
sub-database is optional like ``deletes``: a reader of an older shard finds none and reads blobs; no schema
change (an older build never opens it and would leave a removed item's feature behind, nothing worse).

Schema history. 1: the sub-databases above and ``tables``, multi-index hash buckets per generation in
LMDB, written with every code and read by no query once radius search moved to the in-memory tables
(:mod:`streamhash.index.memhash`); meta ``multihash_tables``. 2 (now): without them. The one writable
opener of a schema-1 shard (its worker) migrates it in place, in one write transaction that drops
``tables`` and ``multihash_tables`` and writes the new schema number (:func:`migrate`): a crash before
its commit leaves the shard at schema 1, tables and all, and the next open migrates it again. The
dropped pages go back to LMDB's free list, reused by later writes; the file does not shrink. Read-only
openers (query servers, the learner) read either schema as it is, since the sub-databases they open
are the same in both; a reader open across the migration keeps its snapshot and its handles. A shard
at schema 2 cannot be opened by an older build: its writer refuses the schema number, its readers miss
the ``tables`` sub-database. 3: ``deletes`` (item removal); 1 and 2 migrate to 3 in that same transaction
(the writer creates the empty sub-database when it opens the shard). A read-only opener of a shard at
schema 1 or 2 finds no ``deletes``: nothing was ever removed from it. 4: ``recodes`` (learned codes keep the
item's arrival); 1-3 migrate to 4 the same way. A shard at schema 3 holds no record with ``arrived``: each of its
items keeps the place its latest write gave it, and later learned codes keep that place. A read-only opener of a
shard at schema 1-3 finds no ``recodes``; one that opened it before its writer migrated it does not see learned
codes applied after that until it opens the shard again (it logs a warning when it reads the new schema number).
"""

from __future__ import annotations

import logging
import struct
import time

import orjson

from streamhash.errors import FeatureSpecMismatch, SchemaMismatchError, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4
READABLE_SCHEMAS = (1, 2, 3, 4)  # what a read-only opener reads: 1 and 2 differ only by sub-databases it need not open
DB_NAMES = ("items", "codes", "blobs", "models", "offsets", "meta", "changes", "recodes", "deletes", "features")
# absent in a shard that no writer of a build knowing them has opened yet (deletes: schema 1 or 2; recodes: 1-3;
# features: any)
OPTIONAL_DBS = ("recodes", "deletes", "features")
# Schema 1's multi-index tables, as it created them (opening a sub-database takes its flags)
_V1_TABLES, _V1_TABLES_FLAGS = b"tables", {"dupsort": True, "dupfixed": True}
_U64 = struct.Struct(">Q")


def u64(n: int) -> bytes:
    return _U64.pack(n)


def from_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def offset_key(topic: str, partition: int) -> bytes:
    return f"{topic}\0{partition}".encode()


def labels_of_record(raw: bytes) -> tuple[int, ...] | None:
    labels = orjson.loads(raw)["labels"]  # per hit of every search: ~3x faster than json.loads on these records
    return tuple(labels) if labels is not None else None


def describe_features(spec: dict | None, backbone: str | None = None) -> str:
    """``efficientnet_lite0 (cut pooled) features (1280,) float16``, for the errors that name two of them."""
    if not spec:
        return f"backbone {backbone} (no stored features)" if backbone else "no stored features"
    size = f", input {spec['input_size']}" if spec.get("input_size") else ""
    return (f"backbone {spec.get('backbone')} (cut {spec.get('cut')}{size}) features "
            f"{tuple(spec.get('feature_shape') or ())} {spec.get('dtype')}")


def check_features(meta: dict, path, backbone: str | None, features: dict | None) -> None:
    """Refuse a shard written with another backbone, or whose stored features another network made."""
    held = meta.get("features")
    other_backbone = backbone is not None and meta.get("backbone") not in (None, backbone)
    if other_backbone or (held and features and {**held} != {**features}):
        raise FeatureSpecMismatch(f"store {path} was written with {describe_features(held, meta.get('backbone'))}; "
                                  f"this process's network is {describe_features(features, backbone)}")


def init_meta(env, *, bits: int | None, shard: int, backbone: str | None, features: dict | None = None) -> dict:
    """The meta of a writable store: written for a new one, checked against this build and the settings otherwise."""
    meta = env.read_meta()
    if not meta:
        if bits is None:
            raise StoreError(f"new store at {env.path} needs `bits`")
        meta = {
            "schema_version": SCHEMA_VERSION, "bits": bits, "shard": shard, "backbone": backbone,
            "generation": 1, "model_version": 0, "next_seq": 1, "created": time.time(),
        }
        env.write(lambda txn: env.put_meta(txn, meta))
        return meta
    if meta.get("schema_version") in (1, 2, 3):
        meta = migrate(env)
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise SchemaMismatchError(
            f"store {env.path} has schema {meta.get('schema_version')}, this build reads {SCHEMA_VERSION}"
        )
    if bits is not None and int(meta["bits"]) != bits:
        raise SchemaMismatchError(f"store {env.path} holds {meta['bits']}-bit codes, configured bits={bits}")
    check_features(meta, env.path, backbone, features)
    return meta


def check_readable(meta: dict, path) -> dict:
    """The meta of a read-only store, refused when this build cannot read its schema."""
    if meta and meta.get("schema_version") not in READABLE_SCHEMAS:
        raise SchemaMismatchError(
            f"store {path} has schema {meta.get('schema_version')}, this build reads {READABLE_SCHEMAS}"
        )
    return meta


def migrate(env) -> dict:
    """Schema 1, 2 or 3 to 4 in place, in one write transaction: drop ``tables`` and ``multihash_tables`` (schema 1),
    write the schema number (``deletes`` and ``recodes`` exist already: the writer's open created them). Returns the
    new meta."""
    from_schema = env.read_meta().get("schema_version")

    def txn_fn(txn):
        if env.read_meta(txn).get("schema_version") not in (1, 2, 3):  # migrated meanwhile: nothing to do
            return
        if txn.get(_V1_TABLES) is not None:  # the main database holds a record per named sub-database
            txn.drop(env.env.open_db(_V1_TABLES, txn=txn, create=False, **_V1_TABLES_FLAGS), delete=True)
        txn.delete(b"multihash_tables", db=env.db["meta"])
        env.put_meta(txn, {"schema_version": SCHEMA_VERSION})

    env.write(txn_fn)
    log.info("store %s migrated from schema %s to %d", env.path, from_schema, SCHEMA_VERSION)
    return env.read_meta()
