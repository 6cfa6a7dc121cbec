"""The streams the methods are compared on: which images are queries, which form the initial database
D0, which arrive in which chunk, which carry a label, and what the database is at each step.

Queries: ``queries_per_class`` per class (seeded), never in the database. Labels: an item is labeled
with probability ``labeled_fraction`` (seeded, the same items for every method); the others arrive
unlabeled and keep the codes the network gives them. A labeled query and database item are relevant
when their classes are equal.

* ``class-incremental`` (DIHN's): R = the 69,000 non-query Fashion-MNIST images. D0 = R's classes 0-6;
  the stream = R's classes 7-9, shuffled, in ``chunks`` chunks. Database = D0 + the chunks so far.
* ``online`` (the online-hashing literature's): the stream = the first ``stream`` items of a shuffle of
  R in chunks of ``chunk_size``, the first chunk playing D0. The database is always all of R: items not
  streamed yet are encoded by the method's current network when it is evaluated.
* ``partial-labels``: the stream = ``stream`` / 2 items of R's classes 0-4, shuffled, then as many of
  classes 5-9, in chunks of ``chunk_size``, the first chunk playing D0; 25% labeled by default.
  Database = the items streamed so far. The second half brings classes the network has never seen,
  so the codes it gave the first half's unlabeled items go stale.
* ``domain-shift``: ``stream`` / 2 Fashion-MNIST items of R, then scikit-learn's 8x8 digits upscaled to
  28x28 (:mod:`streamhash.data.digits`, labels 10-19, 20 queries per class, the other 1,597 streamed),
  in chunks of ``chunk_size``, the first playing D0; 25% labeled by default. Database = streamed so far.
* ``cold-start``: as ``online`` but the network starts untrained (no initial model: the first chunk
  is learned by the first round) and the database = the items streamed so far; 25% labeled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PROTOCOLS = ("class-incremental", "online", "partial-labels", "domain-shift", "cold-start")
DEFAULT_LABELED = {"class-incremental": 1.0, "online": 1.0, "partial-labels": 0.25, "domain-shift": 0.25,
                   "cold-start": 0.25}
DIGITS_QUERIES_PER_CLASS = 20


@dataclass(frozen=True)
class Stream:
    images: np.ndarray  # (n, ...) what the network reads per item (stored inputs), every index below refers to
    labels: np.ndarray  # (n,) int64
    labeled: np.ndarray  # (n,) bool: whether the item arrives with its label
    queries: np.ndarray  # indices
    d0: np.ndarray  # the initial database (empty for cold-start: its first chunk is chunks[0])
    chunks: list  # arrays of indices, in arrival order
    everything: np.ndarray | None  # the database when it is "all of R" (online), else None: what has arrived
    train_initial: bool  # whether D0's labeled items train the shared initial model
    # ModelSettings overrides of the network ``images`` are stored inputs for (CIFAR-10: streamhash.eval.cifar.MODEL);
    # empty: the default network (Fashion-MNIST's 28x28 images)
    model: dict = field(default_factory=dict)

    def arrivals(self) -> list:
        """What arrives, chunk by chunk, in order: D0 (where the protocol has one), then the chunks."""
        return ([self.d0] if len(self.d0) else []) + list(self.chunks)


def split_queries(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    q = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
                                for c in np.unique(labels)]))
    rest = np.ones(len(labels), bool)
    rest[q] = False
    return q, np.flatnonzero(rest)


def cut(order: np.ndarray, size: int) -> list:
    return [order[i:i + size] for i in range(0, len(order), size)]


def make_stream(protocol: str, images: np.ndarray, labels: np.ndarray, *, seed: int = 0, queries_per_class: int = 100,
                retrieval_limit: int | None = None, chunks: int = 5, stream: int = 20_000, chunk_size: int = 2_000,
                labeled_fraction: float | None = None, digits=None) -> Stream:
    """``digits``: (images, labels) of the second domain (``domain-shift`` only)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    rng = np.random.default_rng(seed)
    q, r = split_queries(labels, queries_per_class, rng)
    rng = np.random.default_rng(seed + 1)
    if retrieval_limit and retrieval_limit < len(r):
        r = np.sort(rng.choice(r, retrieval_limit, replace=False))
    everything, train_initial = None, True
    if protocol == "class-incremental":
        d0 = r[labels[r] < 7]
        parts = np.array_split(rng.permutation(r[labels[r] >= 7]), chunks)
    elif protocol in ("online", "cold-start"):
        parts = cut(rng.permutation(r)[:stream], chunk_size)
        d0, parts = (parts[0], parts[1:]) if protocol == "online" else (np.zeros(0, np.int64), parts)
        everything = r if protocol == "online" else None
        train_initial = protocol == "online"
    elif protocol == "partial-labels":
        half = stream // 2
        order = np.concatenate([rng.permutation(r[labels[r] < 5])[:half], rng.permutation(r[labels[r] >= 5])[:half]])
        d0, *parts = cut(order, chunk_size)
    else:  # domain-shift
        if digits is None:
            raise ValueError("domain-shift needs the second dataset (digits=(images, labels))")
        d_images, d_labels = digits
        offset = len(images)
        dq, dr = split_queries(d_labels, min(DIGITS_QUERIES_PER_CLASS, queries_per_class), rng)
        images = np.concatenate([images, d_images])
        labels = np.concatenate([labels, d_labels + 10])  # classes of their own: a digit is not a garment
        q = np.concatenate([q, dq + offset])
        order = np.concatenate([rng.permutation(r)[:stream // 2], rng.permutation(dr + offset)])
        d0, *parts = cut(order, chunk_size)
    fraction = DEFAULT_LABELED[protocol] if labeled_fraction is None else float(labeled_fraction)
    labeled = np.random.default_rng(seed + 2).random(len(labels)) < fraction
    return Stream(images, labels, labeled, q, np.asarray(d0, np.int64), [np.asarray(p, np.int64) for p in parts],
                  everything, train_initial)
