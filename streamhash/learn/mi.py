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


def _mi_from_histograms(h_pos: np.ndarray, h_neg: np.ndarray) -> np.ndarray:
    """I(D; C) from per-anchor distance histograms (..., bits+1) of neighbours and non-neighbours."""
    def entropy(counts):
        total = counts.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = counts / np.maximum(total, 1e-12)
            logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
        return -(p * logp).sum(-1)

    n_pos, n_neg = h_pos.sum(-1), h_neg.sum(-1)
    total = np.maximum(n_pos + n_neg, 1e-12)
    mi = entropy(h_pos + h_neg) - (n_pos / total) * entropy(h_pos) - (n_neg / total) * entropy(h_neg)
    return np.maximum(mi, 0.0)


def mi_gain(query_codes: np.ndarray, live_codes: np.ndarray, candidate_codes: np.ndarray, labels, bits: int, *,
            n_boot: int = 200, seed: int = 0, chunk: int = 50, db_weights: np.ndarray | None = None) -> MIGain:
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
    The histograms of all resamples are one matrix product per distance value and class:
    (anchors x items) 0/1 masks times the (items x resamples) weights.
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
    off = ~np.eye(n, dtype=bool)
    nbr = neighbour_matrix(labels)
    pos, neg = nbr & off, ~nbr & off
    d_live = hamming_matrix(query_codes, live_codes)
    d_cand = hamming_matrix(query_codes, candidate_codes[ch])
    uc = ~ch
    rng = np.random.default_rng(seed)
    # column 0: every item once (the point estimate); then the bootstrap resamples
    weights = np.concatenate([np.ones((n, 1)), rng.multinomial(n, np.full(n, 1.0 / n), size=max(n_boot, 0)).T], axis=1)
    weights = weights.astype(np.float32)
    live_mi, cand_mi = [], []
    for b0 in range(0, weights.shape[1], chunk):
        w = weights[:, b0:b0 + chunk]
        if db_weights is not None:
            w = w * np.asarray(db_weights, np.float32)[:, None]
        w_u, w_c = w[uc], w[ch]
        shape = (n, bits + 1, w.shape[1])
        hists = {k: np.zeros(shape, np.float32) for k in ("lp", "ln", "cp", "cn")}
        for d in range(bits + 1):
            eq_u = d_live[:, uc] == d
            shared_p = (eq_u & pos[:, uc]).astype(np.float32) @ w_u
            shared_n = (eq_u & neg[:, uc]).astype(np.float32) @ w_u
            eq_l, eq_c = d_live[:, ch] == d, d_cand == d
            hists["lp"][:, d] = shared_p + (eq_l & pos[:, ch]).astype(np.float32) @ w_c
            hists["ln"][:, d] = shared_n + (eq_l & neg[:, ch]).astype(np.float32) @ w_c
            hists["cp"][:, d] = shared_p + (eq_c & pos[:, ch]).astype(np.float32) @ w_c
            hists["cn"][:, d] = shared_n + (eq_c & neg[:, ch]).astype(np.float32) @ w_c
        # (n, nb, b) -> (n, b, nb) for the entropies over distances
        live_mi.append(_mi_from_histograms(hists["lp"].transpose(0, 2, 1).astype(np.float64),
                                           hists["ln"].transpose(0, 2, 1).astype(np.float64)))
        cand_mi.append(_mi_from_histograms(hists["cp"].transpose(0, 2, 1).astype(np.float64),
                                           hists["cn"].transpose(0, 2, 1).astype(np.float64)))
    live_all, cand_all = np.concatenate(live_mi, axis=1), np.concatenate(cand_mi, axis=1)  # (n, 1 + n_boot)
    qw = weights.astype(np.float64)
    live_q = (qw * live_all).sum(0) / qw.sum(0)
    cand_q = (qw * cand_all).sum(0) / qw.sum(0)
    gains = cand_q - live_q
    sigma = float(gains[1:].std()) if n_boot > 0 else 0.0
    return MIGain(float(live_q[0]), float(cand_q[0]), float(gains[0]), sigma, n, changed)


def mi_quality(codes: np.ndarray, labels: Sequence | np.ndarray, bits: int) -> float:
    """Q = mean over anchors of I(D; C) for packed codes and their labels (ints, label sets or multi-hot)."""
    per = mi_per_anchor(codes, labels, bits)
    return float(per.mean()) if len(per) else 0.0
