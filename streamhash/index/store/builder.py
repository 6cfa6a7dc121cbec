"""One re-encode of a writable store, selective: only the codes a newer network would change are encoded.

DIHN freezes learned codes (the network is trained against them), and a code the new network inferred
already is what encoding again would give; so the next generation copies both and decodes and encodes
only the stale inferred items, the ones older networks produced. The protocol's steps are in
:mod:`.generations`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from streamhash.index.store import Store


class GenerationBuilder:
    """One re-encode of a writable store: begin → copy or encode → catch up → swap → drop.

    ``encode_ids(ids) -> codes`` encodes stored items by id, a chunk at a time, outside any transaction;
    ``encode_blobs([(blob, content_type), ...]) -> codes`` encodes the few stale items ingested after the
    last catch-up inside the swap transaction (None: the swap refuses them, and nothing is swapped);
    ``encode_features(features) -> codes`` encodes those from their stored features instead, where every one has one.
    After :meth:`build`, ``images_reencoded`` counts the images decoded and encoded, ``codes_copied`` the
    codes kept (the swap's stragglers copied in its transaction are not counted).

    ``pause()`` runs before each step (a transaction's worth of items copied or written, a chunk encoded, the
    swap): the caller's way to let more urgent work in the same process go first. A step holds the GIL
    for most of its time (JSON records, PNG decoding), so steps run back to back slow every other Python
    thread of the process (applying learned codes took ~1.5x as long beside them).

    A build that fails drops what it wrote. One a crash interrupted is dropped at start-up
    (:meth:`Generations.clean_up_after_crash`), not resumed: its network never became current and
    the restarted learner goes on from the current one, so finishing it would swap in codes of a
    network nobody holds. The next re-encode starts over.
    """

    def __init__(self, store: Store, *, encode_ids, encode_blobs=None, encode_features=None, chunk: int = 2048,
                 catch_up_rounds: int = 3, pause=lambda: None):
        self.store, self.encode_ids, self.encode_blobs = store, encode_ids, encode_blobs
        self.encode_features = encode_features
        self.chunk, self.catch_up_rounds, self.pause = chunk, catch_up_rounds, pause
        self.replaced: int | None = None  # swapped out, kept until drop_replaced: readers may still be on it
        self.images_reencoded = self.codes_copied = 0

    def build(self, model_version: int, generation: int | None = None) -> int:
        """Build ``generation`` (default: the next) from every stored item and make it live with ``model_version``;
        returns it."""
        gens = self.store.generations
        gen, watermark = gens.begin(generation)
        self.images_reencoded = self.codes_copied = 0
        encoded: list[str] = []
        try:
            ids, stale = self.store.ids_after(0), []
            for i in range(0, len(ids), self.chunk):
                self._fill(gen, ids[i:i + self.chunk], model_version, encoded, stale)
            self._encode(gen, stale, encoded, whole=True)
            for _ in range(self.catch_up_rounds):  # items ingested while building; the window shrinks each time
                missing, read_to = gens.ids_missing(gen, watermark)
                self._fill(gen, missing, model_version, encoded, stale)
                self._encode(gen, stale, encoded, whole=True)
                watermark = read_to  # what was read has its code now: the next reads (the swap's too) start after it
                if not missing:
                    break
            no_codes = np.zeros((0, self.store.code_bytes), np.uint8)
            before = len(encoded)
            self.pause()
            self.replaced = gens.swap(gen, model_version, [], no_codes, after_seq=watermark,
                                      encode_blobs=self.encode_blobs, encode_features=self.encode_features,
                                      reencoded=encoded)
            self.images_reencoded += len(encoded) - before
        except Exception:
            gens.abandon(gen)
            raise
        return gen

    def _fill(self, gen: int, ids: list[str], model_version: int, encoded: list[str], stale: list) -> None:
        """Copy the codes ``gen`` keeps; the (id, seq) of the stale ones join ``stale``, encoded a whole chunk at a time
        (learned codes sit among them in arrival order)."""
        gens, step = self.store.generations, self.store.generations.txn_items
        for i in range(0, len(ids), step):
            self.pause()
            copied, part = gens.copy_current(gen, ids[i:i + step], model_version)
            self.codes_copied += copied
            stale += part
        self._encode(gen, stale, encoded, whole=False)

    def _encode(self, gen: int, stale: list, encoded: list[str], *, whole: bool) -> None:
        """Encode and write ``stale`` in chunks, leaving the last part short of a chunk unless ``whole``."""
        step = self.store.generations.txn_items
        while len(stale) >= (1 if whole else self.chunk):
            part, stale[:] = stale[:self.chunk], stale[self.chunk:]
            stale_ids = [item_id for item_id, _ in part]
            self.pause()
            codes = self.encode_ids(stale_ids)
            for j in range(0, len(part), step):
                self.pause()
                self.store.generations.put_codes(gen, stale_ids[j:j + step], codes[j:j + step],
                                                 seqs=[seq for _, seq in part[j:j + step]])
            self.images_reencoded += len(part)
            encoded.extend(stale_ids)

    def drop_replaced(self) -> int:
        """Drop the generation the swap replaced (once the ingest path encodes for the new one); returns entries dropped."""
        dropped, self.replaced = self.store.generations.drop(self.replaced), None
        return dropped
