"""Multi-index hash tables in LMDB (Norouzi et al., "Fast search in Hamming space with multi-index hashing").

A ``bits``-bit code is split into ``m`` contiguous substrings; table ``j`` maps the value of substring
``j`` to the seqs of the items holding it. Candidates within Hamming distance ``r`` of a query are
found by probing, in each table, every substring value within a small radius of the query's
substring, then verified with their full codes by the caller. Tables live in the ``tables``
sub-database, keyed by generation so a re-encode can build the next generation beside the live
one, and are written in the same transaction as the codes, so they never disagree with them.

Probe radii use the refined pigeonhole bound (Norouzi et al., Prop. 2): write ``r = s*m + a``
with ``0 <= a < m``; a code within ``r`` lies within ``s`` of the query on one of the first
``a + 1`` substrings, or within ``s - 1`` on one of the others (otherwise the distance would be
at least ``(a+1)(s+1) + (m-a-1)s = r + 1``). So only ``a + 1`` tables need radius ``s``.

Key: generation (8 B) + table number (1 B) + substring value (``ceil(bits/m/8)`` B, big-endian).
Value: seq (8 B big-endian), one duplicate per item (``dupsort`` + ``dupfixed``), which lets a
whole probe set be read in one ``getmulti`` call (LMDB's GET_MULTIPLE pages of duplicates).

:class:`~streamhash.index.radius.RadiusIndex`, the query server's radius search, no longer reads these
tables: it probes the same substrings (:meth:`MultiHashTables.probe_radii`) in in-memory tables over
the flat index's rows (:mod:`streamhash.index.memhash`), which beat FAISS's in-memory hash tables
where the LMDB probe per query could not. Whether to probe tables or scan all codes is
:func:`choose_radius_strategy`'s call, from a cost model calibrated by ``benchmarks/bench_multihash.py``.

>>> t = MultiHashTables(16, 2)
>>> t.substrings(bytes([0xAB, 0xCD]))
[171, 205]
>>> t.probe_radii(1), t.probe_radii(4), t.probe_radii(5)   # strict radius: max distance 0, 3, 4
([0, -1], [1, 1], [2, 1])
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np

from streamhash.index.backends import scan_ns_per_row

TABLES_DB_FLAGS = {"dupsort": True, "dupfixed": True}


@lru_cache(maxsize=256)
def _flip_masks(width: int, flips: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``flips`` bits set, fewest bits first."""
    out = [0]
    for f in range(1, min(flips, width) + 1):
        out.extend(sum(1 << p for p in pos) for pos in combinations(range(width), f))
    return np.array(out, np.uint64)


class MultiHashTables:
    def __init__(self, bits: int, m: int):
        if m < 1 or m > bits:
            raise ValueError(f"need 1 <= m <= bits, got m={m} for {bits} bits")
        if m > 256:
            raise ValueError(f"at most 256 tables (the key holds the table number in one byte), got {m}")
        self.bits, self.m = bits, m
        # Substring j covers bits [bounds[j], bounds[j+1]); widths differ by at most one.
        self.bounds = [round(j * bits / m) for j in range(m + 1)]
        self.widths = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        self.value_bytes = (max(self.widths) + 7) // 8
        self.key_len = 8 + 1 + self.value_bytes
        if max(self.widths) > 64:
            raise ValueError(f"substrings of at most 64 bits, got {max(self.widths)} (bits={bits}, m={m})")
        self._split = [(bits - b, (1 << (b - a)) - 1) for a, b in zip(self.bounds, self.bounds[1:])]
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # radius -> probe plan

    @staticmethod
    def default_m(bits: int) -> int:
        """About 16 bits per substring: table probes stay cheap and buckets stay short up to ~10^6 items."""
        return max(1, bits // 16)

    def substrings(self, code: bytes) -> list[int]:
        v = int.from_bytes(code, "big")
        return [(v >> shift) & mask for shift, mask in self._split]

    def _keys(self, gen: int, code: bytes) -> list[bytes]:
        prefix = gen.to_bytes(8, "big")
        vb = self.value_bytes
        return [prefix + bytes([j]) + v.to_bytes(vb, "big") for j, v in enumerate(self.substrings(code))]

    def add(self, txn, db, gen: int, seq: int, code: bytes) -> None:
        sv = seq.to_bytes(8, "big")
        for key in self._keys(gen, code):
            txn.put(key, sv, db=db, dupdata=True)

    def remove(self, txn, db, gen: int, seq: int, code: bytes) -> None:
        sv = seq.to_bytes(8, "big")
        for key in self._keys(gen, code):
            txn.delete(key, sv, db=db)

    # ------------------------------------------------------------------ queries
    def probe_radii(self, radius: int) -> list[int]:
        """Per table, how many bits to flip when probing for codes at distance ``< radius`` (-1: skip)."""
        if radius <= 0:
            return [-1] * self.m
        s, a = divmod(radius - 1, self.m)
        return [min(s if j <= a else s - 1, w) for j, w in enumerate(self.widths)]

    def n_probes(self, radius: int) -> int:
        return sum(sum(comb(w, f) for f in range(r + 1)) for w, r in zip(self.widths, self.probe_radii(radius)))

    def expected_candidates(self, n: int, radius: int) -> float:
        """Bucket entries read for a query, if codes were uniform (learned codes skew buckets: more)."""
        return sum(
            n * sum(comb(w, f) for f in range(r + 1)) / 2.0**w for w, r in zip(self.widths, self.probe_radii(radius))
        )

    def _probe_plan(self, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """(table of each probe, flip mask of each probe) for one query, table-major."""
        plan = self._plans.get(radius)
        if plan is None:
            tables, masks = [], []
            for j, r in enumerate(self.probe_radii(radius)):
                if r >= 0:
                    mk = _flip_masks(self.widths[j], r)
                    tables.append(np.full(len(mk), j, np.uint8))
                    masks.append(mk)
            plan = (np.concatenate(tables), np.concatenate(masks)) if tables else (np.zeros(0, np.uint8),) * 2
            self._plans[radius] = plan
        return plan

    def probe_keys(self, gen: int, queries: np.ndarray, radius: int) -> tuple[list[bytes], int]:
        """Table keys to look up for codes at distance ``< radius`` from each of ``queries`` (nq, bits/8):
        a flat list, query-major, and the number of keys per query."""
        tables, masks = self._probe_plan(radius)
        nq, p = len(queries), len(masks)
        if p == 0 or nq == 0:
            return [], p
        if nq * p <= 64:  # a few keys: plain Python beats a dozen numpy calls on tiny arrays
            heads = [gen.to_bytes(8, "big") + bytes([j]) for j in range(self.m)]
            vb, plan = self.value_bytes, list(zip(tables.tolist(), masks.tolist()))
            keys = []
            for q in queries:
                vals = self.substrings(q.tobytes())
                keys.extend(heads[j] + (vals[j] ^ mk).to_bytes(vb, "big") for j, mk in plan)
            return keys, p
        values = np.array([self.substrings(q.tobytes()) for q in queries], np.uint64)  # (nq, m)
        probes = values[:, tables] ^ masks  # (nq, p)
        kb = np.empty((nq * p, self.key_len), np.uint8)
        kb[:, :8] = np.frombuffer(gen.to_bytes(8, "big"), np.uint8)
        kb[:, 8] = np.tile(tables, nq)
        kb[:, 9:] = probes.reshape(-1).astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - self.value_bytes :]
        raw, kl = kb.tobytes(), self.key_len
        return [raw[i : i + kl] for i in range(0, len(raw), kl)], p

    def candidates_batch(self, txn, db, gen: int, queries: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates for many queries: (lims int64 (nq+1,), seqs int64), query i's sorted unique seqs in
        ``seqs[lims[i]:lims[i+1]]``; each a superset of the items at distance ``< radius``."""
        queries = np.asarray(queries, np.uint8).reshape(len(queries), -1)
        nq = len(queries)
        keys, p = self.probe_keys(gen, queries, radius)
        if not keys:
            return np.zeros(nq + 1, np.int64), np.zeros(0, np.int64)
        cur = txn.cursor(db=db)
        rec = np.dtype([("key", f"V{self.key_len}"), ("seq", ">u8")])
        # One C call per query; with keyfixed each result is packed (key, seq) records.
        raws = [
            cur.getmulti(keys[i * p : (i + 1) * p], dupdata=True, dupfixed_bytes=8, keyfixed=True) for i in range(nq)
        ]
        own = np.repeat(np.arange(nq, dtype=np.int64), [len(r) // rec.itemsize for r in raws])
        seq = np.frombuffer(b"".join(raws), rec)["seq"].astype(np.int64)
        # Sort by (query, seq) and drop repeats (an item can sit in several probed buckets).
        # Packing both in one int64 makes it a single sort; np.unique is avoided on purpose
        # (~15x slower than sort + compare in numpy 2.4).
        if len(seq) and seq.max() < 1 << 40 and nq < 1 << 22:
            packed = np.sort((own << 40) | seq)
            own, seq = packed >> 40, packed & ((1 << 40) - 1)
        else:
            order = np.lexsort((seq, own))
            own, seq = own[order], seq[order]
        keep = np.ones(len(seq), bool)
        keep[1:] = (seq[1:] != seq[:-1]) | (own[1:] != own[:-1])
        own, seq = own[keep], seq[keep]
        lims = np.zeros(nq + 1, np.int64)
        np.cumsum(np.bincount(own, minlength=nq), out=lims[1:])
        return lims, seq

    def candidates(self, txn, db, gen: int, query: bytes, radius: int) -> np.ndarray:
        """Sorted unique seqs of every item that may lie at distance ``< radius`` (strict) from ``query``.

        A superset: the caller verifies with the full codes (see :func:`verify`)."""
        q = np.frombuffer(bytes(query), np.uint8)[None]
        return self.candidates_batch(txn, db, gen, q, radius)[1]


def verify(queries: np.ndarray, lims: np.ndarray, seqs: np.ndarray, codes: np.ndarray, radius: int):
    """Keep the candidates truly at distance ``< radius``: ``codes`` (len(seqs), bits/8) are their codes.

    Returns (lims, D int32, seqs) with each query's results sorted by (distance, seq), which in
    the store is (distance, insertion order), as :meth:`BinaryIndex.range_search` orders them.
    """
    owner = np.repeat(np.arange(len(queries)), np.diff(lims))
    dist = np.bitwise_count(np.asarray(codes, np.uint8) ^ np.asarray(queries, np.uint8)[owner]).sum(1, dtype=np.int32)
    ok = dist < radius
    owner, dist, seqs = owner[ok], dist[ok], seqs[ok]
    order = np.lexsort((seqs, dist, owner))
    out = np.zeros(len(queries) + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=len(queries)), out=out[1:])
    return out, dist[order], seqs[order]


# Cost model of the query server's radius search (RadiusIndex): the in-memory tables
# (streamhash.index.memhash, one native probe + verify call) against a flat scan. Refitted with
# `benchmarks/bench_multihash.py --fit` (2-core AMD EPYC, AVX-512 VPOPCNTDQ, 64 bits, m = 4, radii
# 1..8): per probe and per bucket entry are least-squares slopes of the batched tables time against
# the probes and bucket entries a query reads (n = 100k: 0.0015 / 0.034 us; n = 1M, codes out of
# cache: 0.042 us per entry, the probe slope folded into it); the fixed part is a single query's:
# MemHash's per-call overhead (tables_1q - tables: 7.6 us at 100k, quiet machine) + RadiusIndex's
# input check and this function (0.9 us, timed separately). The previous LMDB path
# was 15 + 0.85 per probe + 0.15 per entry. A flat range scan costs per row (per 64-bit word of
# code), a constant each backend registers beside its class (streamhash.index.backends; the same
# run measured 0.074 ns for native), plus a small fixed part (not refitted).
TABLE_US_FIXED = 8.5
TABLE_US_PER_PROBE = 0.002
TABLE_US_PER_CANDIDATE = 0.04
SCAN_US_FIXED = 3.0


@lru_cache(maxsize=4096)
def _probe_counts(bits: int, m: int, radius: int) -> tuple[int, float]:
    """(probes, expected bucket entries per item) of one query: the model's inputs, cached (a query pays a lookup)."""
    t = MultiHashTables(bits, m)
    return t.n_probes(radius), t.expected_candidates(1, radius)


def choose_radius_strategy(
    n: int, bits: int, m: int, radius: int, *, backend: str = "native", skew: float = 1.0
) -> str:
    """``"tables"`` when probing the multi-index tables is expected to beat a flat scan, else ``"scan"``.

    ``skew`` multiplies the expected candidate count (1 for uniform codes; learned codes crowd
    some buckets, which a caller can measure as the mean bucket occupancy over ``n / 2**w``).

    >>> choose_radius_strategy(1_000_000, 64, 4, 3)
    'tables'
    >>> choose_radius_strategy(1_000_000, 64, 4, 16)
    'scan'
    >>> choose_radius_strategy(1_000_000, 64, 4, 8), choose_radius_strategy(1_000_000, 64, 4, 9)
    ('tables', 'scan')
    >>> choose_radius_strategy(1_000, 64, 4, 3)
    'scan'
    """
    if radius <= 0:
        return "tables"  # nothing can match; the tables path does no work
    probes, frac = _probe_counts(bits, m, radius)
    tables_us = TABLE_US_FIXED + TABLE_US_PER_PROBE * probes + TABLE_US_PER_CANDIDATE * skew * n * frac
    scan_us = SCAN_US_FIXED + scan_ns_per_row(backend) * 1e-3 * n * ((bits + 63) // 64)
    return "tables" if tables_us < scan_us else "scan"
