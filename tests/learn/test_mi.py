import math
from collections import Counter

import numpy as np
import pytest

from streamhash.learn.mi import hamming_matrix, mi_per_anchor, mi_quality


def entropy(counter, total):
    return -sum(v / total * math.log(v / total) for v in counter.values() if v)


def brute_mi(codes_bits, labels):
    n = len(codes_bits)
    out = []
    for a in range(n):
        pos, neg = Counter(), Counter()
        for j in range(n):
            if j == a:
                continue
            d = sum(x != y for x, y in zip(codes_bits[a], codes_bits[j]))
            (pos if labels[a] & labels[j] else neg)[d] += 1
        npos, nneg = sum(pos.values()), sum(neg.values())
        tot = npos + nneg
        mi = entropy(pos + neg, tot)
        if npos:
            mi -= npos / tot * entropy(pos, npos)
        if nneg:
            mi -= nneg / tot * entropy(neg, nneg)
        out.append(mi)
    return np.array(out)


def make(n, bits, seed, n_labels=3):
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 2, (n, bits))
    labels = [frozenset(rng.choice(n_labels, rng.integers(1, 3), replace=False).tolist()) for _ in range(n)]
    return b, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mi_matches_brute_force_multilabel(seed):
    bits = 16
    b, labels = make(15, bits, seed)
    packed = np.packbits(b.astype(bool), axis=1)
    np.testing.assert_allclose(mi_per_anchor(packed, labels, bits), brute_mi(b.tolist(), labels), atol=1e-12)
    assert mi_quality(packed, labels, bits) == pytest.approx(brute_mi(b.tolist(), labels).mean())


def test_degenerate_cases_are_zero():
    bits = 8
    b, _ = make(10, bits, 3)
    packed = np.packbits(b.astype(bool), axis=1)
    assert mi_quality(packed, [1] * 10, bits) == 0.0  # all neighbours
    assert mi_quality(packed, list(range(10)), bits) == 0.0  # no neighbours
    same = np.repeat(packed[:1], 10, axis=0)  # all distances equal (0)
    assert mi_quality(same, [0, 1] * 5, bits) == pytest.approx(0.0, abs=1e-12)
    assert mi_quality(packed[:1], [0], bits) == 0.0


def test_perfect_codes_reach_label_entropy():
    bits = 8
    packed = np.array([[0], [0], [255], [255]], np.uint8)
    # each anchor: 1 neighbour at distance 0, 2 non-neighbours at distance 8 -> I = H(C) = H(1/3)
    h = -(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3))
    assert mi_quality(packed, [0, 0, 1, 1], bits) == pytest.approx(h)


def test_hamming_matrix():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 4), dtype=np.uint8)
    b = rng.integers(0, 256, (7, 4), dtype=np.uint8)
    ref = (np.unpackbits(a, axis=1)[:, None] != np.unpackbits(b, axis=1)[None]).sum(2)
    np.testing.assert_array_equal(hamming_matrix(a, b), ref)


def weighted_mi(q_bits, db_bits, labels, w):
    """Brute force: each query against the other items, item j counting w[j] in the distance histograms."""
    out = []
    for i, q in enumerate(q_bits):
        pos, neg = Counter(), Counter()
        for j, d in enumerate(db_bits):
            if j != i:
                dist = sum(a != b for a, b in zip(q, d))
                (pos if set(labels[i]) & set(labels[j]) else neg)[dist] += w[j]
        p_, n_ = sum(pos.values()), sum(neg.values())
        tot = p_ + n_
        both = pos + neg
        out.append(entropy(both, tot) - (p_ / tot) * entropy(pos, p_) - (n_ / tot) * entropy(neg, n_))
    return float(np.mean(out))


@pytest.mark.parametrize("seed", range(3))
def test_mi_gain_with_database_weights_matches_brute_force(seed):
    from streamhash.learn.mi import mi_gain

    rng = np.random.default_rng(seed)
    n, bits = 24, 8
    labels = [[int(v)] for v in rng.integers(0, 3, n)]
    q, live = rng.integers(0, 2, (n, bits)), rng.integers(0, 2, (n, bits))
    cand = live.copy()
    cand[: n // 3] = rng.integers(0, 2, (n // 3, bits))
    w = rng.uniform(0.2, 3.0, n)
    g = mi_gain(np.packbits(q, axis=1), np.packbits(live, axis=1), np.packbits(cand, axis=1), labels, bits,
                n_boot=0, db_weights=w)
    assert g.live == pytest.approx(weighted_mi(q.tolist(), live.tolist(), labels, w), rel=1e-5)
    assert g.candidate == pytest.approx(weighted_mi(q.tolist(), cand.tolist(), labels, w), rel=1e-5)
    same = mi_gain(np.packbits(q, axis=1), np.packbits(live, axis=1), np.packbits(cand, axis=1), labels, bits, n_boot=0)
    scaled = mi_gain(np.packbits(q, axis=1), np.packbits(live, axis=1), np.packbits(cand, axis=1), labels, bits,
                     n_boot=0, db_weights=np.full(n, 4.0))
    assert scaled.gain == pytest.approx(same.gain, rel=1e-5)  # equal weights change nothing


def brute_mi_gain(q_bits, live_bits, cand_bits, labels, n_boot, seed, db_weights):
    """Per resample, plain loops: column 0 every item once, then rng.multinomial(n, 1/n) draws; an item drawn
    c times weighs c as a query and c * db_weight in the other queries' distance histograms."""
    n = len(q_bits)
    rng = np.random.default_rng(seed)
    columns = [np.ones(n)] + list(rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot))
    dbw = np.ones(n) if db_weights is None else np.asarray(db_weights, float)
    dist = {name: [[sum(a != b for a, b in zip(q_bits[i], db[j])) for j in range(n)] for i in range(n)]
            for name, db in (("live", live_bits), ("cand", cand_bits))}
    nbr = [[bool(set(labels[i]) & set(labels[j])) for j in range(n)] for i in range(n)]
    means = {"live": [], "cand": []}
    for c in columns:
        for name in means:
            mis = []
            for i in range(n):
                pos, neg = Counter(), Counter()
                for j in range(n):
                    if j != i and c[j] * dbw[j] > 0:
                        (pos if nbr[i][j] else neg)[dist[name][i][j]] += c[j] * dbw[j]
                p_, n_ = sum(pos.values()), sum(neg.values())
                tot = p_ + n_
                mi = entropy(pos + neg, tot) if tot else 0.0
                mi -= (p_ / tot) * entropy(pos, p_) if p_ else 0.0
                mi -= (n_ / tot) * entropy(neg, n_) if n_ else 0.0
                mis.append(max(mi, 0.0))
            means[name].append(sum(ci * m for ci, m in zip(c, mis)) / sum(c))
    gains = np.array(means["cand"]) - np.array(means["live"])
    return means["live"][0], means["cand"][0], gains[0], float(gains[1:].std()) if n_boot else 0.0


@pytest.mark.parametrize("bits", [8, 32])
@pytest.mark.parametrize("n_changed", [1, 5, 18])
@pytest.mark.parametrize("weighted", [False, True])
def test_mi_gain_matches_a_per_resample_brute_force(bits, n_changed, weighted):
    from streamhash.learn.mi import mi_gain

    rng = np.random.default_rng(bits * 100 + n_changed * 2 + weighted)
    n = 18
    q, labels = make(n, bits, int(rng.integers(1 << 30)))
    live = q ^ (rng.random((n, bits)) < 0.3)
    cand = live.copy()
    moved = rng.choice(n, n_changed, replace=False)
    cand[moved] = q[moved] ^ (rng.random((n_changed, bits)) < 0.1)
    cand[moved, 0] = 1 - live[moved, 0]  # every chosen code really changes
    w = rng.uniform(0.2, 3.0, n) if weighted else None
    packed = [np.packbits(b.astype(bool), axis=1) for b in (q, live, cand)]
    g = mi_gain(*packed, labels, bits, n_boot=25, seed=7, db_weights=w)
    live_ref, cand_ref, gain_ref, sigma_ref = brute_mi_gain(q.tolist(), live.tolist(), cand.tolist(), labels, 25, 7, w)
    assert g.changed == n_changed and g.n == n
    assert abs(g.live - live_ref) < 1e-9 and abs(g.candidate - cand_ref) < 1e-9 and abs(g.gain - gain_ref) < 1e-9
    assert g.sigma == pytest.approx(sigma_ref, rel=1e-6) and sigma_ref > 0
    small = mi_gain(*packed, labels, bits, n_boot=25, seed=7, db_weights=w, chunk=4)  # anchors 4 at a time
    assert abs(small.gain - g.gain) < 1e-12 and small.sigma == pytest.approx(g.sigma, rel=1e-9)
