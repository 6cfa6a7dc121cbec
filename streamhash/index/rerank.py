"""Two-stage search: Hamming candidates, then ordered by what the items look like (issue 23 item 6).

Learning gives every item of a class (nearly) the same code, so a Hamming search alone returns its class at one
distance, ties in index order: a classifier's answer, not the most similar photos. The query server therefore
takes more Hamming hits than asked (``server.rerank_candidates``, at least k) and orders them by distance, then,
within one distance, by a vote of the query's look-alikes, then by the cosine between the query's feature and each
candidate's stored feature (what the network's frozen part gave its image: ``Store.features``); the first k are
returned, each keeping its Hamming distance. The vote: the ``VOTERS`` labelled candidates of that distance most
similar to the query each vote for their labels, and a candidate ranks by the most votes any of its labels got (one
without labels as the most voted label: it cannot be told apart). Hamming distance stays the first key, so
re-ranking never moves an item past a closer code; it only orders the ties that learning created. Within a tie of
several classes the cosine alone puts the query's look-alikes first whatever their class, which lowered mAP@all on
CIFAR-10 (0.80204 -> 0.80193); the vote first keeps the class most of them share together. Measured
(``benchmarks/photos_rerank.py``, ``benchmarks/journal/2026-12-07-rerank-order.md``) at 1,000 candidates, mAP@all
rose in the five learnings tried (+0.00004 to +0.00172; the cosine alone: -0.00091 to +0.00040) with the top-10
feature overlap within 0.002 of the cosine alone's. A measurement, not a guarantee: a vote that picks the wrong
class of a tie lowers that query's AP, and at 100-200 candidates mAP fell in 2 of 10 cases (by <= 0.00008). Only
candidates are scored: the exact order among all the items at the k-th hit's distance needs
``rerank_candidates`` at least their count.

The vector compared is the stored input itself where it is a vector (the pooled feature, cut ``pooled``), or the
stored activation averaged over space where the network is cut earlier (``(C, H, W)`` -> ``C``): a cheap view of
what the image looks like that needs no network run per candidate. A candidate without a stored feature (written
before its shard kept any) or with one of another shape does not vote and comes after the scored ones of its vote.

Without a feature for the query there is nothing to compare: a search by ``code_hex``, or over shards whose
network is trained end to end (it stores the image, not a feature) keeps Hamming order and says why. A router
merging several servers' answers orders them by distance then similarity (:func:`merge_key`): each server's vote
is its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

VOTERS = 10  # the most similar labelled candidates of a distance whose labels vote (journal: 10 and 30 measured)


def vectors(stored: np.ndarray) -> np.ndarray:
    """Stored inputs (n, *shape) -> (n, d) float32 rows of unit length (a zero row stays zero): a 1-d feature as it
    is, an activation (n, C, H, W) averaged over its spatial axes."""
    # torch casts float16 several times faster than numpy's loop; on one thread: beside other work its thread pool
    # stalled (1000 x 1280 here: 0.8 ms on one thread, 87 ms on two, numpy's cast 12.5 ms)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this thread's setting (OpenMP's is per thread), put back below
    try:
        # a read-only array (LMDB's buffer) is copied: torch warns on one it cannot write, and it would not write
        x = torch.from_numpy(np.ascontiguousarray(stored if stored.flags.writeable else stored.copy())).float()
        if x.ndim > 2:
            x = x.flatten(2).mean(dim=2)
        return (x / x.norm(dim=1, keepdim=True).clamp_min(1e-30)).numpy()
    finally:
        torch.set_num_threads(threads)


def similarities(query: np.ndarray, stored: Sequence[np.ndarray | None]) -> np.ndarray:
    """Cosine between the query's stored input and each candidate's (float64 (n,)); NaN where a candidate has
    none or one of another shape."""
    q = vectors(np.asarray(query)[None])[0]
    out = np.full(len(stored), np.nan)
    same = [i for i, s in enumerate(stored) if s is not None and s.shape == query.shape]
    if same:
        # einsum: one thread; a BLAS matrix-vector product beside other work stalled on its threads (31 ms vs 0.15)
        out[same] = np.einsum("ij,j->i", vectors(np.stack([stored[i] for i in same])), q)
    return out


def votes(distances: Sequence[int], sims: np.ndarray, labels: Sequence[Sequence[int] | None]) -> np.ndarray:
    """Each candidate's vote count (float64 (n,)): at each distance, the ``VOTERS`` labelled candidates with the
    highest similarity (ties: candidate order; NaN: none) vote for their labels; a candidate gets the most votes of
    any of its labels, one without labels the most any label got."""
    d = np.asarray(distances)
    out = np.zeros(len(d))
    for dv in np.unique(d):
        group = np.flatnonzero(d == dv)
        labs = [labels[i] for i in group.tolist()]
        able = group[np.array([bool(y) for y in labs], bool) & ~np.isnan(sims[group])]
        voters = able[np.argsort(-sims[able], kind="stable")[:VOTERS]].tolist()
        counts = Counter(y for i in voters for y in set(labels[i]))
        top, get = max(counts.values(), default=0), counts.__getitem__  # a Counter's missing label: 0
        out[group] = [max(map(get, y)) if y else top for y in labs]
    return out


def order(distances: Sequence[int], sims: np.ndarray, labels: Sequence[Sequence[int] | None] | None = None
          ) -> np.ndarray:
    """Candidate indices by Hamming distance, then :func:`votes` (most first; ``labels`` None: no vote), then
    similarity (highest first, NaN last), then candidate order."""
    sims = np.asarray(sims, dtype=np.float64)
    key = np.where(np.isnan(sims), np.inf, -sims)
    vote = np.zeros(len(sims)) if labels is None else -votes(distances, sims, labels)
    return np.lexsort((np.arange(len(sims)), key, vote, np.asarray(distances)))


@dataclass(frozen=True)
class Rerank:
    """One search's second stage: the query's stored input (None: Hamming order alone, for ``note``'s reason) and
    how many Hamming hits to take for it."""

    query: np.ndarray | None
    candidates: int
    note: str | None = None

    @classmethod
    def plan(cls, feature: np.ndarray | None, k: int, candidates: int, reason: str | None = None) -> Rerank:
        """``candidates``: the setting (0: off); ``reason``: why the query has no feature, if it has none."""
        if candidates <= 0:
            return cls(None, k, "re-ranking is off (server.rerank_candidates = 0)")
        if feature is None:
            return cls(None, k, reason or "no stored feature for the query (its shards' network is trained end to "
                                           "end: it keeps the image, not a feature)")
        return cls(np.asarray(feature), max(k, candidates))

    def apply(self, hits: list[dict], view, k: int) -> tuple[list[dict], dict]:
        """The first ``k`` of ``hits`` (Hamming-ranked, at most :attr:`candidates`) in the two-stage order, each
        with its ``similarity`` (None: not scored), and the response's fields saying whether they were re-ranked.
        ``view``: the search's :class:`~streamhash.index.sharded.View` (each shard's features read once)."""
        if self.query is None:
            return hits[:k], {"reranked": False, "rerank_note": self.note}
        if len(hits) > k:  # past the k-th hit's distance none can be among the first k: not read, not scored
            hits = [h for h in hits if h["distance"] <= hits[k - 1]["distance"]]
        stored: list[np.ndarray | None] = [None] * len(hits)
        by_shard: dict[str, list[int]] = {}
        for i, hit in enumerate(hits):
            by_shard.setdefault(hit["shard"], []).append(i)
        for name, rows in by_shard.items():
            v = view.by_name(name)
            if v is not None:
                for i, got in zip(rows, v.shard.store.features([hits[i]["id"] for i in rows])):
                    stored[i] = got
        sims = similarities(self.query, stored)
        out = []
        for i in order([h["distance"] for h in hits], sims, [h.get("labels") for h in hits])[:k].tolist():
            out.append({**hits[i], "similarity": None if np.isnan(sims[i]) else round(float(sims[i]), 6)})
        return out, {"reranked": True, "rerank_note": None}


def merge_key(hit: dict) -> tuple:
    """A router's merge of re-ranked answers (sorted stably by this key): distance, then similarity, highest first
    (a hit without one after those with one), the servers' own order after that. The vote (:func:`votes`) is not
    redone across servers: a hit carries no count, and the merged top k are not the candidates that voted."""
    s = hit.get("similarity")
    return (hit["distance"], -s if s is not None else np.inf)


def merged_fields(bodies: Sequence[dict]) -> dict:
    """``reranked`` of a merged answer: true when every server re-ranked its own; else the first reason given."""
    if bodies and all(b.get("reranked") for b in bodies):
        return {"reranked": True, "rerank_note": None}
    return {"reranked": False, "rerank_note": next((b["rerank_note"] for b in bodies if b.get("rerank_note")),
                                                   "a server behind the router did not re-rank")}
