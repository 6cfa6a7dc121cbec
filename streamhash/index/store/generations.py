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

Every step runs in short background transactions (:meth:`Environment.write`'s ``background``) that an
ingest commit of the same shard waits for at most one of: codes are copied and written ``txn_items``
items a transaction and dropped ``TXN_KEYS_DROPPED`` keys a transaction, and the swap does work in
proportion to the items written since the builder's last catch-up, not to the shard:
``meta.pending_codes`` counts the items holding a code in the generation being built (kept by every
write that adds or removes one), so the swap proves the generation complete by comparing two numbers,
and item records are not rewritten to name the new network (``meta.generation_model`` does,
:func:`~streamhash.index.store.items.inferred_by`).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from streamhash.codes import stale
from streamhash.errors import StoreError
from streamhash.index.store.env import Environment
from streamhash.index.store.items import Items, count_pending_codes, inferred_by
from streamhash.index.store.layout import from_u64, u64

log = logging.getLogger(__name__)

# Items a re-encode copies or writes in one transaction: ~13 ms a transaction here, half of it the commit
# writing the pages those codes touched (2,048 took 46 ms; both measured while each code also wrote
# hash-table rows, schema 1). An ingest commit of the shard waits for at most one such transaction.
TXN_ITEMS = 256
# Keys a drop deletes in one transaction: ~1 us each, so the commit (~2 ms) dominates up to this many.
TXN_KEYS_DROPPED = 2048


class Generations:
    def __init__(self, env: Environment, items: Items, *, txn_items: int = TXN_ITEMS):
        self.env, self.items, self.txn_items = env, items, txn_items

    def _write(self, fn):
        return self.env.write(fn, background=True)  # never ahead of an ingest commit waiting for the writer

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
        self._write(lambda txn: self.env.put_meta(txn, {"pending_generation": gen, "pending_codes": 0}))
        return gen, int(meta["next_seq"]) - 1

    def put_codes(self, gen: int, ids: list[str], codes: np.ndarray, seqs=None) -> None:
        """Write codes of a pending generation; ids gone meanwhile are skipped.

        ``seqs``: the seq each id had when its image was read. An item written again since then is
        skipped: its code came from the image it replaced, and leaving it missing makes the catch-up
        encode the new one.
        """
        codes = np.asarray(codes, np.uint8)
        for i in range(0, len(ids), self.txn_items):
            part = slice(i, i + self.txn_items)
            self._write(lambda txn: self._put_codes(txn, gen, ids[part], codes[part], None if seqs is None else seqs[part]))

    def _put_codes(self, txn, gen: int, ids: list[str], codes: np.ndarray, seqs=None) -> None:
        db, added = self.env.db, 0
        for k, (item_id, code) in enumerate(zip(ids, np.asarray(codes, np.uint8))):
            key = item_id.encode()
            raw = txn.get(key, db=db["items"])
            if raw is None:
                continue
            seq = json.loads(raw)["seq"]
            if seqs is not None and seq != seqs[k]:
                continue
            added += self._put_code(txn, gen, key, code.tobytes())
        count_pending_codes(self.env, txn, added)

    def _put_code(self, txn, gen: int, key: bytes, code: bytes) -> int:
        """Write one code into ``gen``; returns 1 if the item held none there yet (the caller counts it)."""
        return int(txn.replace(u64(gen) + key, code, db=self.env.db["codes"]) is None)

    def copy_current(self, gen: int, ids: list[str], model_version: int) -> tuple[int, list[tuple[str, int]]]:
        """Copy into ``gen`` the live code of each item it may keep; return how many, and (id, seq) of those to encode.

        An item keeps its code when it was learned (DCC codes are frozen: a re-encode would undo what the
        labels taught) or inferred by ``model_version`` already; the rest, inferred by an older network
        (or by none recorded), are stale. Decided per item inside the transaction that copies, so an
        item written again meanwhile is judged by what it is now.
        """
        copied, to_encode = 0, []
        for i in range(0, len(ids), self.txn_items):
            n, stale_part = self._write(lambda txn: self._copy_current(txn, gen, ids[i:i + self.txn_items], model_version))
            copied += n
            to_encode += stale_part
        return copied, to_encode

    def _copy_current(self, txn, gen: int, ids, model_version: int) -> tuple[int, list[tuple[str, int]]]:
        db, to_encode, copied, added = self.env.db, [], 0, 0
        meta = self.env.read_meta(txn)
        live = u64(int(meta["generation"]))
        for item_id in ids:
            key = item_id.encode()
            raw = txn.get(key, db=db["items"])
            if raw is None:
                continue
            rec = json.loads(raw)
            code = txn.get(live + key, db=db["codes"])
            if code is not None and not stale(bool(rec.get("learned")), inferred_by(rec, meta), model_version):
                added += self._put_code(txn, gen, key, code)
                copied += 1
            else:
                to_encode.append((item_id, rec["seq"]))
        count_pending_codes(self.env, txn, added)
        return copied, to_encode

    def provenance(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Every live item's (ids, learned, model) in arrival order, from one snapshot: learned (bool) marks a
        DCC code, model (int64) the network version that inferred the code otherwise (-1: none recorded)."""

        def read(txn):
            ids, learned, model, meta = [], [], [], self.env.read_meta(txn)
            for _, key in txn.cursor(db=self.env.db["changes"]):
                rec = json.loads(txn.get(key, db=self.env.db["items"]))
                ids.append(key.decode())
                learned.append(bool(rec.get("learned")))
                model.append(inferred_by(rec, meta))
            return ids, np.array(learned, bool), np.array(model, np.int64)

        return self.env.read(read)

    def ids_missing(self, gen: int, after_seq: int = 0) -> tuple[list[str], int]:
        """Ids written after ``after_seq`` (arrived, or given a learned code) that have no code in generation ``gen``
        yet, and the last seq read (``after_seq`` if none): once these have theirs, only items written after it can
        lack one."""
        return self.env.read(lambda txn: self._ids_missing(txn, gen, after_seq))

    def _ids_missing(self, txn, gen: int, after_seq: int) -> tuple[list[str], int]:
        prefix, out, last = u64(gen), {}, after_seq
        for db in (self.env.db["changes"], self.env.db["recodes"]):
            cur = txn.cursor(db=db)
            if cur.set_range(u64(after_seq + 1)):
                for k, key in cur:
                    last = max(last, from_u64(k))
                    if txn.get(prefix + key, db=self.env.db["codes"]) is None:
                        out[key.decode()] = None
        return list(out), last

    def swap(self, gen: int, model_version: int, ids: list[str], codes: np.ndarray, *,
             after_seq: int = 0, encode_blobs=None, encode_features=None, reencoded: list[str] | None = None) -> int:
        """Write the last codes of ``gen`` and make it current with ``model_version``, in one transaction.

        Items written after ``after_seq`` that still lack a code in ``gen`` (the ingest path kept
        writing while the caller caught up) get theirs inside the transaction: copied when learned or
        already inferred by ``model_version``, else encoded by
        ``encode_blobs([(blob, content_type), ...]) -> codes`` when given: ingestion waits for that
        short step instead of the catch-up chasing it forever. ``encode_features(stored features) -> codes``,
        when given, encodes them from their stored features instead, if every one of them has one. Without it, or if an older item lacks a
        code, StoreError: readers switch to a complete generation or not at all.

        The transaction reads the items written after ``after_seq``, no others: a builder passes the
        last seq its catch-up read. ``reencoded``: the stragglers encoded here are appended to it.
        Returns the generation that was replaced.
        """

        def txn_fn(txn):
            meta = self.env.read_meta(txn)
            if meta.get("pending_generation") != gen:
                raise StoreError(f"generation {gen} is not being built (pending: {meta.get('pending_generation')})")
            self._put_codes(txn, gen, ids, codes)
            late = [i for i, _ in self._copy_current(txn, gen, self._ids_missing(txn, gen, after_seq)[0], model_version)[1]]
            if late:
                self._encode_late(txn, gen, late, encode_blobs, encode_features)
            holding, items = self.env.read_meta(txn)["pending_codes"], txn.stat(self.env.db["items"])["entries"]
            if holding != items:
                missing = self._ids_missing(txn, gen, 0)[0]  # a scan, but only to name the gap in the error
                gap = f"item {missing[0]!r} has" if missing else f"{items - holding} items have"
                raise StoreError(f"{gap} no code in generation {gen}; catch it up first")
            self.env.put_meta(txn, {"generation": gen, "model_version": model_version, "generation_model": model_version,
                                    "pending_generation": None, "pending_codes": None})
            return int(meta["generation"]), late

        replaced, late = self._write(txn_fn)
        if reencoded is not None:
            reencoded.extend(late)
        return replaced

    def _encode_late(self, txn, gen: int, late: list[str], encode_blobs, encode_features) -> None:
        keys = [k.encode() for k in late]
        feats = self.items.features_in(txn, keys) if encode_features is not None else [None]
        if all(f is not None for f in feats):
            self._put_codes(txn, gen, late, encode_features(np.stack(feats)))
        elif encode_blobs is not None:
            self._put_codes(txn, gen, late, encode_blobs([self.items.blob_in(txn, k) for k in keys]))

    def drop(self, gen: int, chunk: int = TXN_KEYS_DROPPED) -> int:
        """Delete every code of ``gen`` (a replaced or abandoned one), at most ``chunk`` keys a transaction."""
        prefix, dropped, db = u64(gen), 0, self.env.db["codes"]

        def txn_fn(txn):
            cur, n = txn.cursor(db=db), 0
            if not cur.set_range(prefix):
                return 0
            while n < chunk and cur.key().startswith(prefix):
                if not cur.delete():
                    break
                n += 1
            return n

        while True:
            n = self._write(txn_fn)
            dropped += n
            if n < chunk:
                return dropped

    def abandon(self, gen: int) -> int:
        """Drop a pending generation that will not be swapped in, and stop building it; returns entries dropped."""
        dropped = self.drop(gen)

        def txn_fn(txn):
            if self.env.read_meta(txn).get("pending_generation") == gen:
                self.env.put_meta(txn, {"pending_generation": None})

        self._write(txn_fn)
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
        """Generations below ``live`` that still hold codes (keys start with the generation)."""

        def read(txn):
            found, cur = [], txn.cursor(db=self.env.db["codes"])
            ok = cur.first()
            while ok and (g := from_u64(cur.key()[:8])) < live:
                found.append(g)
                ok = cur.set_range(u64(g + 1))  # skip to the next generation's first key
            return found

        return self.env.read(read)
