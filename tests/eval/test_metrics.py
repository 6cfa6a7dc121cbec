import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.eval.lsh import LSH
from streamhash.eval.metrics import hamming_distances, retrieval_metrics


def test_hand_computed_example_with_ties():
    # database distances to the query: [2, 1, 1, 0, 1, 3]; relevant (label 0): items 1, 2, 5
    db = np.array([[0b11], [0b01], [0b10], [0b00], [0b100], [0b111]], np.uint8)
    q = np.array([[0b00]], np.uint8)
    labels = [1, 0, 0, 1, 1, 0]
    # stable order by (distance, index): 3(d0,-) 1(d1,+) 2(d1,+) 4(d1,-) 0(d2,-) 5(d3,+)
    # relevant at ranks 2, 3, 6 -> AP = (1/2 + 2/3 + 3/6) / 3
    m = retrieval_metrics(q, [0], db, labels, bits=8, topk=3, radius=2)
    assert m["map"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 6) / 3)
    assert m["map_at_k"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # top 3: ranks 2, 3 relevant
    assert m["p_at_k"] == pytest.approx(2 / 3)
    assert m["p_r2"] == pytest.approx(2 / 5)  # items within distance 2: 3, 1, 2, 4, 0


def brute_ap(dist, rel):
    order = sorted(range(len(dist)), key=lambda i: (dist[i], i))
    hits, s = 0, 0.0
    for r, i in enumerate(order, 1):
        if rel[i]:
            hits += 1
            s += hits / r
    return s / hits if hits else None


def test_against_brute_force_random_and_multilabel():
    rng = np.random.default_rng(0)
    db = rng.integers(0, 256, (300, 2), dtype=np.uint8)
    q = rng.integers(0, 256, (20, 2), dtype=np.uint8)
    dl = [frozenset(rng.choice(5, rng.integers(1, 3), replace=False).tolist()) for _ in range(300)]
    ql = [frozenset(rng.choice(5, 1).tolist()) for _ in range(20)]
    d = hamming_brute(q, db)
    np.testing.assert_array_equal(hamming_distances(q, db), d)
    aps = [brute_ap(d[i], [bool(ql[i] & dl[j]) for j in range(300)]) for i in range(20)]
    m = retrieval_metrics(q, ql, db, dl, bits=16, topk=50, batch=7)
    assert m["map"] == pytest.approx(np.mean([a for a in aps if a is not None]))


def test_queries_without_relevant_items_are_left_out_of_map():
    db = np.array([[0], [1]], np.uint8)
    m = retrieval_metrics(np.array([[0], [0]], np.uint8), [0, 5], db, [0, 1], bits=8)
    assert m["map"] == 1.0 and m["n_queries_with_relevant"] == 1


def test_lsh_shapes():
    x = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    codes = LSH(32, 784, seed=0).fit(x).encode(x)
    assert codes.shape == (50, 4) and codes.dtype == np.uint8
