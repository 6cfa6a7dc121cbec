"""Uniform reservoir sample of a stream (Vitter's algorithm R), seeded.

After ``t`` offered items every one of them is in the sample with probability ``capacity / t``.
Items are kept as ``(id, payload)``; the learner stores label sets as payload and fetches the images
by id when it needs them (the LMDB blobs back them in the worker).

>>> r = Reservoir(3, seed=0)
>>> for i in range(10):
...     _ = r.update(f"id{i}", i % 2)
>>> len(r), r.seen
(3, 10)
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Reservoir:
    def __init__(self, capacity: int, seed: int = 0):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = int(capacity)
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self.ids: list = []
        self.payloads: list[Any] = []

    def __len__(self) -> int:
        return len(self.ids)

    def update(self, item_id, payload: Any = None) -> int | None:
        """Offer one item; returns the slot it took, or None when it was not kept."""
        self.seen += 1
        if len(self.ids) < self.capacity:
            self.ids.append(item_id)
            self.payloads.append(payload)
            return len(self.ids) - 1
        j = int(self._rng.integers(0, self.seen))  # uniform in [0, seen)
        if j < self.capacity:
            self.ids[j] = item_id
            self.payloads[j] = payload
            return j
        return None

    def discard(self, ids) -> int:
        """Drop these ids from the sample (items removed from the index); returns how many were in it. The slots
        they free are filled by the next items offered."""
        gone = set(ids)
        keep = [k for k, i in enumerate(self.ids) if i not in gone]
        dropped = len(self.ids) - len(keep)
        if dropped:
            self.ids = [self.ids[k] for k in keep]
            self.payloads = [self.payloads[k] for k in keep]
        return dropped

    def update_many(self, ids, payloads=None) -> None:
        payloads = [None] * len(ids) if payloads is None else payloads
        for i, p in zip(ids, payloads):
            self.update(i, p)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "ids": list(self.ids),
                "payloads": list(self.payloads), "rng": self._rng.bit_generator.state}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Reservoir":
        r = cls(state["capacity"])
        r.seen = state["seen"]
        r.ids = list(state["ids"])
        r.payloads = list(state["payloads"])
        r._rng.bit_generator.state = state["rng"]
        return r
