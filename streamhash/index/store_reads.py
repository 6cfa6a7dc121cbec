"""Reads of the LMDB store that the query side's live index needs, as functions of a :class:`Store`.

They let :class:`~streamhash.index.live.LiveIndex` hold no per-item Python object: item ids and
labels are read back from the store for the few hits of a query instead of living in dicts.
Candidates to become :class:`Store` methods; each reads from one MVCC snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np

from streamhash.index.store import Store, from_u64, u64

OnChunk = Callable[[np.ndarray, np.ndarray, list], None]


def read_generation(store: Store, on_chunk: OnChunk, chunk: int = 65536) -> tuple[int, int, int]:
    """Every live item of the current generation in seq order, handed to ``on_chunk(seqs, codes, ids)``
    (int64 (m,), uint8 (m, bits/8), list of m ids) a chunk at a time.

    Unlike :meth:`Store.snapshot` no per-item Python object outlives its chunk (a million ids and
    label tuples held at once left the process ~150 MB larger). Returns (generation, model version,
    last seq, 0 when empty).
    """

    def read(txn):
        meta = store.read_meta(txn)
        gen_prefix = u64(int(meta["generation"]))
        seqs, codes, ids, last = [], [], [], 0

        def flush():
            if seqs:
                arr = np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), store.code_bytes)
                on_chunk(np.array(seqs, np.int64), arr, list(ids))
                seqs.clear(), codes.clear(), ids.clear()

        for k, key in txn.cursor(db=store.db["changes"]):
            last = from_u64(k)
            seqs.append(last)
            codes.append(txn.get(gen_prefix + key, db=store.db["codes"]))
            ids.append(key.decode())
            if len(seqs) >= chunk:
                flush()
        flush()
        return int(meta["generation"]), int(meta["model_version"]), last

    return store._read(read)


def _labels(raw: bytes) -> tuple[int, ...] | None:
    labels = json.loads(raw)["labels"]
    return tuple(labels) if labels is not None else None


def items_at(store: Store, seqs: Sequence[int]) -> list[tuple[str, tuple[int, ...] | None] | None]:
    """(id, labels) of the item each seq belongs to now; None for a seq the store no longer holds
    (its item was written again under a newer seq)."""

    def read(txn):
        out = []
        for s in seqs:
            key = txn.get(u64(int(s)), db=store.db["changes"])
            out.append(None if key is None else (key.decode(), _labels(txn.get(key, db=store.db["items"]))))
        return out

    return store._read(read)


def labels_of(store: Store, ids: Sequence[str]) -> list[tuple[int, ...] | None]:
    """Current labels of stored items (None: unlabeled or absent)."""

    def read(txn):
        raws = (txn.get(i.encode(), db=store.db["items"]) for i in ids)
        return [None if raw is None else _labels(raw) for raw in raws]

    return store._read(read)


def ids_after(store: Store, after_seq: int) -> list[str]:
    """Ids of the items written after ``after_seq``, in seq order."""

    def read(txn):
        cur = txn.cursor(db=store.db["changes"])
        if not cur.set_range(u64(after_seq + 1)):
            return []
        return [key.decode() for _, key in cur]

    return store._read(read)


def seqs_live(store: Store, seqs: Sequence[int]) -> np.ndarray:
    """Whether each seq is still an item's current seq (bool array)."""

    def read(txn):
        db = store.db["changes"]
        return np.fromiter((txn.get(u64(int(s)), db=db) is not None for s in seqs), bool, len(seqs))

    return store._read(read)
