"""A shard rebuilt from its changelog (:mod:`streamhash.kafka.changelog`), in large transactions.

:func:`apply_changelog` writes a run of changelog entries (item states and removals, in log order) and the offsets
they bring the shard to in one LMDB transaction: one per several thousand records, not one per record (the
cost quix-streams #351 measured), so a restore runs well above the ingest rate and never runs a network: each
entry carries its code (inferred or learned) with its provenance. Within a run an id's last entry wins.

Items take seqs in the order their state records come, which is the order they arrived: a learned code or a
quarantine mark is an update record of its own (:class:`~streamhash.kafka.changelog.Updated`), applied after the
run's states to the item with its timestamp as the worker applies one from the codes topic (a learned code takes a
seq in ``recodes``; its item keeps its place among its Hamming ties).

Every item is written into the shard's current generation with the record's provenance (``model``: the
network that inferred it; ``learned``/``learned_by``). A restored shard then adopts the announced model like
any shard opened late: when its generation is behind, the re-encoder re-encodes the items whose inferred code
is of an older network (learned codes and up-to-date ones are copied), exactly as for a shard that stayed.
Since a catch-up restore may write older networks' codes into a shard that a re-encode had brought up to date,
it drops the meta's ``generation_model`` (the claim that every inferred code is at least that network's): the
records' own versions then say which codes a later re-encode must redo (at worst some twice, never none).

The meta says ``restoring: true`` from the first run to the last (:func:`set_flags`); query servers report the
shard as partial meanwhile.
"""

from __future__ import annotations

import json
import logging

from streamhash.index.store.items import holds_state, live_generations
from streamhash.index.store.layout import u64

log = logging.getLogger(__name__)


def apply_changelog(store, entries, offsets: dict[tuple[str, int], int]) -> dict[str, int]:
    """Write ``entries`` (:class:`~streamhash.kafka.changelog.ItemState` / ``Updated`` / ``Removed``) and ``offsets`` in one
    transaction. Returns counts: ``written``, ``removed``, ``refused`` (a code of another length than the shard's),
    ``unchanged`` (the shard already held that exact state: left as it is, under its seq), ``updated`` (learned
    codes and quarantine marks applied) and ``stale`` (updates of an item removed or sent again since)."""
    last: dict = {}
    updates: dict = {}
    for e in entries:
        if hasattr(e, "kind"):  # an update (kafka.changelog.Updated); the store does not import the Kafka side
            updates[e.id] = e
            continue
        last.pop(e.id, None)  # re-inserted: the seq order follows each id's last entry
        last[e.id] = e
    items, env = store.items, store._env
    db = env.db

    def txn_fn(txn):
        meta = env.read_meta(txn)
        gen, seq = int(meta["generation"]), int(meta["next_seq"])
        gens = live_generations(meta)
        counts = {"written": 0, "removed": 0, "refused": 0, "unchanged": 0, "updated": 0, "stale": 0}
        features_db = db.get("features")
        for item_id, e in last.items():
            key = item_id.encode()
            old = txn.get(key, db=db["items"])
            old = json.loads(old) if old is not None else None
            code = getattr(e, "code", None)
            if code is not None and len(code) != store.code_bytes:
                counts["refused"] += 1
                continue
            rec = _record(e, meta) if code is not None else None
            if old is not None and rec is not None and holds_state(txn, db, key, old, rec, gen, code, e.blob, e.feature):
                counts["unchanged"] += 1  # a record replayed into a shard that has it: no new seq, no change
                continue
            if old is not None:
                items.unlink(txn, key, old, gens)
            if code is None:  # a removal
                if old is not None:
                    for name in ("items", "blobs"):
                        txn.delete(key, db=db[name])
                    if features_db is not None:
                        txn.delete(key, db=features_db)
                    txn.put(u64(seq), key, db=db["deletes"])
                    seq += 1
                    counts["removed"] += 1
                continue
            items.link(txn, key, rec, gen, seq, code)
            txn.put(key, e.blob, db=db["blobs"])
            if features_db is not None and e.feature is not None:
                txn.put(key, e.feature, db=features_db)
            elif features_db is not None and old is not None:
                txn.delete(key, db=features_db)
            seq += 1
            counts["written"] += 1
        for u in updates.values():
            if len(u.code) not in (0, store.code_bytes) or (u.kind == "learned" and not u.code):
                counts["refused"] += 1
            elif _holds_update(txn, db, u, gen):
                counts["unchanged"] += 1
            elif items.update_in(txn, u.as_update(), gens, gen, seq) in ("applied", "quarantined"):
                seq += u.kind == "learned"
                counts["updated"] += 1
            else:
                counts["stale"] += 1
        if items.feature_spec and not meta.get("features") and any(getattr(e, "feature", None) for e in last.values()):
            env.put_meta(txn, {"features": items.feature_spec})  # as a write's first feature does: readers shape them by it
        store.offset_map.put(txn, offsets)
        txn.put(b"next_seq", json.dumps(seq).encode(), db=db["meta"])
        if meta.get("generation_model") is not None and counts["written"]:
            txn.delete(b"generation_model", db=db["meta"])
        return counts

    return env.write(txn_fn)


def _holds_update(txn, db, u, gen: int) -> bool:
    """Whether the item already carries this update: a record replayed into a shard that has it takes no new seq."""
    raw = txn.get(u.id.encode(), db=db["items"])
    rec = json.loads(raw) if raw is not None else None
    if rec is None or not u.as_update().matches(rec):
        return False
    if u.kind == "quarantine":
        return bool(rec.get("quarantined"))
    return bool(rec.get("learned")) and rec.get("learned_by") == u.learned_by and \
        txn.get(u64(gen) + u.id.encode(), db=db["codes"]) == u.code


def _record(e, meta: dict) -> dict:
    rec = {"labels": list(e.labels) if e.labels is not None else None, "ts": e.ts, "shard": meta["shard"],
           "ctype": e.ctype, "model": e.model}
    if e.learned:
        rec.update(learned=True, recoded=True)
        if e.learned_by is not None:
            rec["learned_by"] = e.learned_by
    if e.quarantined:
        rec["quarantined"] = True
    return rec


def set_flags(store, **flags: bool) -> None:
    """Meta flags read by the query side: ``restoring`` (partial), ``fenced`` (never served)."""
    store._env.write(lambda txn: store._env.put_meta(txn, {k: bool(v) for k, v in flags.items()}))


def read_flags(meta: dict) -> tuple[bool, bool]:
    """(restoring, fenced) of a shard's meta."""
    return bool(meta.get("restoring")), bool(meta.get("fenced"))
