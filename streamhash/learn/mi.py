"""Exact mutual-information quality of a set of binary codes (MIHash's measure, Cakir et al. 2017).

For an anchor a, D is the Hamming distance from a to each *other* item of the set (values 0..bits) and
C whether that item is a neighbour (label sets intersect). Its quality is

    I(D; C) = H(D) - [P(+) H(D|+) + P(-) H(D|-)]

with empirical distributions over the other items; Q = the mean over anchors. Logs are natural (nats).
Degenerate anchors — all others neighbours, none, or every distance equal — have I = 0, which the
formula gives by itself with 0 log 0 = 0.

>>> import numpy as np
>>> codes = np.array([[0b00000000], [0b00000001], [0b11111110], [0b11111111]], np.uint8)
>>> round(mi_quality(codes, [0, 0, 1, 1], bits=8), 4)   # perfectly separated: I = H(C)
0.6365
>>> mi_quality(codes, [0, 0, 0, 0], bits=8)             # all neighbours
0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from streamhash.learn.labels import neighbour_matrix

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Packed codes (na, w), (nb, w) uint8 -> Hamming distances (na, nb) int32 by a popcount table."""
    a = np.asarray(a, dtype=np.uint8)
    b = np.asarray(b, dtype=np.uint8)
    out = np.zeros((len(a), len(b)), dtype=np.int32)
    for k in range(a.shape[1]):
        out += _POPCOUNT[np.bitwise_xor.outer(a[:, k], b[:, k])]
    return out


def _entropy_rows(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        p = counts / np.maximum(totals, 1)[:, None]
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -(p * logp).sum(axis=1)


def mi_per_anchor(codes: np.ndarray, labels, bits: int, db_codes: np.ndarray | None = None) -> np.ndarray:
    """Exact I(D; C) for every item of the set as anchor (n,), in nats.

    ``db_codes`` (default ``codes``): the codes the *other* items are compared with, row-aligned with
    ``codes`` — anchor i's distances are ``hamming(codes[i], db_codes[j])`` for every j != i. MIHash's
    query/database setting on one labeled set: queries encoded one way, the database held another.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    db = codes if db_codes is None else np.asarray(db_codes, dtype=np.uint8)
    n = len(codes)
    if len(db) != n:
        raise ValueError(f"{n} anchor codes but {len(db)} database codes")
    if n < 2:
        return np.zeros(n)
    nbr = neighbour_matrix(labels)
    dist = hamming_matrix(codes, db)
    off = ~np.eye(n, dtype=bool)
    pos = nbr & off
    neg = ~nbr & off
    nb = bits + 1
    rows = np.repeat(np.arange(n), n).reshape(n, n)
    flat = rows * nb + dist
    h_pos = np.bincount(flat[pos], minlength=n * nb).reshape(n, nb).astype(np.float64)
    h_neg = np.bincount(flat[neg], minlength=n * nb).reshape(n, nb).astype(np.float64)
    n_pos = h_pos.sum(1)
    n_neg = h_neg.sum(1)
    total = n_pos + n_neg
    h_d = _entropy_rows(h_pos + h_neg, total)
    mi = h_d - (n_pos / total) * _entropy_rows(h_pos, n_pos) - (n_neg / total) * _entropy_rows(h_neg, n_neg)
    return np.maximum(mi, 0.0)  # exact value is >= 0; clip float round-off


@dataclass(frozen=True)
class MIGain:
    """The MIHash re-encode comparison on a labeled sample (see :func:`mi_gain`)."""

    live: float  # mean MI of the queries against the database as it is
    candidate: float  # ... against the database after the selective re-encode
    gain: float  # candidate - live (the mean of the per-query differences)
    sigma: float  # bootstrap standard deviation of that mean
    n: int  # queries
    changed: int  # database codes that differ between the two


def _xlogx(x: np.ndarray) -> np.ndarray:
    return x * np.log(x + (x == 0))  # 0 log 0 = 0


def _class_terms(not_nbr: np.ndarray, w_db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per query and resample (n, B): the other items' total weight T and T log T - n+ log n+ - n- log n-
    (n+, n-: neighbours', non-neighbours' weight). They do not depend on the codes: computed once, by a
    sparse product with the rarer class's mask."""
    total = w_db.sum(0) - w_db  # every other item
    nbr = ~not_nbr
    np.fill_diagonal(nbr, False)
    rare_pos = nbr.sum() <= not_nbr.sum()
    rare = sp.csr_matrix(nbr if rare_pos else not_nbr, dtype=np.float64) @ w_db
    if not rare_pos:
        rare -= w_db * not_nbr.diagonal()[:, None]  # an anchor is not its own non-neighbour
    other = total - rare
    return total, _xlogx(total) - _xlogx(rare) - _xlogx(other)


def _mixed_bin_terms(parts: list, m: int, nb: int, b: int, table: np.ndarray | None = None) -> np.ndarray:
    """sum_d [p_d log p_d + q_d log q_d - (p_d + q_d) log(p_d + q_d)] (m, B), where p_d, q_d are the
    neighbours' and non-neighbours' weight at distance d: hist = sum of scale * counts over ``parts``, a list
    of (scale, counts (m, 2 nb, B)), a neighbour at distance d in bin d, a non-neighbour in bin nb + d.

    With S = sum c log c over a histogram of total T, H = log T - S / T, so
    T I(D; C) = T log T - n+ log n+ - n- log n- + this sum (see :func:`_class_terms`). A distance holding
    only one class adds exactly 0, so only the bins where column 0 (every item; weights >= 0, so a bin
    empty there is empty in every column) has both classes are gathered, summed over the parts and
    logged: mostly a narrow band of distances. ``table``: x log x of 0, 1, 2, ... for whole counts at scale 1,
    looked up instead of logged.
    """
    out = np.zeros((m, b))
    if not parts:
        return out
    filled = np.logical_or.reduce([h[:, :, 0] > 0 for _, h in parts])
    both = filled[:, :nb] & filled[:, nb:]
    per = both.sum(1)
    if per.any():
        whole = table is not None and all(v == 1 for v, _ in parts)

        def gathered(lo):  # (bins kept, B), anchor by anchor
            if whole:
                return sum(h[:, lo:lo + nb][both].astype(np.intp) for _, h in parts)
            return sum(h[:, lo:lo + nb][both].astype(np.float64) * v if v != 1 else
                       h[:, lo:lo + nb][both].astype(np.float64) for v, h in parts)

        p, q = gathered(0), gathered(nb)
        xlogx = table.__getitem__ if whole else _xlogx
        terms = xlogx(p) + xlogx(q) - xlogx(p + q)
        some = per > 0
        out[some] = np.add.reduceat(terms, (np.cumsum(per) - per)[some], axis=0)
    return out


def _weighted_histograms(rows: np.ndarray, span: int, w: np.ndarray) -> np.ndarray:
    """hist[i, k, b] = sum of w[j, b] over the items j with rows[j, i] == i * span + k: (m, span - 1, B).

    ``rows`` (items, m anchors): each pair's row in the stacked one-hot (m * span, items) matrix; bin
    span - 1 takes the pairs left out (an anchor and itself). Built column by column (CSC: the row indices
    of an item come out sorted, anchor by anchor, with no sort), times ``w`` (items, B) it costs one B-long
    add per pair.
    """
    k, m = rows.shape
    onehot = sp.csc_matrix((np.ones(k * m, w.dtype), rows.ravel(), np.arange(k + 1, dtype=rows.dtype) * m),
                           shape=(m * span, k))
    return np.asarray(onehot @ w).reshape(m, span, w.shape[1])[:, :span - 1]


def _pair_rows(dist: np.ndarray, not_nbr: np.ndarray, self_pairs: tuple, nb: int) -> np.ndarray:
    """(items, anchors) row of each (anchor, item) pair in the one-hot: anchor * (2 nb + 1) + its bin —
    the distance, plus nb for a non-neighbour — or the left-out bin 2 nb for ``self_pairs``."""
    n = len(dist)
    dtype = np.int32 if n * (2 * nb + 1) < 2**31 else np.int64
    key = dist.astype(dtype)
    key[not_nbr] += nb
    key[self_pairs] = 2 * nb
    key += np.arange(n, dtype=dtype)[:, None] * (2 * nb + 1)
    return np.ascontiguousarray(key.T)


def _bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """(n, 1 + n_boot): column 0 every item once (the point estimate), then seeded multinomial resamples."""
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, np.full(n, 1.0 / n), size=max(n_boot, 0)).T
    return np.concatenate([np.ones((n, 1)), draws], axis=1)


def _weight_groups(weights: np.ndarray, db_weights: np.ndarray | None, max_groups: int = 8) -> list:
    """[(scale, items (n,) bool, counts (n, B))]: the database weights are sum of scale * counts over groups.

    Counts are whole numbers where they can be (the bootstrap counts, one group per distinct database
    weight: a stratified sample has a few), held in the narrowest type that sums them exactly (int16,
    float32): the sparse products run 2-3x faster than in float64. Otherwise one float64 group.
    """
    n = len(weights)
    if db_weights is None:
        db, scales = np.ones(n), np.ones(1)
    else:
        db = np.asarray(db_weights, np.float64)
        if db.shape != (n,) or not np.all(db >= 0):
            raise ValueError("db_weights must be n weights >= 0")
        scales = np.unique(db[db > 0])
    if not 0 < len(scales) <= max_groups:
        return [(1.0, db > 0, weights * db[:, None])]
    top = weights.sum(0).max()
    dtype = np.int16 if top < 2**15 else np.float32 if top < 2**24 else np.float64
    return [(float(v), db == v, weights.astype(dtype)) for v in scales]


def _per_anchor_mi(rows_live: np.ndarray, rows_cand: np.ndarray, ch: np.ndarray, groups: list, span: int,
                   chunk: int | None, total: np.ndarray, class_terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """I(D; C) (n, B) of every query and resample against the live and the candidate database.

    Queries go ``chunk`` at a time (default: about 2**19 histogram cells a part, 1 MB in int16) to bound memory. The
    unchanged items' histograms are counted once and serve both databases."""
    n, b = rows_live.shape[1], groups[0][2].shape[1]
    nb = (span - 1) // 2
    sel = [(v, rows_live[it & ~ch], w[it & ~ch], rows_live[it & ch], rows_cand[it[ch]], w[it & ch])
           for v, it, w in groups]
    step = chunk or max(1, (1 << 19) // (span * b))
    whole = all(np.issubdtype(w.dtype, np.integer) for _, _, w in groups)
    table = _xlogx(np.arange(max(int(w.sum(0).max()) for _, _, w in groups) + 1.0)) if whole else None
    live_all, cand_all = np.empty((n, b)), np.empty((n, b))
    for a0 in range(0, n, step):
        a1 = min(a0 + step, n)
        live, cand = [], []
        for v, r_u, w_u, r_l, r_c, w_c in sel:
            if len(r_u):
                shared = (v, _weighted_histograms(r_u[:, a0:a1] - a0 * span, span, w_u))
                live.append(shared)
                cand.append(shared)
            if len(r_l):
                live.append((v, _weighted_histograms(r_l[:, a0:a1] - a0 * span, span, w_c)))
                cand.append((v, _weighted_histograms(r_c[:, a0:a1] - a0 * span, span, w_c)))
        live_all[a0:a1] = _mixed_bin_terms(live, a1 - a0, nb, b, table)
        cand_all[a0:a1] = _mixed_bin_terms(cand, a1 - a0, nb, b, table)
    scale = 1.0 / np.maximum(total, 1e-300)
    # I >= 0 exactly; clip the float round-off
    return np.maximum((live_all + class_terms) * scale, 0.0), np.maximum((cand_all + class_terms) * scale, 0.0)


def mi_gain(query_codes: np.ndarray, live_codes: np.ndarray, candidate_codes: np.ndarray, labels, bits: int, *,
            n_boot: int = 200, seed: int = 0, chunk: int | None = None,
            db_weights: np.ndarray | None = None) -> MIGain:
    """Compare two versions of a database on the same labeled items, MIHash-style.

    Item i is a query (``query_codes[i]``: the current network's encoding of it) and the database is
    the other items, once with ``live_codes`` (what the index holds) and once with ``candidate_codes``
    (what it would hold after the re-encode); ``gain`` is the mean over queries of the per-query MI
    difference. With no code changed the gain and sigma are exactly 0.

    ``sigma`` is the standard deviation of the gain over ``n_boot`` bootstrap resamples of the *items*
    (seeded: the same inputs, the same answer). An item drawn w times weighs w as a query and w in the
    other queries' distance histograms: the database is a sample too. Resampling the queries alone
    (the per-query differences) misses that part, which dominates when the codes that change are few —
    each changed database code moves every query's MI the same way — and it fires on pure noise (two
    networks of the same quality: about one draw in four at 2 sigma, against about 2% here).
    ``db_weights`` (n,): how much each item weighs on the database side (a stratified sample weighed back
    to the population it stands for); queries keep equal weight.

    The histograms of all resamples are weighted counts: each (query, item) pair falls in one bin, its
    distance plus (bits + 1) if not a neighbour, so a sparse one-hot (queries x bins, items) matrix times
    the (items, resamples) weights gives them all at one add per pair and resample, exact (whole bootstrap
    counts in int16 or float32; see :func:`_weight_groups`). The dense 0/1 mask product per distance value
    it replaced did (bits + 1) times that work and was most of the learner's CPU (1.3 CPU s a call against
    0.07 s at n = 1000, 32 bits, 200 resamples: ``benchmarks/bench_mi.py``). Queries go ``chunk`` at a time to bound
    memory; the unchanged items' part is counted once and shared by live and candidate.
    """
    query_codes = np.asarray(query_codes, np.uint8)
    live_codes = np.asarray(live_codes, np.uint8)
    candidate_codes = np.asarray(candidate_codes, np.uint8)
    n = len(query_codes)
    if len(live_codes) != n or len(candidate_codes) != n:
        raise ValueError("query, live and candidate codes must be row-aligned")
    ch = np.any(live_codes != candidate_codes, axis=1) if n else np.zeros(0, bool)
    changed = int(ch.sum())
    if n < 2:
        return MIGain(0.0, 0.0, 0.0, 0.0, n, changed)
    if not changed:
        q = float(mi_per_anchor(query_codes, labels, bits, db_codes=live_codes).mean())
        return MIGain(q, q, 0.0, 0.0, n, 0)  # db weights do not matter: the gain is exactly 0
    nb, span = bits + 1, 2 * bits + 3
    not_nbr = ~neighbour_matrix(labels)
    idx = np.arange(n)
    rows_live = _pair_rows(hamming_matrix(query_codes, live_codes), not_nbr, (idx, idx), nb)
    rows_c = _pair_rows(hamming_matrix(query_codes, candidate_codes[ch]), not_nbr[:, ch],
                        (idx[ch], np.arange(changed)), nb)
    weights = _bootstrap_weights(n, n_boot, seed)
    groups = _weight_groups(weights, db_weights)  # checks db_weights
    w_db = weights if db_weights is None else weights * np.asarray(db_weights, np.float64)[:, None]
    live_all, cand_all = _per_anchor_mi(rows_live, rows_c, ch, groups, span, chunk, *_class_terms(not_nbr, w_db))
    live_q = (weights * live_all).sum(0) / weights.sum(0)  # queries weigh their bootstrap count
    cand_q = (weights * cand_all).sum(0) / weights.sum(0)
    gains = cand_q - live_q
    sigma = float(gains[1:].std()) if n_boot > 0 else 0.0
    return MIGain(float(live_q[0]), float(cand_q[0]), float(gains[0]), sigma, n, changed)


def mi_quality(codes: np.ndarray, labels: Sequence | np.ndarray, bits: int) -> float:
    """Q = mean over anchors of I(D; C) for packed codes and their labels (ints, label sets or multi-hot)."""
    per = mi_per_anchor(codes, labels, bits)
    return float(per.mean()) if len(per) else 0.0
