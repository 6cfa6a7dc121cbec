"""One selective re-encode of a shard with a given network: what the worker's re-encoder runs for each shard
it owns, and what ``streamhash eval`` runs on its temporary shards, so that both re-encode the same codes the
same way (:class:`~streamhash.index.store.GenerationBuilder`: learned codes and codes the network inferred
already copied, only stale inferred items encoded). A network with a frozen backbone encodes them from the
features stored with each item (its head, and the tail after its cut, over them): no image is decoded, the frozen
part never runs again; only an item stored without one (written before its shard kept features) is decoded.
"""

from __future__ import annotations

import numpy as np

from streamhash import metrics as m
from streamhash.index.store import GenerationBuilder
from streamhash.index.store.generations import TXN_ITEMS
from streamhash.records import ImageSpec, decode_images


def encode_stored(net, blobs, spec: ImageSpec) -> np.ndarray:
    """Codes of stored images; an item removed since the builder listed it (None) gets zeros, which the builder
    never writes (it skips ids gone meanwhile)."""
    codes = np.zeros((len(blobs), net.cfg.bits // 8), np.uint8)
    rows = [i for i, b in enumerate(blobs) if b is not None]
    if rows:
        m.STORED_IMAGES_DECODED.labels(purpose="reencode").inc(len(rows))
        codes[rows] = net.encode_images(decode_images([blobs[i] for i in rows], spec))
    return codes


def encode_ids(net, store, ids: list[str], spec: ImageSpec) -> np.ndarray:
    """Codes of stored items by id: from their stored features where the network has a frozen part and the item
    has one, else from their blobs (:func:`encode_stored`)."""
    if not net.frozen:
        return encode_stored(net, store.get_blobs(ids), spec)
    feats = store.features(ids)
    have = [i for i, f in enumerate(feats) if f is not None]
    codes = np.zeros((len(ids), net.cfg.bits // 8), np.uint8)
    if have:
        codes[have] = net.encode(np.stack([feats[i] for i in have]))
    if len(have) < len(ids):
        lack = [i for i, f in enumerate(feats) if f is None]
        codes[lack] = encode_stored(net, store.get_blobs([ids[i] for i in lack]), spec)
    return codes


def shard_builder(store, net, spec: ImageSpec, *, chunk: int = 64, pause=lambda: None) -> GenerationBuilder:
    """The builder of a re-encode of ``store`` with ``net``: stale items encoded from their stored features or
    blobs (:func:`encode_ids`), in ``chunk``s."""
    if net.frozen and not any(True for _ in net.backbone.tail.parameters()):
        # the head alone over stored features: 256 items a step cost less than 64 images did, and the builder's
        # transactions (TXN_ITEMS) are no longer split in four
        chunk = max(chunk, TXN_ITEMS)

    def from_blobs(blobs):
        m.STORED_IMAGES_DECODED.labels(purpose="reencode").inc(len(blobs))
        return net.encode_images(decode_images(blobs, spec))

    return GenerationBuilder(store, encode_ids=lambda ids: encode_ids(net, store, ids, spec), encode_blobs=from_blobs,
                             encode_features=net.encode if net.frozen else None, chunk=chunk, pause=pause)
