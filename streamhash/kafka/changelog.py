"""The shards' changelog: a compacted topic, co-partitioned with the images topic, holding each item's state.

A shard is a cache of Kafka (Kafka Streams' and quix-streams' changelogs are the model): the worker's checkpoint
(:mod:`streamhash.kafka.checkpoint`) sends, for every batch, one record per item whose state changed in shard p
to changelog partition p, flushes them (acknowledged by the broker) and only then commits the shard's
transaction, which stores the changelog's next offset beside the images offsets. A worker assigned p with no
shard, or a shard behind, replays the changelog into it (:mod:`streamhash.index.store.restore`) before it
ingests p; nothing is encoded again, learned codes included.

Records (``key`` → ``value``):

* **item state**: ``key`` = the item id (UTF-8, as on the images topic); ``value`` = ``b"SHC1"`` + 4-byte
  big-endian length of a JSON header + the header + the code + the feature + the blob. The header holds
  ``labels`` (list or null), ``ts``, ``ctype``, ``model`` (the network that inferred the code, or null),
  ``learned`` / ``learned_by`` (a learned DCC code and the model version it was learned with), ``quarantined``,
  ``generation`` (the shard's generation when written; informative: a restore writes into its own),
  and the byte lengths ``code``, ``feature``, ``blob``. The blob is here because the images topic has
  delete retention: after it expires the changelog is the only copy of an image (needed by a re-encode and
  by ``GET /items/<id>/image``), and compaction keeps exactly one copy per live id.
* **code update**: ``key`` = :data:`UPDATE_PREFIX` + the item id, ``value`` = ``b"SHU1"`` + JSON ``{"ts", "kind",
  "learned_by", "code"}`` (the hex code): a learned code (``kind`` ``learned``) or a quarantine mark applied to the
  item stored with timestamp ``ts``. Under its own key, so compaction keeps the item's state record where the item
  arrived: a restore writes items in arrival order, the order a shard breaks Hamming ties in, and then applies
  each update to the item with that timestamp as the shard's ``recodes`` log does (a re-sent item has another
  timestamp: its old update is left out). Nothing but the code travels again, never the blob.
* **tombstone**: ``key`` = the item id, ``value`` = null: the item was removed (compaction drops it after
  ``delete.retention.ms``). A removal sends one for the update key too.
* **offsets marker**: ``key`` = :data:`OFFSETS_KEY` (not UTF-8, so no item id can be it), ``value`` = JSON
  ``{"offsets": [[topic, partition, next_offset], ...]}``: the images and codes offsets the shard stores
  with this batch, sent after the batch's item records. Compaction keeps the newest; a restore sets them.
  ``"label_names": {"3": ["cat", ts], ...}`` beside them: the shard's whole class-name map
  (:mod:`streamhash.index.label_names`), in every marker, so the one compaction keeps holds it.

With a model key set (``security.model_key``), every record carries the ``streamhash-signature`` header
(HMAC-SHA256 over topic, key and value, as on the codes topic) and a reader refuses unsigned or forged ones.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import orjson

from streamhash.errors import InternalRecordRejected
from streamhash.kafka.modelbus import SIGNATURE_HEADER, CodeUpdate, signature

MAGIC = b"SHC1"
UPDATE_MAGIC = b"SHU1"
OFFSETS_KEY = b"\xffoffsets"  # 0xff never occurs in UTF-8: no item id collides with it
UPDATE_PREFIX = b"\xfe"  # neither does 0xfe: an update's key never collides with an item id
_LEN = struct.Struct(">I")
MAX_HEADER_BYTES = 64 << 10


@dataclass(frozen=True)
class ItemState:
    """One item as its shard holds it."""

    id: str
    code: bytes
    blob: bytes
    ctype: str
    labels: tuple[int, ...] | None
    ts: float
    model: int | None = None  # the network that inferred ``code`` (None: unknown)
    learned: bool = False
    learned_by: int | None = None
    quarantined: bool = False
    generation: int = 0
    feature: bytes | None = None


@dataclass(frozen=True)
class Updated:
    """A learned code (``kind="learned"``) or a quarantine mark for the item stored with timestamp ``ts``."""

    id: str
    ts: float
    kind: str
    code: bytes = b""
    learned_by: int | None = None

    def as_update(self) -> CodeUpdate:
        """The update as the store applies one from the codes topic (matched by timestamp: a restore renumbers seqs)."""
        return CodeUpdate(self.id, -1, self.kind, self.learned_by or 0, self.code, ts=self.ts)


@dataclass(frozen=True)
class Removed:
    id: str


@dataclass(frozen=True)
class Offsets:
    offsets: dict[tuple[str, int], int]
    label_names: dict[int, tuple[str, float]] = field(default_factory=dict)  # the shard's class names (label -> name, ts)


def encode(state: ItemState) -> tuple[bytes, bytes]:
    """(key, value) of an item-state record."""
    feature = state.feature or b""
    head = orjson.dumps({
        "labels": list(state.labels) if state.labels is not None else None, "ts": state.ts, "ctype": state.ctype,
        "model": state.model, "learned": state.learned, "learned_by": state.learned_by,
        "quarantined": state.quarantined, "generation": state.generation,
        "code": len(state.code), "feature": len(state.feature) if state.feature is not None else None,
        "blob": len(state.blob)})
    return state.id.encode(), b"".join((MAGIC, _LEN.pack(len(head)), head, state.code, feature, state.blob))


def encode_update(u: Updated) -> tuple[bytes, bytes]:
    """(key, value) of a code-update record."""
    head = {"ts": u.ts, "kind": u.kind, "learned_by": u.learned_by, "code": u.code.hex()}
    return UPDATE_PREFIX + u.id.encode(), UPDATE_MAGIC + orjson.dumps(head)


def encode_tombstones(item_id: str) -> list[tuple[bytes, None]]:
    """A removal: the item's state and its code update, if it had one."""
    return [(item_id.encode(), None), (UPDATE_PREFIX + item_id.encode(), None)]


def encode_offsets(offsets: dict[tuple[str, int], int], label_names: dict | None = None) -> tuple[bytes, bytes]:
    body: dict = {"offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())]}
    if label_names:
        body["label_names"] = {str(label): [name, ts] for label, (name, ts) in sorted(label_names.items())}
    return OFFSETS_KEY, orjson.dumps(body)


def sign_headers(secret: bytes | None, topic: str, key: bytes, value: bytes | None) -> list[tuple[str, bytes]]:
    """The record's headers: its signature when the pipeline has a model key."""
    return [] if secret is None else [(SIGNATURE_HEADER, signature(secret, topic, key, b"", value or b""))]


def parse(key: bytes | None, value: bytes | None, headers=None, *, topic: str = "",
          secret: bytes | None = None) -> ItemState | Updated | Removed | Offsets:
    """A changelog record, or :class:`InternalRecordRejected` (stage ``changelog``) saying why."""
    if secret is not None:
        got = [v for k, v in (headers or []) if k == SIGNATURE_HEADER]
        if len(got) != 1 or got[0] != signature(secret, topic, key or b"", b"", value or b""):
            raise InternalRecordRejected("changelog", f"{topic}: unsigned or badly signed record {key[:40]!r}")
    if key == OFFSETS_KEY:
        return _offsets(value)
    update = key is not None and key[:1] == UPDATE_PREFIX
    raw = key[1:] if update else key
    try:
        item_id = raw.decode("utf-8") if raw else ""
    except UnicodeDecodeError:
        item_id = ""
    if not item_id or len(raw) > 256:
        raise InternalRecordRejected("changelog", f"key {key[:40]!r} is not an item id")
    if value is None:
        return Removed(item_id)
    return _update(item_id, value) if update else _state(item_id, value)


def _update(item_id: str, value: bytes) -> Updated:
    if value[:4] != UPDATE_MAGIC:
        raise InternalRecordRejected("changelog", f"{item_id!r}: not a {UPDATE_MAGIC!r} record")
    try:
        h = orjson.loads(value[4:])
        kind = h["kind"]
        if kind not in ("learned", "quarantine"):
            raise ValueError(f"kind {kind!r}")
        return Updated(item_id, float(h["ts"]), kind, bytes.fromhex(h["code"]),
                       None if h["learned_by"] is None else int(h["learned_by"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise InternalRecordRejected("changelog", f"{item_id!r}: {exc}"[:300]) from None


def _offsets(value: bytes | None) -> Offsets:
    try:
        body = orjson.loads(value or b"")
        names = {int(label): (str(name), float(ts)) for label, (name, ts) in body.get("label_names", {}).items()}
        return Offsets({(str(t), int(p)): int(o) for t, p, o in body["offsets"]}, names)
    except (ValueError, KeyError, TypeError) as exc:
        raise InternalRecordRejected("changelog", f"offsets marker: {exc}"[:300]) from None


def _state(item_id: str, value: bytes) -> ItemState:
    if value[:4] != MAGIC or len(value) < 8:
        raise InternalRecordRejected("changelog", f"{item_id!r}: not a {MAGIC!r} record")
    (n,) = _LEN.unpack_from(value, 4)
    if n > MAX_HEADER_BYTES or 8 + n > len(value):
        raise InternalRecordRejected("changelog", f"{item_id!r}: header of {n} bytes")
    try:
        h = orjson.loads(value[8:8 + n])
        nc, nf, nb = int(h["code"]), int(h["feature"] or 0), int(h["blob"])
        at = 8 + n
        if min(nc, nf, nb) < 0 or at + nc + nf + nb != len(value):
            raise ValueError(f"lengths {nc}+{nf}+{nb} do not add up to the value's {len(value) - at} bytes")
        labels = h["labels"]
        return ItemState(
            item_id, value[at:at + nc], value[at + nc + nf:], str(h["ctype"]),
            tuple(int(x) for x in labels) if labels is not None else None, float(h["ts"]),
            None if h["model"] is None else int(h["model"]), bool(h["learned"]),
            None if h["learned_by"] is None else int(h["learned_by"]), bool(h["quarantined"]),
            int(h["generation"]), value[at + nc:at + nc + nf] if h["feature"] is not None else None)
    except (ValueError, KeyError, TypeError) as exc:
        raise InternalRecordRejected("changelog", f"{item_id!r}: {exc}"[:300]) from None
