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


def mi_per_anchor(codes: np.ndarray, labels, bits: int) -> np.ndarray:
    """Exact I(D; C) for every item of the set as anchor (n,), in nats."""
    codes = np.asarray(codes, dtype=np.uint8)
    n = len(codes)
    if n < 2:
        return np.zeros(n)
    nbr = neighbour_matrix(labels)
    dist = hamming_matrix(codes, codes)
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


def mi_quality(codes: np.ndarray, labels: Sequence | np.ndarray, bits: int) -> float:
    """Q = mean over anchors of I(D; C) for packed codes and their labels (ints, label sets or multi-hot)."""
    per = mi_per_anchor(codes, labels, bits)
    return float(per.mean()) if len(per) else 0.0
