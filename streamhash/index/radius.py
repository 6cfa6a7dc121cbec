"""Radius search over one generation: the multi-index tables composed over the flat in-memory index.

Like FAISS's ``IndexBinaryMultiHash`` over its flat storage, :class:`RadiusIndex` answers
``range_search`` either by probing the multi-index hash tables (:mod:`.multihash`) for candidates
and verifying them against the flat index's codes, or by a flat scan of that index, whichever
:func:`~streamhash.index.multihash.choose_radius_strategy` expects to be cheaper. Both give the
flat index's answer: codes at distance strictly below ``radius``, sorted by (distance, id), the
ids being the store's seqs, which increase with insertion.

The tables live in LMDB beside the codes; the index reaches them through a ``candidates(generation,
queries, radius)`` callable returning ``(lims, seqs)``, or None when the tables cannot answer for
that generation (a re-encode replaced it, and its tables may be gone): then it scans.
:meth:`Store.table_candidates <streamhash.index.store.Store.table_candidates>` is that callable.

>>> import numpy as np
>>> from streamhash.index.backends import make_index
>>> flat = make_index(16, "numpy")
>>> flat.add_with_ids(np.array([[0, 0], [0, 3], [255, 255], [0, 1]], np.uint8), np.array([1, 2, 3, 4]))
>>> index = RadiusIndex(flat, lambda gen, q, radius: None, generation=1, m=2)
>>> [x.tolist() for x in index.range_search(np.array([[0, 0]], np.uint8), radius=3)]
[[0, 3], [0, 1, 2], [1, 4, 2]]
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from streamhash.index.hamming import BinaryIndex
from streamhash.index.multihash import choose_radius_strategy, verify

Candidates = Callable[[int, np.ndarray, int], "tuple[np.ndarray, np.ndarray] | None"]


class RadiusIndex:
    """``range_search`` by tables or flat scan over ``flat``, the generation's in-memory codes; ``search``
    is the flat index's. ``m`` is the tables' substring count, for the cost model."""

    def __init__(self, flat: BinaryIndex, candidates: Candidates, *, generation: int, m: int):
        self.flat, self.candidates = flat, candidates
        self.generation, self.m = generation, m

    @classmethod
    def over_store(cls, flat: BinaryIndex, store, generation: int) -> RadiusIndex:
        """``flat``, a generation of ``store``, composed with that store's tables (``Store.table_candidates``)."""
        return cls(flat, store.table_candidates, generation=generation, m=store.tables.m)

    @property
    def d(self) -> int:
        return self.flat.d

    @property
    def ntotal(self) -> int:
        return self.flat.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.flat.search(queries, k)

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes at distance < radius: (lims int64 (nq+1,), D int32, I int64), query i in [lims[i], lims[i+1])."""
        queries, radius = np.asarray(queries), int(radius)
        if queries.dtype != np.uint8 or queries.ndim != 2 or queries.shape[1] != self.flat.code_size:
            # the flat index checks its own input, but the tables path would reshape a wrong one silently
            raise ValueError(f"queries must be uint8 of shape (n, {self.flat.code_size}), got {queries.dtype} {queries.shape}")
        strategy = choose_radius_strategy(self.flat.ntotal, self.d, self.m, radius, backend=self.flat.backend)
        if strategy == "tables":
            found = self.candidates(self.generation, queries, radius)
            if found is not None:
                return self._verified(queries, *found, radius)
        return self.flat.range_search(queries, radius)

    def _verified(self, queries: np.ndarray, lims: np.ndarray, seqs: np.ndarray, radius: int):
        # Codes come from the flat index: a candidate it does not hold yet is not visible yet.
        codes, held = self.flat.reconstruct_batch(seqs)
        owner = np.repeat(np.arange(len(queries)), np.diff(lims))
        lims = np.zeros(len(queries) + 1, np.int64)
        np.cumsum(np.bincount(owner[held], minlength=len(queries)), out=lims[1:])
        return verify(queries, lims, seqs[held], codes[held], radius)
