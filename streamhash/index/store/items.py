"""Items: their records and image blobs, and the one place an item is linked into codes and the change log.

Writes are one transaction per batch: items, codes, blobs, changes and the Kafka offset
map commit together or not at all. Every write takes a fresh ``seq``. An arrival (a new item, a re-sent id)
links the item under it in ``changes`` and unlinks its previous entries, so the change log holds one entry per
live item, at its arrival; a learned code (:meth:`Items.recode`) leaves that entry and logs the item under the new
seq in ``recodes`` instead (one entry per recoded item, its latest), so the item keeps its place in arrival order.
A removal (a tombstone) unlinks the item, deletes its record, blob and stored feature, and logs its id under a
fresh seq in ``deletes``, which followers read beside the change log. An item's stored feature (``features``,
a frozen backbone's output for its image) is written, replaced or deleted with its blob, in the same transaction.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from streamhash.errors import GenerationChanged, StoreError
from streamhash.index.store.env import Environment
from streamhash.index.store.layout import u64
from streamhash.index.store.offsets import Offsets


def holds_state(txn, db, key: bytes, old: dict, rec: dict, gen: int, code: bytes, blob: bytes, feature) -> bool:
    """Whether the shard already holds exactly this item state (record, code in ``gen``, blob, feature): a message
    consumed again after a kill, or a changelog record replayed into a shard that has it. Writing it again would
    give the item a new seq, a change for every follower, and count the message twice."""
    if {k: v for k, v in old.items() if k not in ("seq", "arrived")} != rec:
        return False
    if txn.get(u64(gen) + key, db=db["codes"]) != code or txn.get(key, db=db["blobs"]) != blob:
        return False
    features_db = db.get("features")
    return features_db is None or txn.get(key, db=features_db) == feature


@dataclass
class ItemWrite:
    """One item as the worker writes it."""

    id: str
    code: bytes
    blob: bytes
    content_type: str
    labels: tuple[int, ...] | None
    ts: float = field(default_factory=time.time)
    feature: bytes | None = None  # what a frozen backbone gives the image, where the network has one (issue 23)


def live_generations(meta: dict) -> list[int]:
    """The current generation and, during a re-encode, the one being built beside it: a rewrite
    must drop the item's old code from both (the pending one catches it up before its swap)."""
    return [int(meta["generation"])] + ([int(meta["pending_generation"])] if meta.get("pending_generation") else [])


def count_pending_codes(env: Environment, txn, n: int) -> None:
    """Add ``n`` to ``meta.pending_codes``, how many items hold a code in the generation being built: the
    swap's proof that every item has one, without reading them all (each item holds at most one)."""
    raw = txn.get(b"pending_codes", db=env.db["meta"])
    txn.put(b"pending_codes", json.dumps((json.loads(raw) or 0) + n if raw else n).encode(), db=env.db["meta"])


def inferred_by(rec: dict, meta: dict) -> int:
    """The network that inferred an item's code in the live generation (-1: none recorded).

    A record names the network that encoded the item when it was written; a re-encode does not rewrite
    records (their number would make its swap long), it records ``generation_model``, the network the
    live generation was built with: every inferred code in it is that network's or a later one's.
    Learned codes keep the version they were written with (they are never inferred).
    """
    made_by = -1 if rec.get("model") is None else int(rec["model"])
    built_by = meta.get("generation_model")
    return made_by if rec.get("learned") or built_by is None else max(made_by, int(built_by))


def arrival(rec: dict) -> int:
    """The seq an item arrived under: its key in ``changes``. A record names it (``arrived``) once a learned code
    gave the item a later ``seq``; before that, and in a shard written before ``recodes`` existed (whose every
    write moved the item's entry in ``changes``), it is ``seq``."""
    return int(rec.get("arrived", rec["seq"]))


class Items:
    def __init__(self, env: Environment, code_bytes: int, offsets: Offsets, features: dict | None = None):
        self.env, self.code_bytes, self.offsets = env, code_bytes, offsets
        self.feature_spec = features  # what this writer's network stores per item (None: nothing, or read-only)

    def _check_features(self, items: list[ItemWrite]) -> bool:
        """Whether the batch carries stored features; each must be the size the writer's spec says."""
        with_feature = [it for it in items if it.feature is not None]
        if not with_feature:
            return False
        if self.feature_spec is None:
            raise StoreError(f"item {with_feature[0].id!r} carries a feature but the store was opened without a "
                             f"feature spec (Store(features=...))")
        size = int(np.prod(self.feature_spec["feature_shape"])) * np.dtype(self.feature_spec["dtype"]).itemsize
        for it in with_feature:
            if len(it.feature) != size:
                raise StoreError(f"feature of {len(it.feature)} bytes for item {it.id!r}, the store keeps {size} "
                                 f"({self.feature_spec['feature_shape']} {self.feature_spec['dtype']})")
        return True

    def write_batch(self, items: Iterable[ItemWrite], offsets: dict[tuple[str, int], int] | None = None,
                    *, generation: int | None = None, model_version: int | None = None,
                    deletes: Iterable[str] = ()) -> list[int]:
        """Write items (overwriting re-sent ids), remove the ``deletes`` ids, and write the offset map, in one
        transaction; return the items' seqs. Removals come after the writes: the caller passes each id's last
        operation of the batch only (an id written and removed in one batch is removed; removed, then written
        again, is written). Removing an id the store does not hold changes nothing.

        ``generation``: the generation the codes were encoded for; if a re-encode swapped in another
        one meanwhile, GenerationChanged is raised and nothing is written (encode again, retry).
        ``model_version``: the network that inferred the codes, recorded with each item.
        """
        items = list(items)
        for it in items:
            if len(it.code) != self.code_bytes:
                raise StoreError(f"code of {len(it.code)} bytes for item {it.id!r}, store holds {self.code_bytes}")
        has_features = self._check_features(items)
        db = self.env.db

        def txn_fn(txn):
            meta = self.env.read_meta(txn)
            gen, seq = int(meta["generation"]), int(meta["next_seq"])
            if generation is not None and generation != gen:
                raise GenerationChanged(gen, f"codes encoded for generation {generation}, store is at {gen}")
            if has_features and not meta.get("features"):  # the first item with one: the shard says what it keeps
                self.env.put_meta(txn, {"features": self.feature_spec})
            gens = live_generations(meta)
            seqs = []
            for it in items:
                key = it.id.encode()
                old = txn.get(key, db=db["items"])
                rec = {"labels": list(it.labels) if it.labels is not None else None, "ts": it.ts,
                       "shard": meta["shard"], "ctype": it.content_type, "model": model_version}
                if old is not None:
                    old_rec = json.loads(old)
                    if holds_state(txn, db, key, old_rec, rec, gen, it.code, it.blob, it.feature):
                        seqs.append(int(old_rec["seq"]))  # a message read again (after a takeover): nothing changes
                        continue
                    self.unlink(txn, key, old_rec, gens)
                self.link(txn, key, rec, gen, seq, it.code)
                txn.put(key, it.blob, db=db["blobs"])
                if it.feature is not None:
                    txn.put(key, it.feature, db=db["features"])
                elif old is not None:  # re-sent without one: the old image's feature must not outlive it
                    txn.delete(key, db=db["features"])
                seqs.append(seq)
                seq += 1
            for item_id in deletes:
                key = item_id.encode()
                old = txn.get(key, db=db["items"])
                if old is None:
                    continue
                self.unlink(txn, key, json.loads(old), gens)
                txn.delete(key, db=db["items"])
                txn.delete(key, db=db["blobs"])
                txn.delete(key, db=db["features"])
                txn.put(u64(seq), key, db=db["deletes"])
                seq += 1
            self.offsets.put(txn, offsets or {})
            txn.put(b"next_seq", json.dumps(seq).encode(), db=db["meta"])
            return seqs

        return self.env.write(txn_fn)

    def put_codes(self, ids: list[str], codes: np.ndarray, *, model_version: int | None = None) -> list[int]:
        """Replace codes of existing items in the current generation (learned codes of new items),
        optionally making ``model_version`` current in the same transaction.

        Each updated item gets a new seq in ``recodes`` (:meth:`recode`), so followers pick the change up like any
        write, and keeps its arrival in ``changes``.
        """
        db = self.env.db

        def txn_fn(txn):
            meta = self.env.read_meta(txn)
            gen, seq = int(meta["generation"]), int(meta["next_seq"])
            gens, seqs = live_generations(meta), []
            for item_id, code in zip(ids, np.asarray(codes, np.uint8)):
                key = item_id.encode()
                raw = txn.get(key, db=db["items"])
                if raw is None:
                    continue
                self._learned(txn, key, json.loads(raw), gens, gen, seq, code.tobytes())
                seqs.append(seq)
                seq += 1
            txn.put(b"next_seq", json.dumps(seq).encode(), db=db["meta"])
            if model_version is not None:
                txn.put(b"model_version", json.dumps(model_version).encode(), db=db["meta"])
            return seqs

        return self.env.write(txn_fn)

    def _learned(self, txn, key: bytes, rec: dict, gens: list[int], gen: int, seq: int, code: bytes) -> None:
        rec["recoded"] = True  # not a new message: followers must not count it as fresh
        rec["learned"] = True  # a DCC code: the learner must not take it as pending after a restart
        self.recode(txn, key, rec, gens, gen, seq, code)

    def apply_updates(self, updates, offsets: dict[tuple[str, int], int]) -> dict[str, int]:
        """The learner's code updates (:class:`~streamhash.kafka.modelbus.CodeUpdate`) and the codes topic's
        offsets, in one transaction; returns how many were applied, quarantined, stale or missing.

        An update names the seq its item had when the learner read it: an item written again since
        (a re-sent id, or a learned code already applied) is ``stale`` and left as it is.
        """
        db = self.env.db

        def txn_fn(txn):
            meta = self.env.read_meta(txn)
            gen, seq = int(meta["generation"]), int(meta["next_seq"])
            gens, results = live_generations(meta), {"applied": 0, "quarantined": 0, "stale": 0, "missing": 0}
            for u in updates:
                result = self.update_in(txn, u, gens, gen, seq)
                seq += result == "applied"
                results[result] += 1
            txn.put(b"next_seq", json.dumps(seq).encode(), db=db["meta"])
            self.offsets.put(txn, offsets)
            return results

        return self.env.write(txn_fn)

    def update_in(self, txn, u, gens: list[int], gen: int, seq: int) -> str:
        """One update in ``txn``: ``applied`` (a learned code, under ``seq``), ``quarantined``, ``stale`` or
        ``missing``."""
        db, key = self.env.db, u.item_id.encode()
        raw = txn.get(key, db=db["items"])
        rec = json.loads(raw) if raw is not None else None
        if rec is None or not u.matches(rec):
            return "missing" if rec is None else "stale"
        if u.kind == "quarantine":
            txn.put(key, json.dumps({**rec, "quarantined": True}).encode(), db=db["items"])
            return "quarantined"
        if len(u.code) != self.code_bytes:
            raise StoreError(f"learned code of {len(u.code)} bytes for item {u.item_id!r}, store holds {self.code_bytes}")
        rec["learned_by"] = u.model_version  # the published model this code was learned with
        self._learned(txn, key, rec, gens, gen, seq, u.code)
        return "applied"

    def quarantine(self, ids: list[str]) -> None:
        """Mark items as never to be learned from (a learning round failed on them); they stay indexed.
        Not a change of code, so their seq stays and followers see nothing."""
        db = self.env.db["items"]

        def txn_fn(txn):
            for item_id in ids:
                raw = txn.get(item_id.encode(), db=db)
                if raw is not None:
                    txn.put(item_id.encode(), json.dumps({**json.loads(raw), "quarantined": True}).encode(), db=db)

        self.env.write(txn_fn)

    def link(self, txn, key: bytes, rec: dict, gen: int, seq: int, code: bytes) -> None:
        """Write an item that arrives under a fresh ``seq``: its record, its code in ``gen``, its change."""
        db = self.env.db
        rec["seq"] = seq
        rec.pop("arrived", None)  # only a recoded item's record names its arrival: 17 bytes an item saved
        txn.put(key, json.dumps(rec).encode(), db=db["items"])
        txn.put(u64(gen) + key, code, db=db["codes"])
        txn.put(u64(seq), key, db=db["changes"])

    def recode(self, txn, key: bytes, rec: dict, gens: list[int], gen: int, seq: int, code: bytes) -> None:
        """A new code for a stored item, under a fresh ``seq`` logged in ``recodes``; its arrival stays in ``changes``."""
        db, arrived = self.env.db, arrival(rec)
        self._drop_code_and_recode(txn, key, rec, gens)
        rec["seq"], rec["arrived"] = seq, arrived
        txn.put(key, json.dumps(rec).encode(), db=db["items"])
        txn.put(u64(gen) + key, code, db=db["codes"])
        txn.put(u64(seq), key, db=db["recodes"])

    def unlink(self, txn, key: bytes, rec: dict, gens: list[int]) -> None:
        """Take an item out of the codes and both logs (it is written again, or removed)."""
        self._drop_code_and_recode(txn, key, rec, gens)
        txn.delete(u64(arrival(rec)), db=self.env.db["changes"])

    def _drop_code_and_recode(self, txn, key: bytes, rec: dict, gens: list[int]) -> None:
        """The item's codes in the live generations, and its entry in ``recodes`` if a learned code made one."""
        if rec["seq"] != arrival(rec):
            txn.delete(u64(rec["seq"]), db=self.env.db["recodes"])
        for i, gen in enumerate(gens):
            if txn.delete(u64(gen) + key, db=self.env.db["codes"]):  # True when the item held a code there
                if i:  # the generation being built lost this item's code: its catch-up writes it again
                    count_pending_codes(self.env, txn, -1)

    def count(self) -> int:
        return self.env.read(lambda txn: txn.stat(self.env.db["items"])["entries"])

    def get(self, item_id: str, *, with_blob: bool = False) -> dict | None:
        return self.env.read(lambda txn: self.record_in(txn, item_id, None, with_blob=with_blob))

    def get_many(self, ids: Iterable[str]) -> list[dict | None]:
        """Each id's record as :meth:`get` gives it (no blob), None where absent, from one snapshot: one read
        transaction and one meta read for all of them, not one per id."""
        def read(txn):
            meta = self.env.read_meta(txn)
            return [self.record_in(txn, item_id, meta) for item_id in ids]

        return self.env.read(read)

    def record_in(self, txn, item_id: str, meta: dict | None, *, with_blob: bool = False) -> dict | None:
        """An item's record, its code in the live generation and the network that inferred it; ``meta`` the
        snapshot's (None: read here, only if the item is there)."""
        db, key = self.env.db, item_id.encode()
        raw = txn.get(key, db=db["items"])
        if raw is None:
            return None
        rec = json.loads(raw)
        meta = self.env.read_meta(txn) if meta is None else meta
        rec["id"] = item_id
        made_by = inferred_by(rec, meta)
        rec["model"] = None if made_by < 0 else made_by
        rec["generation"] = int(meta["generation"])
        rec["code"] = txn.get(u64(rec["generation"]) + key, db=db["codes"])
        if with_blob:
            rec["blob"] = txn.get(key, db=db["blobs"])
        return rec

    def blobs(self, ids: Iterable[str]) -> list[tuple[bytes, str] | None]:
        """Image bytes and content type for each id (None where absent), from one snapshot."""
        return self.env.read(lambda txn: [self.blob_in(txn, i.encode()) for i in ids])

    def blob_in(self, txn, key: bytes) -> tuple[bytes, str] | None:
        rec, blob = txn.get(key, db=self.env.db["items"]), txn.get(key, db=self.env.db["blobs"])
        return None if rec is None or blob is None else (blob, json.loads(rec)["ctype"])

    def features(self, ids: Iterable[str]) -> list[np.ndarray | None]:
        """Each id's stored feature as the shard's meta shapes it (float16), None where the item has none (absent,
        removed, or written before its shard kept features), from one snapshot."""
        return self.env.read(lambda txn: self.features_in(txn, [i.encode() for i in ids]))

    def features_in(self, txn, keys: list[bytes]) -> list[np.ndarray | None]:
        spec, db = self.env.read_meta(txn).get("features"), self.env.db["features"]
        if not spec or db is None:
            return [None] * len(keys)
        shape, dtype = tuple(spec["feature_shape"]), np.dtype(spec["dtype"])
        out = []
        for key in keys:
            raw = txn.get(key, db=db)
            out.append(None if raw is None else np.frombuffer(raw, dtype).reshape(shape))
        return out
