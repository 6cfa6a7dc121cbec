"""The arithmetic of multi-index hashing: substring split, probe radii and masks cover every neighbour; the cost model."""

from __future__ import annotations

import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index.multihash import Substrings, choose_radius_strategy, flip_masks


def clustered_codes(rng, n, bits):
    """Codes around a few centres, so small radii have many true neighbours."""
    centres = rng.random((8, bits)) < 0.5
    noise = rng.random((n, bits)) < 0.06
    return np.packbits(centres[rng.integers(0, 8, n)] ^ noise, axis=1)


@pytest.mark.parametrize("bits,m", [(16, 1), (24, 2), (32, 2), (40, 3), (64, 4), (64, 5), (72, 4), (128, 8)])
def test_probes_reach_every_code_within_the_radius(bits, m):
    """What MemHash relies on: every code at distance < radius equals, on some substring, one of the values
    probed there (the query's substring XOR a flip mask of that table's probe radius)."""
    rng = np.random.default_rng(bits * 10 + m)
    t = Substrings(bits, m)
    codes = clustered_codes(rng, 600, bits)
    queries = np.concatenate([codes[:4], clustered_codes(rng, 4, bits)])
    dist = hamming_brute(queries, codes)
    subs = [t.values(c.tobytes()) for c in codes]
    for radius in (0, 1, 2, 3, m + 1, 2 * m + 2, bits // 4):
        radii = t.probe_radii(radius)
        for i, q in enumerate(queries):
            qs = t.values(q.tobytes())
            probed = [{qs[j] ^ int(x) for x in flip_masks(t.widths[j], r)} if r >= 0 else set()
                      for j, r in enumerate(radii)]
            for c in np.flatnonzero(dist[i] < radius):
                assert any(subs[c][j] in probed[j] for j in range(m)), (radius, i, c)
        assert t.n_probes(radius) == sum(len(flip_masks(w, r)) for w, r in zip(t.widths, radii) if r >= 0)


def test_split_and_probe_radii():
    t = Substrings(64, 4)
    assert t.bounds == [0, 16, 32, 48, 64] and t.values(bytes(range(1, 9))) == [0x0102, 0x0304, 0x0506, 0x0708]
    assert Substrings(40, 3).widths == [13, 14, 13]  # widths differ by at most one
    # Refined pigeonhole: max distance r = 4s + a probes radius s in a + 1 tables, s - 1 elsewhere.
    assert t.probe_radii(0) == [-1] * 4
    assert t.probe_radii(4) == [0, 0, 0, 0]  # r = 3
    assert t.probe_radii(5) == [1, 0, 0, 0]  # r = 4
    assert t.probe_radii(8) == [1, 1, 1, 1]  # r = 7
    assert t.n_probes(5) == 17 + 3
    assert flip_masks(4, 2).tolist() == [0, 1, 2, 4, 8, 3, 5, 9, 6, 10, 12]  # fewest bits first
    assert len(flip_masks(3, 9)) == 8  # never more than every value of the substring
    with pytest.raises(ValueError):
        Substrings(128, 1)  # 128-bit substrings cannot be probed
    with pytest.raises(ValueError):
        Substrings(16, 17)


def test_cost_model_prefers_tables_for_small_radius_and_scan_for_large():
    n, bits, m = 1_000_000, 64, 4
    assert choose_radius_strategy(n, bits, m, 2) == "tables"
    assert choose_radius_strategy(n, bits, m, 4) == "tables"
    assert choose_radius_strategy(n, bits, m, 12) == "scan"
    assert choose_radius_strategy(n, bits, m, 64) == "scan"
    assert choose_radius_strategy(n, bits, m, 8) == "tables"  # in-memory tables: up to radius 8 at 1M (refit)
    assert choose_radius_strategy(n, bits, m, 9) == "scan"
    assert choose_radius_strategy(2_000, bits, m, 3) == "scan"  # tiny index: just scan
    # skewed buckets (learned codes) move the break-even radius down
    assert choose_radius_strategy(n, bits, m, 8, skew=4.0) == "scan"
    # A slow scan (numpy backend) moves the break-even radius up, never down.
    for r in range(1, 20):
        if choose_radius_strategy(n, bits, m, r) == "tables":
            assert choose_radius_strategy(n, bits, m, r, backend="numpy") == "tables"
