"""Multi-index hash tables in LMDB (Norouzi et al., "Fast search in Hamming space with multi-index hashing").

A ``bits``-bit code is split into ``m`` contiguous substrings; table ``j`` maps the value of substring
``j`` to the seqs of the items holding it. By the pigeonhole principle, any code within Hamming
distance ``r`` of a query agrees with it to within ``r // m`` bits on at least one substring, so
probing every value within ``r // m`` of each query substring finds every candidate; candidates are
then verified with their full codes. Tables live in the ``tables`` sub-database, keyed by generation
so a re-encode can build the next generation beside the live one, and are written in the same
transaction as the codes, so they never disagree with them.

Key: generation (8 B) + table number (1 B) + substring value (``ceil(bits/m/8)`` B, big-endian).
Value: seq (8 B big-endian), one duplicate per item (``dupsort`` + ``dupfixed``).
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

TABLES_DB_FLAGS = {"dupsort": True, "dupfixed": True}


class MultiHashTables:
    def __init__(self, bits: int, m: int):
        if m < 1 or m > bits:
            raise ValueError(f"need 1 <= m <= bits, got m={m} for {bits} bits")
        self.bits, self.m = bits, m
        # Substring j covers bits [bounds[j], bounds[j+1]); widths differ by at most one.
        self.bounds = [round(j * bits / m) for j in range(m + 1)]
        self.value_bytes = (max(b - a for a, b in zip(self.bounds, self.bounds[1:])) + 7) // 8

    @staticmethod
    def default_m(bits: int) -> int:
        """About 16 bits per substring: table probes stay cheap and buckets stay short up to ~10^6 items."""
        return max(1, bits // 16)

    def substrings(self, code: bytes) -> list[int]:
        v = int.from_bytes(code, "big")
        out = []
        for a, b in zip(self.bounds, self.bounds[1:]):
            out.append((v >> (self.bits - b)) & ((1 << (b - a)) - 1))
        return out

    def _key(self, gen: int, j: int, value: int) -> bytes:
        return gen.to_bytes(8, "big") + bytes([j]) + value.to_bytes(self.value_bytes, "big")

    def add(self, txn, db, gen: int, seq: int, code: bytes) -> None:
        sv = seq.to_bytes(8, "big")
        for j, value in enumerate(self.substrings(code)):
            txn.put(self._key(gen, j, value), sv, db=db, dupdata=True)

    def remove(self, txn, db, gen: int, seq: int, code: bytes) -> None:
        sv = seq.to_bytes(8, "big")
        for j, value in enumerate(self.substrings(code)):
            txn.delete(self._key(gen, j, value), sv, db=db)

    def candidates(self, txn, db, gen: int, query: bytes, radius: int) -> np.ndarray:
        """Seqs of every item that may lie at distance ``< radius`` (strict) from ``query``; a superset."""
        if radius <= 0:
            return np.zeros(0, np.int64)
        per_table = (radius - 1) // self.m
        cur = txn.cursor(db=db)
        found: set[bytes] = set()
        for j, value in enumerate(self.substrings(query)):
            width = self.bounds[j + 1] - self.bounds[j]
            for flips in range(min(per_table, width) + 1):
                for pos in combinations(range(width), flips):
                    probe = value
                    for p in pos:
                        probe ^= 1 << p
                    if cur.set_key(self._key(gen, j, probe)):
                        found.update(cur.iternext_dup())
        return np.array(sorted(int.from_bytes(s, "big") for s in found), np.int64)
