"""Retrieval metrics for Hamming ranking: mAP@all, mAP@k, precision within radius r, precision@k.

Ranking and ties: database items are ordered by Hamming distance with a *stable* sort, so items at
equal distance keep database (index) order. Every metric below uses that one order.

* mAP@all: for a query with R > 0 relevant items in the database,
  AP = (1/R) sum_{ranks r of relevant items} precision@r; queries with R = 0 are left out of the mean.
* mAP@k (ADSH / DIHN convention): AP@k = (1/R_k) sum_{r <= k, relevant} precision@r with R_k the relevant
  items in the top k; a query with R_k = 0 counts 0. Mean over all queries.
* precision within Hamming radius r (distance <= r): relevant retrieved / retrieved; a query that
  retrieves nothing counts 0. Mean over all queries.
* precision@k: relevant items among the first k, divided by k. Mean over all queries.

Relevance: label sets intersect (single labels: equal).

>>> import numpy as np
>>> db = np.array([[0b00000000], [0b00000011], [0b00000001], [0b11111111]], np.uint8)
>>> q = np.array([[0b00000001]], np.uint8)
>>> # distances 1, 1, 0, 7 -> stable order: item 2 (d0, rel), item 0 (d1), item 1 (d1, rel), item 3 (d7)
>>> m = retrieval_metrics(q, [0], db, [1, 0, 0, 1], bits=8, topk=2)
>>> # AP = (1/1 + 2/3)/2; AP@2 = 1/1; radius 2 retrieves items 2, 0, 1 -> 2/3; P@2 = 1/2
>>> round(m["map"], 4), round(m["map_at_k"], 4), round(m["p_r2"], 4), m["p_at_k"]
(0.8333, 1.0, 0.6667, 0.5)
"""

from __future__ import annotations

import numpy as np

from streamhash.learn.labels import label_sets_to_multihot

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def hamming_distances(queries: np.ndarray, db: np.ndarray) -> np.ndarray:
    """Packed (nq, w), (n, w) -> (nq, n) uint16 Hamming distances (byte-wise popcount table)."""
    q = np.asarray(queries, np.uint8)
    d = np.asarray(db, np.uint8)
    out = np.zeros((len(q), len(d)), np.uint16)
    for k in range(q.shape[1]):
        out += _POPCOUNT[q[:, k, None] ^ d[None, :, k]]
    return out


def _relevance(q_labels, db_labels):
    qa, da = np.asarray(q_labels) if not isinstance(q_labels, list) else None, None
    if not isinstance(db_labels, list):
        da = np.asarray(db_labels)
    if (qa is not None and da is not None and qa.ndim == 1 and da.ndim == 1
            and np.issubdtype(qa.dtype, np.integer) and np.issubdtype(da.dtype, np.integer)):
        return lambda s, e: qa[s:e, None] == da[None, :]
    c = None
    qh = label_sets_to_multihot(q_labels)
    dh = label_sets_to_multihot(db_labels)
    c = max(qh.shape[1], dh.shape[1])
    qh = np.pad(qh, ((0, 0), (0, c - qh.shape[1])))
    dh = np.pad(dh, ((0, 0), (0, c - dh.shape[1])))
    return lambda s, e: (qh[s:e] @ dh.T) > 0


def retrieval_metrics(q_codes: np.ndarray, q_labels, db_codes: np.ndarray, db_labels, bits: int,
                      topk: int = 1000, radius: int = 2, batch: int = 64) -> dict:
    """All four metrics in one pass; returns {map, map_at_k, p_r2, p_at_k, k, radius, n_queries, n_db}."""
    nq, n = len(q_codes), len(db_codes)
    rel_fn = _relevance(q_labels, db_labels)
    k = min(topk, n)
    ap_all, ap_k, p_r, p_k = [], [], [], []
    ranks = np.arange(1, n + 1, dtype=np.float64)
    for s in range(0, nq, batch):
        e = min(s + batch, nq)
        dist = hamming_distances(q_codes[s:e], db_codes)
        rel = rel_fn(s, e)
        order = np.argsort(dist, axis=1, kind="stable")
        rs = np.take_along_axis(rel, order, axis=1)
        cum = np.cumsum(rs, axis=1, dtype=np.float64)
        prec = cum / ranks
        n_rel = cum[:, -1]
        has = n_rel > 0
        ap = (prec * rs).sum(1)
        ap_all.append(ap[has] / n_rel[has])
        rk = cum[:, k - 1]
        apk = (prec[:, :k] * rs[:, :k]).sum(1)
        ap_k.append(np.where(rk > 0, apk / np.maximum(rk, 1), 0.0))
        p_k.append(rk / k)
        within = dist <= radius
        n_in = within.sum(1)
        p_r.append(np.where(n_in > 0, (within & rel).sum(1) / np.maximum(n_in, 1), 0.0))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
    a = cat(ap_all)
    return {"map": float(a.mean()) if len(a) else 0.0, "map_at_k": float(cat(ap_k).mean()),
            "p_r2": float(cat(p_r).mean()), "p_at_k": float(cat(p_k).mean()), "k": k, "radius": radius,
            "n_queries": int(nq), "n_queries_with_relevant": int(len(a)), "n_db": int(n)}
