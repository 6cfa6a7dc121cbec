"""Protocols the learning parts satisfy (river-style), for type hints and alternative learners."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class IncrementalHasher(Protocol):
    """What :class:`~streamhash.learn.online.OnlineHasher` asks of its learner (DIHNLearner is one)."""

    bits: int
    net: object
    n_pending: int

    def add_items(self, ids: Sequence, codes, labels=None, *, frozen: bool = True, held=None) -> None: ...

    def learn_round(self, fetch_images: Callable[[list], np.ndarray] | None = None): ...

    def codes(self, ids: Sequence | None = None) -> np.ndarray: ...

    def set_codes(self, ids: Sequence, codes) -> None: ...

    def reencode(self, fetch_images: Callable[[list], np.ndarray] | None = None, ids: Sequence | None = None): ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def quarantine_pending(self) -> list: ...


@runtime_checkable
class DriftDetector(Protocol):
    def update(self, x: float): ...

    @property
    def drift_detected(self) -> bool: ...
