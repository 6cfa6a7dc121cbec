"""Generations: every item's code under one network, built beside the live one and swapped in atomically.

``meta.generation`` is the live generation g, the one every reader uses; ``meta.pending_generation``
is g+1 while a re-encode builds it. Writes during a build keep going to g; overwriting an item drops
its code from both (:func:`~streamhash.index.store.items.live_generations`), so g+1 learns of it by
the item's missing code and catches it up before the swap. :class:`GenerationBuilder` drives the
whole protocol; the steps are here. As a state machine (the two meta keys, and which generations hold codes):

    live g                --begin-->                         building g+1 beside g
    building g+1          --put codes, catch up-->           building g+1
    building g+1          --swap-->                          live g+1, g replaced  (one transaction: the stragglers
                                                             encoded in it; refused while any item lacks a code)
    live g+1, g replaced  --drop g-->                        live g+1
    building g+1          --failure (abandon), crash (start-up clean-up)-->  live g
    live g+1, g replaced  --crash (start-up clean-up)-->     live g+1
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

import numpy as np

from streamhash.errors import StoreError
from streamhash.index.store.env import Environment
from streamhash.index.store.items import Items
from streamhash.index.store.layout import from_u64, u64

if TYPE_CHECKING:
    from streamhash.index.store import Store

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


class GenerationBuilder:
    """One re-encode of a writable store: begin → put → catch up → swap → drop.

    ``encode_ids(ids) -> codes`` encodes stored items by id, a chunk at a time, outside any transaction;
    ``encode_blobs([(blob, content_type), ...]) -> codes`` encodes the few items ingested after the last
    catch-up inside the swap transaction (None: the swap refuses them, and nothing is swapped).

    A build that fails drops what it wrote. One a crash interrupted is dropped at start-up
    (:meth:`Generations.clean_up_after_crash`), not resumed: its network never became current and
    the restarted learner goes on from the current one, so finishing it would swap in codes of a
    network nobody holds. The next re-encode starts over.
    """

    def __init__(self, store: Store, *, encode_ids, encode_blobs=None, chunk: int = 2048, catch_up_rounds: int = 3):
        self.store, self.encode_ids, self.encode_blobs = store, encode_ids, encode_blobs
        self.chunk, self.catch_up_rounds = chunk, catch_up_rounds
        self.replaced: int | None = None  # swapped out, kept until drop_replaced: readers may still be on it

    def build(self, model_version: int) -> int:
        """Build the next generation from every stored item and make it live with ``model_version``; returns it."""
        gens = self.store.generations
        gen, watermark = gens.begin()
        try:
            ids = self.store.ids_after(0)
            for i in range(0, len(ids), self.chunk):
                self._put(gen, ids[i:i + self.chunk])
            for _ in range(self.catch_up_rounds):  # items ingested while building; the window shrinks each time
                missing = gens.ids_missing(gen, watermark)
                if not missing:
                    break
                self._put(gen, missing)
            no_codes = np.zeros((0, self.store.code_bytes), np.uint8)
            self.replaced = gens.swap(gen, model_version, [], no_codes, after_seq=watermark, encode_blobs=self.encode_blobs)
        except Exception:
            gens.abandon(gen)
            raise
        return gen

    def _put(self, gen: int, ids: list[str]) -> None:
        self.store.generations.put_codes(gen, ids, self.encode_ids(ids))

    def drop_replaced(self) -> int:
        """Drop the generation the swap replaced (once the ingest path encodes for the new one); returns entries dropped."""
        dropped, self.replaced = self.store.generations.drop(self.replaced), None
        return dropped
