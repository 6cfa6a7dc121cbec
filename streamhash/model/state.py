"""Which network encodes for a shard: the version its meta names, loaded once per process and shared.

Version 1 is the seeded initial network, built the same way by every process from the model
settings (so workers, the learner and query servers agree on it without a message); the learner
publishes versions 2, 3, ... on ``streamhash.models``, and each worker stores them in its shards under
the same numbers. A published network is never trained in place (the learner trains its own copy),
so encoding needs no lock.

>>> cache = NetCache(loader=lambda version: f"net-{version}")
>>> cache.get(3), cache.get(3) is cache.get(3)
('net-3', True)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def initial_net(mc):
    """The seeded version-1 network of these model settings (deterministic: the same bytes in every process)."""
    from streamhash.model.hashnet import HashNet, HashNetConfig

    return HashNet(HashNetConfig(bits=mc.bits, backbone=mc.backbone, image_size=mc.image_size, channels=mc.channels,
                                 seed=mc.seed, cut=getattr(mc, "cut", ""), input_size=getattr(mc, "input_size", 0)))


_FEATURE_SPECS: dict[tuple, dict | None] = {}


def feature_spec(mc) -> dict | None:
    """What a shard keeps per item for the networks of these model settings (``HashNet.feature_spec``: the frozen
    part's output, or None for a network trained end to end); the same for every version, so built once."""
    key = (mc.backbone, getattr(mc, "cut", ""), getattr(mc, "input_size", 0), mc.image_size, mc.channels)
    if key not in _FEATURE_SPECS:
        _FEATURE_SPECS[key] = initial_net(mc).feature_spec()
    return _FEATURE_SPECS[key]


def ensure_model(store, mc) -> int:
    """The store's current model version; a new store gets the seeded initial network as version 1."""
    version, raw = store.get_model()
    if raw is None:
        version = store.put_model(initial_net(mc).to_bytes(), make_current=True, version=1)
        log.info("%s: initial model version %d (%s, %d bits)", store.path, version, mc.backbone, mc.bits)
    return version


def checked_model(announcement, mc, device="cpu"):
    """``announcement`` with its network loaded, if the network fits these model settings and encodes a probe;
    else :class:`~streamhash.errors.InternalRecordRejected` (stage ``models``) saying why. What every reader of
    the models topic runs before it adopts a version: a shard only ever stores a network that works."""
    import dataclasses

    import numpy as np

    from streamhash.errors import InternalRecordRejected
    from streamhash.model.hashnet import HashNet

    def bad(reason: str) -> InternalRecordRejected:
        return InternalRecordRejected("models", f"model version {announcement.version}: {reason}")

    try:
        net = HashNet.from_bytes(announcement.raw, device)
    except Exception as exc:  # noqa: BLE001  (torch.load and load_state_dict raise many kinds on forged bytes)
        raise bad(f"the network does not load: {type(exc).__name__}: {str(exc)[:200]}") from None
    want = {"bits": mc.bits, "backbone": mc.backbone, "image_size": mc.image_size, "channels": mc.channels,
            "cut": getattr(mc, "cut", ""), "input_size": getattr(mc, "input_size", 0)}
    got = {k: getattr(net.cfg, k) for k in want}
    if got != want:
        raise bad(f"the network is {got}, this index is {want}")
    probe = np.random.default_rng(0).integers(0, 256, (2, mc.image_size, mc.image_size, mc.channels), np.uint8)
    try:
        real = net.encode_real(probe.squeeze(-1) if mc.channels == 1 else probe)
    except Exception as exc:  # noqa: BLE001
        raise bad(f"the network does not encode a probe image: {type(exc).__name__}: {str(exc)[:200]}") from None
    if real.shape != (2, mc.bits) or not np.isfinite(real).all():
        raise bad(f"the network's output on a probe image is {real.shape}, finite={bool(np.isfinite(real).all())}")
    return dataclasses.replace(announcement, net=net)


def stored_net(stores, version: int, device="cpu"):
    """The network stored under ``version`` in the first of ``stores`` that holds it; LookupError if none does
    (a version is the same network in every shard that has it)."""
    from streamhash.model.hashnet import HashNet

    for store in stores:
        raw = store.get_model(version)[1]
        if raw is not None:
            return HashNet.from_bytes(raw, device)
    raise LookupError(f"model version {version} is not stored in any of these shards yet")


class NetCache:
    """version -> network, loaded on first use by ``loader(version)``; the newest few are kept."""

    def __init__(self, loader: Callable[[int], object], keep: int = 4):
        self.loader, self.keep = loader, keep
        self._nets: dict[int, object] = {}
        self._lock = threading.Lock()

    def get(self, version: int):
        with self._lock:
            net = self._nets.get(version)
        if net is None:
            net = self.loader(version)  # outside the lock: loading a network takes milliseconds
            with self._lock:
                net = self._nets.setdefault(version, net)
                for old in sorted(self._nets)[:-self.keep]:
                    del self._nets[old]
        return net
