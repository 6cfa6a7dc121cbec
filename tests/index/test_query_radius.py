"""The query server's radius path: multi-index tables and flat scan give the brute-force answer, in order."""

import numpy as np
import pytest

import streamhash.services.query as query
from streamhash.codes import hamming_brute
from streamhash.index.live import LiveIndex
from streamhash.index.store import ItemWrite, Store


@pytest.mark.parametrize("strategy", ["tables", "scan"])
@pytest.mark.parametrize("radius", [1, 3, 6, 12])
def test_radius_search_matches_brute_force(tmp_path, monkeypatch, strategy, radius):
    rng = np.random.default_rng(radius)
    store = Store(tmp_path, bits=32)
    base = rng.integers(0, 256, (20, 4), dtype=np.uint8)
    # clustered codes: many items within small radii of each other, many ties
    codes = base[rng.integers(0, 20, 3000)] ^ (rng.random((3000, 4)) < 0.04).astype(np.uint8) * rng.integers(0, 256, (3000, 4), dtype=np.uint8)
    store.write_batch([ItemWrite(f"i{n}", c.tobytes(), b"", "image/png", None) for n, c in enumerate(codes)])
    live = LiveIndex(store)
    monkeypatch.setattr(query, "choose_radius_strategy", lambda *a, **k: strategy)
    for q in base[:5]:
        D, I = query._radius_search(store, live.current, q, radius)
        dist = hamming_brute(q[None], codes)[0]
        want = np.flatnonzero(dist < radius)
        want = want[np.lexsort((want, dist[want]))]  # (distance, insertion order)
        np.testing.assert_array_equal(I, want + 1)  # seqs start at 1
        np.testing.assert_array_equal(D, dist[want])
