"""Radius search over one generation: in-memory multi-index hash tables composed over the flat index.

Like FAISS's ``IndexBinaryMultiHash`` over its flat storage, :class:`RadiusIndex` answers
``range_search`` either by probing multi-index hash tables for candidates and verifying them
against the flat index's codes, or by a flat scan of that index, whichever
:func:`~streamhash.index.multihash.choose_radius_strategy` expects to be cheaper. Both give the
flat index's answer: codes at distance strictly below ``radius``, sorted by (distance, insertion
order), i.e. by (distance, id) for the store's seqs, which increase with insertion.

The tables are :class:`~streamhash.index.memhash.MemHash`, in memory over the flat index's rows
(one per flat index, made on first use, kept in step with its adds and removes; see that module).
Until they are first built (in the background, after the first radius query over a generation)
the flat scan answers. Their substrings and probe radii are :mod:`.multihash`'s arithmetic.

>>> import numpy as np
>>> from streamhash.index.backends import make_index
>>> flat = make_index(16, "numpy")
>>> flat.add_with_ids(np.array([[0, 0], [0, 3], [255, 255], [0, 1]], np.uint8), np.array([1, 2, 3, 4]))
>>> index = RadiusIndex(flat, m=2, generation=1)
>>> [x.tolist() for x in index.range_search(np.array([[0, 0]], np.uint8), radius=3)]
[[0, 3], [0, 1, 2], [1, 4, 2]]
"""

from __future__ import annotations

import numpy as np

from streamhash.index.hamming import BinaryIndex
from streamhash.index.memhash import MemHash, memhash_for
from streamhash.index.multihash import Substrings, choose_radius_strategy


class RadiusIndex:
    """``range_search`` by tables or flat scan over ``flat``, the generation's in-memory codes; ``search``
    is the flat index's. ``m``: substrings of the tables. ``wait``: build the tables inside the query
    when they are missing or stale instead of scanning meanwhile (tests, benchmarks)."""

    def __init__(self, flat: BinaryIndex, *, m: int, generation: int = 0, wait: bool = False):
        self.flat, self.m, self.generation, self.wait = flat, m, generation, wait
        self.tables: MemHash = memhash_for(flat, m)
        self.last_strategy: str | None = None  # what the last range_search did: "tables" or "scan"

    @classmethod
    def over_store(cls, flat: BinaryIndex, store, generation: int) -> RadiusIndex:
        """``flat``, a generation of ``store``, with the default number of tables for its code length."""
        return cls(flat, m=Substrings.default_m(store.bits), generation=generation)

    @property
    def d(self) -> int:
        return self.flat.d

    @property
    def ntotal(self) -> int:
        return self.flat.ntotal

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.flat.search(queries, k)

    def strategy(self, radius: int) -> str:
        return choose_radius_strategy(self.flat.ntotal, self.d, self.m, radius, backend=self.flat.backend,
                                      skew=self.tables.skew)

    def range_search(self, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Codes at distance < radius: (lims int64 (nq+1,), D int32, I int64), query i in [lims[i], lims[i+1])."""
        queries, radius = np.asarray(queries), int(radius)
        if queries.dtype != np.uint8 or queries.ndim != 2 or queries.shape[1] != self.flat.code_size:
            raise ValueError(f"queries must be uint8 of shape (n, {self.flat.code_size}), got {queries.dtype} {queries.shape}")
        if self.strategy(radius) == "tables":
            found = self.range_search_tables(queries, radius)
            if found is not None:
                return found
        self.last_strategy = "scan"
        return self.flat.range_search(queries, radius)

    def range_search_tables(self, queries: np.ndarray, radius: int):
        """The tables path alone (None when the tables are not built yet and ``wait`` is false)."""
        found = self.tables.range_search(queries, radius, wait=self.wait)
        if found is not None:
            self.last_strategy = "tables"
        return found
