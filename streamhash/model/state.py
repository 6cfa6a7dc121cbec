"""The model the ingest path encodes with: one owner, swapped as a whole, never locked while LMDB is busy.

The learner publishes ``(net, version, generation)`` *after* the store committed them; the encoder
reads :meth:`ModelState.current` once per batch and tags the codes with that generation. A batch
encoded just before a re-encode's swap is refused by the store (GenerationChanged) and encoded again
once the new state is published (:meth:`wait_for_generation`). The published network is never
trained in place (the learner trains its own copy), so encoding needs no lock.

>>> from types import SimpleNamespace
>>> state = ModelState(SimpleNamespace(name="net-1"), version=1, generation=1)
>>> state.publish(SimpleNamespace(name="net-2"), version=2, generation=1)
>>> state.current().version, state.current().net.name
(2, 'net-2')
>>> state.wait_for_generation(2, timeout=0.01)
False
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    net: Any  # HashNet; typed loosely so the doctest needs no torch model
    version: int
    generation: int


class ModelState:
    def __init__(self, net, *, version: int, generation: int):
        self._current = Published(net, version, generation)
        self._changed = threading.Condition()

    def current(self) -> Published:
        return self._current  # one reference read: a consistent (net, version, generation)

    def publish(self, net, *, version: int, generation: int) -> None:
        with self._changed:
            self._current = Published(net, version, generation)
            self._changed.notify_all()

    def wait_for_generation(self, generation: int, timeout: float) -> bool:
        """Block until the published generation is at least ``generation``; False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: self._current.generation >= generation, timeout)


def load_or_create(store, model_settings) -> ModelState:
    """The store's current model at its generation, or a freshly seeded network saved as version 1."""
    from streamhash.model.hashnet import HashNet, HashNetConfig, resolve_device

    mc = model_settings
    version, raw = store.get_model()
    device = resolve_device(mc.device)
    if raw is None:
        net = HashNet(HashNetConfig(bits=mc.bits, backbone=mc.backbone, image_size=mc.image_size, channels=mc.channels, seed=mc.seed))
        version = store.put_model(net.to_bytes(), make_current=True)
        log.info("created initial model version %d (%s, %d bits)", version, mc.backbone, mc.bits)
        net = net.to(device)
    else:
        net = HashNet.from_bytes(raw, device)
    return ModelState(net, version=version, generation=int(store.read_meta()["generation"]))
