"""Generations: every item's code under one network, built beside the live one and swapped in atomically.

``meta.generation`` is the live generation g, the one every reader uses; ``meta.pending_generation``
is g+1 while a re-encode builds it. Writes during a build keep going to g; overwriting an item drops
its code from both (:func:`~streamhash.index.store.items.live_generations`), so g+1 learns of it by
the item's missing code and catches it up before the swap. :class:`~streamhash.index.store.builder.GenerationBuilder`
drives the whole protocol; the steps are here. As a state machine (the two meta keys, and which generations hold codes):

    live g                --begin-->                         building g+1 beside g
    building g+1          --copy, encode, catch up-->        building g+1  (learned codes and codes of the new
                                                             network copied; only stale inferred ones encoded)
    building g+1          --swap-->                          live g+1, g replaced  (one transaction: the stragglers
                                                             encoded in it; refused while any item lacks a code)
    live g+1, g replaced  --drop g-->                        live g+1
    building g+1          --failure (abandon), crash (start-up clean-up)-->  live g
    live g+1, g replaced  --crash (start-up clean-up)-->     live g+1
"""

from __future__ import annotations

import json
import logging

import numpy as np

from streamhash.codes import stale
from streamhash.errors import StoreError
from streamhash.index.store.env import Environment
from streamhash.index.store.items import Items
from streamhash.index.store.layout import from_u64, u64

log = logging.getLogger(__name__)


class Generations:
    def __init__(self, env: Environment, tables, items: Items):
        self.env, self.tables, self.items = env, tables, items

    def begin(self, gen: int | None = None) -> tuple[int, int]:
        """Open generation ``gen`` (default ``current + 1``; the learner's number when it announced one) beside
        the live one; returns (generation, seq watermark).

        Items written after the watermark are caught up by :meth:`swap`. Leftovers of an
        earlier, interrupted build of the same generation are cleared first.
        """
        meta = self.env.read_meta()
        current = int(meta["generation"])
        gen = current + 1 if gen is None else gen
        if gen <= current:
            raise StoreError(f"generation {gen} is not above the live generation {current} of {self.env.path}")
        self.drop(gen)
        self.env.write(lambda txn: self.env.put_meta(txn, {"pending_generation": gen}))
        return gen, int(meta["next_seq"]) - 1

    def put_codes(self, gen: int, ids: list[str], codes: np.ndarray, seqs=None) -> None:
        """Write codes (and their hash-table entries) of a pending generation; ids gone meanwhile are skipped.

        ``seqs``: the seq each id had when its image was read. An item written again since then is
        skipped: its code came from the image it replaced, and leaving it missing makes the catch-up
        encode the new one.
        """
        self.env.write(lambda txn: self._put_codes(txn, gen, ids, codes, seqs))

    def _put_codes(self, txn, gen: int, ids: list[str], codes: np.ndarray, seqs=None) -> None:
        db = self.env.db
        for k, (item_id, code) in enumerate(zip(ids, np.asarray(codes, np.uint8))):
            key = item_id.encode()
            raw = txn.get(key, db=db["items"])
            if raw is None:
                continue
            seq = json.loads(raw)["seq"]
            if seqs is not None and seq != seqs[k]:
                continue
            self._put_code(txn, gen, key, seq, code.tobytes())

    def _put_code(self, txn, gen: int, key: bytes, seq: int, code: bytes) -> None:
        db, prefix = self.env.db, u64(gen)
        old = txn.get(prefix + key, db=db["codes"])
        if old is not None:
            self.tables.remove(txn, db["tables"], gen, seq, old)
        txn.put(prefix + key, code, db=db["codes"])
        self.tables.add(txn, db["tables"], gen, seq, code)

    def copy_current(self, gen: int, ids: list[str], model_version: int) -> tuple[int, list[tuple[str, int]]]:
        """Copy into ``gen`` the live code of each item it may keep; return how many, and (id, seq) of those to encode.

        An item keeps its code when it was learned (DCC codes are frozen: a re-encode would undo what the
        labels taught) or inferred by ``model_version`` already; the rest, inferred by an older network
        (or by none recorded), are stale. Decided per item inside the transaction that copies, so an
        item written again meanwhile is judged by what it is now.
        """
        return self.env.write(lambda txn: self._copy_current(txn, gen, ids, model_version))

    def _copy_current(self, txn, gen: int, ids, model_version: int) -> tuple[int, list[tuple[str, int]]]:
        db, to_encode, copied = self.env.db, [], 0
        live = u64(int(self.env.read_meta(txn)["generation"]))
        for item_id in ids:
            key = item_id.encode()
            raw = txn.get(key, db=db["items"])
            if raw is None:
                continue
            rec = json.loads(raw)
            code = txn.get(live + key, db=db["codes"])
            made_by = -1 if rec.get("model") is None else rec["model"]
            if code is not None and not stale(bool(rec.get("learned")), made_by, model_version):
                self._put_code(txn, gen, key, rec["seq"], code)
                copied += 1
            else:
                to_encode.append((item_id, rec["seq"]))
        return copied, to_encode

    def provenance(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every live item's (ids, learned, model) in seq order, from one snapshot: learned (bool) marks a
        DCC code, model (int64) the network version that inferred the code otherwise (-1: none recorded)."""

        def read(txn):
            ids, learned, model = [], [], []
            for _, key in txn.cursor(db=self.env.db["changes"]):
                rec = json.loads(txn.get(key, db=self.env.db["items"]))
                ids.append(key.decode())
                learned.append(bool(rec.get("learned")))
                model.append(-1 if rec.get("model") is None else int(rec["model"]))
            return ids, np.array(learned, bool), np.array(model, np.int64)

        return self.env.read(read)

    def mark_reencoded(self, txn, ids, model_version: int) -> None:
        """Record ``model_version`` as the network that inferred these items' codes (in the swap: the
        records must name the network of the live generation, not of one still being built)."""
        db = self.env.db["items"]
        for item_id in ids:
            raw = txn.get(item_id.encode(), db=db)
            if raw is not None:
                rec = json.loads(raw)
                if not rec.get("learned") and rec.get("model") != model_version:
                    rec["model"] = model_version  # seq kept: not a change followers replay
                    txn.put(item_id.encode(), json.dumps(rec).encode(), db=db)

    def ids_missing(self, gen: int, after_seq: int = 0) -> list[str]:
        """Ids written after ``after_seq`` that have no code in generation ``gen`` yet."""
        return self.env.read(lambda txn: self._ids_missing(txn, gen, after_seq))

    def _ids_missing(self, txn, gen: int, after_seq: int) -> list[str]:
        cur, prefix, out = txn.cursor(db=self.env.db["changes"]), u64(gen), []
        if cur.set_range(u64(after_seq + 1)):
            for _, key in cur:
                if txn.get(prefix + key, db=self.env.db["codes"]) is None:
                    out.append(key.decode())
        return out

    def swap(self, gen: int, model_version: int, ids: list[str], codes: np.ndarray, *,
             after_seq: int = 0, encode_blobs=None, reencoded: list[str] | None = None) -> int:
        """Write the last codes of ``gen`` and make it current with ``model_version``, in one transaction.

        Items written after ``after_seq`` that still lack a code in ``gen`` (the ingest path kept
        writing while the caller caught up) get theirs inside the transaction: copied when learned or
        already inferred by ``model_version``, else encoded by
        ``encode_blobs([(blob, content_type), ...]) -> codes`` when given: ingestion waits for that
        short step instead of the catch-up chasing it forever. Without it, or if an older item lacks a
        code, StoreError: readers switch to a complete generation or not at all.

        ``reencoded``: the ids the caller encoded for ``gen`` (``ids`` included, or not: both are marked);
        their records name ``model_version`` from this transaction on, and the stragglers encoded here
        are appended to the list. Returns the generation that was replaced.
        """

        def txn_fn(txn):
            meta = self.env.read_meta(txn)
            if meta.get("pending_generation") != gen:
                raise StoreError(f"generation {gen} is not being built (pending: {meta.get('pending_generation')})")
            self._put_codes(txn, gen, ids, codes)
            late = [i for i, _ in self._copy_current(txn, gen, self._ids_missing(txn, gen, after_seq), model_version)[1]]
            if late and encode_blobs is not None:
                self._put_codes(txn, gen, late, encode_blobs([self.items.blob_in(txn, k.encode()) for k in late]))
            missing = self._ids_missing(txn, gen, 0)
            if missing:
                raise StoreError(f"item {missing[0]!r} has no code in generation {gen}; catch it up first")
            self.mark_reencoded(txn, [*ids, *(reencoded or ()), *late], model_version)
            self.env.put_meta(txn, {"generation": gen, "model_version": model_version, "pending_generation": None})
            return int(meta["generation"]), late

        replaced, late = self.env.write(txn_fn)
        if reencoded is not None:
            reencoded.extend(late)
        return replaced

    def drop(self, gen: int, chunk: int = 10_000) -> int:
        """Delete every code and table entry of ``gen`` (a replaced or abandoned one), in bounded transactions."""
        prefix, dropped = u64(gen), 0
        for db in (self.env.db["codes"], self.env.db["tables"]):
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

                n = self.env.write(txn_fn)
                dropped += n
                if n < chunk:
                    break
        return dropped

    def abandon(self, gen: int) -> int:
        """Drop a pending generation that will not be swapped in, and stop building it; returns entries dropped."""
        dropped = self.drop(gen)

        def txn_fn(txn):
            if self.env.read_meta(txn).get("pending_generation") == gen:
                self.env.put_meta(txn, {"pending_generation": None})

        self.env.write(txn_fn)
        return dropped

    def clean_up_after_crash(self) -> int | None:
        """At start-up: drop a generation a re-encode left half built (returned), and what remains of one
        it swapped out but had not dropped yet."""
        meta = self.env.read_meta()
        for old in self._replaced(int(meta["generation"])):
            log.warning("dropped generation %d, replaced before a crash (%d entries)", old, self.drop(old))
        gen = meta.get("pending_generation")
        if not gen:
            return None
        log.warning("dropped generation %d left half built by an interrupted re-encode (%d entries)", gen, self.abandon(gen))
        return int(gen)

    def _replaced(self, live: int) -> list[int]:
        """Generations below ``live`` that still hold codes or table rows (keys start with the generation)."""

        def read(txn):
            found = set()
            for name in ("codes", "tables"):
                cur = txn.cursor(db=self.env.db[name])
                ok = cur.first()
                while ok and (g := from_u64(cur.key()[:8])) < live:
                    found.add(g)
                    ok = cur.set_range(u64(g + 1))  # skip to the next generation's first key
            return sorted(found)

        return self.env.read(read)
