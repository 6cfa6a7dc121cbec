"""One selective re-encode of a shard with a given network: what the worker's re-encoder runs for each shard
it owns, and what ``streamhash eval`` runs on its temporary shards, so that both re-encode the same codes the
same way (:class:`~streamhash.index.store.GenerationBuilder`: learned codes and codes the network inferred
already copied, only stale inferred items decoded from their stored blobs and encoded).
"""

from __future__ import annotations

import numpy as np

from streamhash.index.store import GenerationBuilder
from streamhash.records import ImageSpec, decode_images


def encode_stored(net, blobs, spec: ImageSpec) -> np.ndarray:
    """Codes of stored images; an item removed since the builder listed it (None) gets zeros, which the builder
    never writes (it skips ids gone meanwhile)."""
    codes = np.zeros((len(blobs), net.cfg.bits // 8), np.uint8)
    rows = [i for i, b in enumerate(blobs) if b is not None]
    if rows:
        codes[rows] = net.encode(decode_images([blobs[i] for i in rows], spec))
    return codes


def shard_builder(store, net, spec: ImageSpec, *, chunk: int = 64, pause=lambda: None) -> GenerationBuilder:
    """The builder of a re-encode of ``store`` with ``net``: stale items encoded from their blobs, in ``chunk``s."""
    return GenerationBuilder(store, encode_ids=lambda ids: encode_stored(net, store.get_blobs(ids), spec),
                             encode_blobs=lambda blobs: net.encode(decode_images(blobs, spec)),
                             chunk=chunk, pause=pause)
