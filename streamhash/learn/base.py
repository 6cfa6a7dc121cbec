"""Protocols the learning parts satisfy (river-style), for type hints and alternative learners."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class IncrementalHasher(Protocol):
    bits: int

    def add_items(self, ids: Sequence, codes, labels=None, *, frozen: bool = True) -> None: ...

    def learn_round(self, fetch_images: Callable[[list], np.ndarray] | None = None): ...

    def learn_many(self, images: np.ndarray, labels, **kw): ...

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def save(self, path) -> None: ...


@runtime_checkable
class DriftDetector(Protocol):
    def update(self, x: float): ...

    @property
    def drift_detected(self) -> bool: ...
