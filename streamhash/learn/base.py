"""The learner contract: what the rest of streamhash asks of an incremental learner, and nothing more.

Exactly the calls made on a learner by :class:`~streamhash.learn.online.OnlineHasher` (the learner
process, through :mod:`streamhash.services.learner` and the shard feed, reaches the learner only
through it) and by ``streamhash eval`` (:mod:`streamhash.eval.methods`, which also starts learners from
one saved state). :class:`~streamhash.learn.dihn.DIHNLearner` is one; ``tests/learn/learner_checks.py``
is the behaviour every learner must show, run against DIHN and a minimal learner written in the tests.

Items are keyed by id (str or int) and carry a packed code ((n, bits/8) uint8) and a label set (an int,
an iterable of ints, or None / empty: unlabeled). A code is *frozen* (old: learning never changes it) or
*pending* (a labeled item whose code the next round learns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from streamhash.model.hashnet import HashNet

FetchImages = Callable[[list], np.ndarray]  # ids -> their uint8 images, in order


@dataclass(frozen=True)
class RoundResult:
    """What one learning round produced."""

    ids: list  # the items whose codes were learned this round (were pending, now frozen)
    codes: np.ndarray  # their packed codes (n, bits/8) uint8, aligned with ids
    changed: int  # how many of those codes differ from the ones they had before the round
    loss: float  # mean training loss of the last epoch (nan: nothing trained)
    seconds: float
    iterations: int
    omega: int  # items trained on (DIHN's |Omega|)
    round: int  # 1-based round counter


@runtime_checkable
class IncrementalHasher(Protocol):
    """An incremental learner of binary codes. Behaviour (checked by ``tests/learn/learner_checks.py``):

    - a code added comes back from :meth:`codes` as given (a re-added id: its latest code);
    - :meth:`learn_round` changes only pending codes, learns every pending one and freezes it;
    - :meth:`set_codes` replaces codes and freezes them; :meth:`quarantine_pending` freezes the pending
      ones as they are, out of learning for good;
    - :meth:`encode` is a function of the network alone (same images, same codes; batch-independent);
    - ``type(learner).from_bytes(learner.to_bytes())`` is the same learner.
    """

    bits: int
    net: HashNet  # the network :meth:`encode` uses; the learner process publishes it after each round

    @property
    def n_pending(self) -> int: ...

    @property
    def pending_ids(self) -> list: ...

    def add_items(self, ids: Sequence, codes: np.ndarray, labels=None, *, frozen: bool = True,
                  held: np.ndarray | None = None) -> None:
        """Register items. ``frozen=False``: labeled ones become pending (unlabeled ones are always frozen).
        ``held`` (a bool per item): learned like the others, but their images never train the network."""

    def learn_round(self, fetch_images: FetchImages, *, iters: int | None = None,
                    should_stop: Callable[[], bool] | None = None) -> RoundResult:
        """Learn the pending codes (``iters`` overrides the learner's own budget); ``should_stop()`` True
        abandons the round by raising (the learner may be left mid-round: the process is exiting)."""

    def codes(self, ids: Sequence) -> np.ndarray: ...

    def set_codes(self, ids: Sequence, codes: np.ndarray) -> None: ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def quarantine_pending(self) -> list:
        """Freeze the pending items with their current codes, out of learning for good; returns their ids."""

    def forget(self, ids: Sequence) -> int:
        """Items removed from the index (tombstones): never pending, never fetched, out of every later round (their
        labels and codes teach nothing more); unknown ids are ignored. Returns how many were known."""

    def to_bytes(self) -> bytes: ...

    @classmethod
    def from_bytes(cls, raw: bytes) -> IncrementalHasher: ...
