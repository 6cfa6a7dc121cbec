"""The arithmetic of multi-index hashing (Norouzi et al., "Fast search in Hamming space with multi-index hashing").

A ``bits``-bit code is split into ``m`` contiguous substrings (:class:`Substrings`). A code within
Hamming distance ``r`` of a query lies within a small radius of the query on at least one substring,
so a table per substring, probed with every substring value within that radius, finds every
candidate; the caller verifies them with the full codes. The tables themselves are
:class:`~streamhash.index.memhash.MemHash`, in memory over the flat index's rows; this module holds
what they are built and probed by, and the cost model that decides whether probing them beats a flat
scan (:func:`choose_radius_strategy`, calibrated by ``benchmarks/bench_multihash.py``).

Probe radii use the refined pigeonhole bound (Norouzi et al., Prop. 2): write ``r = s*m + a``
with ``0 <= a < m``; a code within ``r`` lies within ``s`` of the query on one of the first
``a + 1`` substrings, or within ``s - 1`` on one of the others (otherwise the distance would be
at least ``(a+1)(s+1) + (m-a-1)s = r + 1``). So only ``a + 1`` tables need radius ``s``.

>>> t = Substrings(16, 2)
>>> t.values(bytes([0xAB, 0xCD]))
[171, 205]
>>> t.probe_radii(1), t.probe_radii(4), t.probe_radii(5)   # strict radius: max distance 0, 3, 4
([0, -1], [1, 1], [2, 1])
>>> flip_masks(3, 1).tolist()   # the values probed around a 3-bit substring at radius 1
[0, 1, 2, 4]
"""

from __future__ import annotations

from functools import lru_cache
from itertools import combinations
from math import comb

import numpy as np

from streamhash.index.backends import scan_ns_per_row


@lru_cache(maxsize=256)
def flip_masks(width: int, flips: int) -> np.ndarray:
    """Every ``width``-bit mask with at most ``flips`` bits set, fewest bits first: XORed into a query's
    substring, the values a table is probed with."""
    out = [0]
    for f in range(1, min(flips, width) + 1):
        out.extend(sum(1 << p for p in pos) for pos in combinations(range(width), f))
    return np.array(out, np.uint64)


class Substrings:
    """How a ``bits``-bit code splits into ``m`` substrings, and how far around each a radius probes."""

    def __init__(self, bits: int, m: int):
        if m < 1 or m > bits:
            raise ValueError(f"need 1 <= m <= bits, got m={m} for {bits} bits")
        self.bits, self.m = bits, m
        # Substring j covers bits [bounds[j], bounds[j+1]); widths differ by at most one.
        self.bounds = [round(j * bits / m) for j in range(m + 1)]
        self.widths = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        if max(self.widths) > 64:
            raise ValueError(f"substrings of at most 64 bits, got {max(self.widths)} (bits={bits}, m={m})")
        # (shift, mask) of each substring in the code read as one big-endian integer
        self.shifts = [(bits - b, (1 << (b - a)) - 1) for a, b in zip(self.bounds, self.bounds[1:])]

    @staticmethod
    def default_m(bits: int) -> int:
        """About 16 bits per substring: table probes stay cheap and buckets stay short up to ~10^6 items."""
        return max(1, bits // 16)

    def values(self, code: bytes) -> list[int]:
        """The ``m`` substring values of one packed code (MSB first)."""
        v = int.from_bytes(code, "big")
        return [(v >> shift) & mask for shift, mask in self.shifts]

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


# Cost model of the query server's radius search (RadiusIndex): the in-memory tables
# (streamhash.index.memhash, one native probe + verify call) against a flat scan. Refitted with
# `benchmarks/bench_multihash.py --fit` (2-core AMD EPYC, AVX-512 VPOPCNTDQ, 64 bits, m = 4, radii
# 1..8): per probe and per bucket entry are least-squares slopes of the batched tables time against
# the probes and bucket entries a query reads (n = 100k: 0.0015 / 0.034 us; n = 1M, codes out of
# cache: 0.042 us per entry, the probe slope folded into it); the fixed part is a single query's:
# MemHash's per-call overhead (tables_1q - tables: 7.6 us at 100k, quiet machine) + RadiusIndex's
# input check and this function (0.9 us, timed separately). A flat range scan costs per row (per 64-bit word of
# code), a constant each backend registers beside its class (streamhash.index.backends; the same
# run measured 0.074 ns for native), plus a small fixed part (not refitted).
TABLE_US_FIXED = 8.5
TABLE_US_PER_PROBE = 0.002
TABLE_US_PER_CANDIDATE = 0.04
SCAN_US_FIXED = 3.0


@lru_cache(maxsize=4096)
def _probe_counts(bits: int, m: int, radius: int) -> tuple[int, float]:
    """(probes, expected bucket entries per item) of one query: the model's inputs, cached (a query pays a lookup)."""
    t = Substrings(bits, m)
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
