"""A method's database in ``streamhash eval``: a real LMDB shard in a temporary folder, written as the
processes write one. Arrivals are written as a worker writes a batch (the image as ``.npy`` bytes, the
code the current network gives it, the model version that inferred it); a round's learned codes as a
worker applies the learner's (``put_codes``: learned, kept by every re-encode); a re-encode is the
worker's own (:func:`streamhash.index.reencode.shard_builder`: the generation builder, which copies
learned and up-to-date codes and decodes and encodes only the stale inferred items' blobs).

Item ids are the dataset indices as decimal strings (the store's keys are strings).
"""

from __future__ import annotations

import io

import numpy as np

from streamhash.index.reencode import shard_builder
from streamhash.index.store import ItemWrite, Store
from streamhash.records import ImageSpec


def ids_of(idx) -> list[str]:
    return [str(int(i)) for i in np.asarray(idx).tolist()]


def npy_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(image, np.uint8), allow_pickle=False)
    return buf.getvalue()


class EvalShard:
    """``images``/``labels``/``labeled``: the stream's arrays, addressed by dataset index."""

    def __init__(self, path, bits: int, images: np.ndarray, labels: np.ndarray, labeled: np.ndarray,
                 features: dict | None = None):
        # ``features``: a frozen network's feature spec; ``images`` are then its stored inputs, kept as the items'
        # features (as a worker keeps them beside the blob, which the eval has not: empty) and read by re-encodes
        self.store = Store(path, bits=bits, initial_map_size=16 << 20, features=features,
                           backbone=features["backbone"] if features else None)
        self.bits, self.images, self.labels, self.labeled = bits, images, labels, labeled
        self.features = features
        h, w = (1, 1) if features else images.shape[1:3]
        self.spec = ImageSpec(h, w, 1 if features or images.ndim == 3 else images.shape[3])

    def write(self, idx, codes: np.ndarray, model_version: int) -> None:
        """Items arriving (or sent again), with the codes network ``model_version`` inferred."""
        idx = np.asarray(idx, np.int64)
        feature = (lambda i: np.asarray(self.images[i], np.float16).tobytes()) if self.features else (lambda i: None)
        blob = (lambda i: b"") if self.features else (lambda i: npy_bytes(self.images[i]))
        items = [ItemWrite(str(i), codes[k].tobytes(), blob(i), "application/x-npy",
                           (int(self.labels[i]),) if self.labeled[i] else None, ts=0.0, feature=feature(i))
                 for k, i in enumerate(idx.tolist())]
        for s in range(0, len(items), 2048):
            self.store.write_batch(items[s:s + 2048], model_version=model_version)

    def learned(self, ids, codes: np.ndarray, model_version: int) -> None:
        """A round's learned codes, applied (the item's seq matches: nothing was written since the round read it)."""
        self.store.put_codes(list(ids), np.asarray(codes, np.uint8), model_version=model_version)

    def reencode(self, net, model_version: int) -> int:
        """The worker's selective re-encode to ``net`` (published as ``model_version``); returns images re-encoded."""
        self.store.put_model(net.to_bytes(), version=model_version)
        builder = shard_builder(self.store, net, self.spec)  # in the worker's steps (64 images)
        builder.build(model_version)
        builder.drop_replaced()
        return builder.images_reencoded

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset indices, codes, learned) of every stored item."""
        snap = self.store.snapshot()
        return np.array([int(i) for i in snap.ids], np.int64), snap.codes, snap.learned

    def close(self) -> None:
        self.store.close()
