"""Generations: every item's code under one network, built beside the live one and swapped in atomically.

``meta.generation`` is the live generation g, the one every reader uses; ``meta.pending_generation``
is g+1 while a re-encode builds it. Writes during a build keep going to g; overwriting an item drops
its code from both (:func:`~streamhash.index.store.items.live_generations`), so g+1 learns of it by
the item's missing code and catches it up before the swap. The learner's re-encode drives the
whole protocol; the steps are here.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from streamhash.errors import StoreError
from streamhash.index.store.env import Environment
from streamhash.index.store.items import Items
from streamhash.index.store.layout import u64

log = logging.getLogger(__name__)


class Generations:
    def __init__(self, env: Environment, tables, items: Items):
        self.env, self.tables, self.items = env, tables, items

    def begin(self) -> tuple[int, int]:
        """Open generation ``current + 1`` beside the live one; returns (generation, seq watermark).

        Items written after the watermark are caught up by :meth:`swap`. Leftovers of an
        earlier, interrupted build of the same generation are cleared first.
        """
        meta = self.env.read_meta()
        gen = int(meta["generation"]) + 1
        self.drop(gen)
        self.env.write(lambda txn: self.env.put_meta(txn, {"pending_generation": gen}))
        return gen, int(meta["next_seq"]) - 1

    def put_codes(self, gen: int, ids: list[str], codes: np.ndarray) -> None:
        """Write codes (and their hash-table entries) of a pending generation; ids gone meanwhile are skipped."""
        self.env.write(lambda txn: self._put_codes(txn, gen, ids, codes))

    def _put_codes(self, txn, gen: int, ids: list[str], codes: np.ndarray) -> None:
        db, prefix = self.env.db, u64(gen)
        for item_id, code in zip(ids, np.asarray(codes, np.uint8)):
            key = item_id.encode()
            raw = txn.get(key, db=db["items"])
            if raw is None:
                continue
            seq = json.loads(raw)["seq"]
            old = txn.get(prefix + key, db=db["codes"])
            if old is not None:
                self.tables.remove(txn, db["tables"], gen, seq, old)
            txn.put(prefix + key, code.tobytes(), db=db["codes"])
            self.tables.add(txn, db["tables"], gen, seq, code.tobytes())

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
            meta = self.env.read_meta(txn)
            if meta.get("pending_generation") != gen:
                raise StoreError(f"generation {gen} is not being built (pending: {meta.get('pending_generation')})")
            self._put_codes(txn, gen, ids, codes)
            late = self._ids_missing(txn, gen, after_seq)
            if late and encode_blobs is not None:
                self._put_codes(txn, gen, late, encode_blobs([self.items.blob_in(txn, k.encode()) for k in late]))
            missing = self._ids_missing(txn, gen, 0)
            if missing:
                raise StoreError(f"item {missing[0]!r} has no code in generation {gen}; catch it up first")
            self.env.put_meta(txn, {"generation": gen, "model_version": model_version, "pending_generation": None})
            return int(meta["generation"])

        return self.env.write(txn_fn)

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

    def abandon_pending(self) -> int | None:
        """Drop a generation a crashed re-encode left half built (its codes and table rows); return it."""
        gen = self.env.read_meta().get("pending_generation")
        if not gen:
            return None
        dropped = self.drop(int(gen))
        self.env.write(lambda txn: self.env.put_meta(txn, {"pending_generation": None}))
        log.warning("dropped generation %d left half built by an interrupted re-encode (%d entries)", gen, dropped)
        return int(gen)
