"""When a round that restarts the hash head has learned enough: the hold-out's retrieval stops improving.

The hold-out (labeled items the network never trains on, :class:`streamhash.learn.items.ItemBook`'s ``held``) is the
learner's validation set: its images, encoded by the network being trained, query the learned codes of the other
labeled items, and mAP@all (:func:`streamhash.eval.metrics.retrieval_metrics`, label sets intersecting) scores the
ranking. A restarted head climbs for a number of alternations that depends on the stream (11 to 23 on the eval's shift to
digits, 14 to 19 on its class shift within Fashion-MNIST) and the score is noisy (dips of 0.01-0.03 between
alternations), so the round ends when three in a row bring no new best, not at a count fixed in advance: over 12
streams, 0.005 mAP closer to a retrain on average than a fixed 2 x ``iters`` and 0.013 closer than a patience of two
(benchmarks/journal/2026-12-07-head-restart.md).

>>> scores = iter([0.5, 0.6, 0.7, 0.65, 0.69, 0.66])
>>> stop = Plateau(lambda: next(scores), least=2, patience=2)
>>> [stop() for _ in range(5)]
[False, False, False, False, True]
>>> stop.best, stop.trace
(0.7, [0.5, 0.6, 0.7, 0.65, 0.69])
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

MAX_QUERIES = 500  # hold-out images encoded after each alternation: the check's cost stays a small part of one
MAX_DATABASE = 20_000  # learned codes ranked per query (codes only, no image read)


class Plateau:
    """``until`` for :meth:`~streamhash.learn.dihn.DIHNLearner.learn_round`: True after at least ``least``
    alternations once ``score()`` has not beaten its best for ``patience`` alternations in a row."""

    def __init__(self, score: Callable[[], float], *, least: int, patience: int = 3):
        self.score, self.least, self.patience = score, int(least), int(patience)
        self.best, self.since, self.done, self.trace = -np.inf, 0, 0, []

    def __call__(self) -> bool:
        self.done += 1
        s = float(self.score())
        self.trace.append(s)
        if s > self.best:
            self.best, self.since = s, 0
        else:
            self.since += 1
        return self.done >= self.least and self.since >= self.patience


def holdout_map(encode: Callable[[], np.ndarray], held_labels: list, db_codes: Callable[[], np.ndarray],
                db_labels: list, bits: int) -> Callable[[], float]:
    """A ``score`` for :class:`Plateau`: mAP@all of ``encode()`` (the hold-out's codes by the current network)
    against ``db_codes()`` (the learned codes as the round's DCC steps leave them)."""
    # imported here: streamhash.eval.metrics imports streamhash.learn.labels, whose package imports this module
    from streamhash.eval.metrics import retrieval_metrics

    return lambda: retrieval_metrics(encode(), held_labels, db_codes(), db_labels, bits)["map"]


def sample_rows(rows: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, limit, replace=False)) if len(rows) > limit else rows
