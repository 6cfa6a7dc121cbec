"""What the demo sends and searches with: the stream (the first ``limit`` images of a seeded shuffle of the
training images, :data:`LATE_CLASS` last, a seeded :data:`UNLABELED_SHARE` of them unlabeled), the malformed
messages beside it, and the held-out test images it queries with."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamhash.config import Settings
from streamhash.data.fashion_mnist import load_split
from streamhash.records import encode_npy, encode_png

# (key, value, headers, stage the worker must report): one per rejection reason of the contract.
MALFORMED = [
    (b"bad-bytes", b"this is not an image", [("content-type", b"image/png")], "decode"),
    (b"bad-empty", b"", [("content-type", b"image/png")], "value"),
    (None, encode_png(np.zeros((28, 28), np.uint8)), [("labels", b"1")], "key"),
    (b"k" * 300, encode_png(np.zeros((28, 28), np.uint8)), [], "key"),
    (b"bad-shape", encode_png(np.zeros((30, 30), np.uint8)), [("labels", b"1")], "shape"),
    (b"bad-channels", encode_npy(np.zeros((28, 28, 3), np.uint8)), [("labels", b"1")], "shape"),
    (b"bad-labels", encode_png(np.zeros((28, 28), np.uint8)), [("labels", b"1,-2")], "headers"),
    (b"bad-ctype", encode_png(np.zeros((28, 28), np.uint8)), [("content-type", b"image/gif")], "headers"),
]

UNLABELED_SHARE = 0.25  # of the stream, sent without a labels header
LATE_CLASS = 9  # Ankle boot: every one of its images comes after all the others


def stream_order(labels: np.ndarray, seed: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` of a seeded shuffle of the training images, :data:`LATE_CLASS` moved to the end, and
    which of them are sent unlabeled (a seeded :data:`UNLABELED_SHARE`)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))[:limit]
    order = np.concatenate([order[labels[order] != LATE_CLASS], order[labels[order] == LATE_CLASS]])
    return order, rng.random(len(order)) < UNLABELED_SHARE


@dataclass
class Stream:
    """What the demo sends and asks: the first ``limit`` training images in :func:`stream_order` (which of them
    unlabeled) and the held-out test images it searches with."""
    limit: int
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    order: np.ndarray
    unlabeled: np.ndarray
    q_idx: np.ndarray

    @classmethod
    def load(cls, settings: Settings, limit: int, queries: int) -> Stream:
        train_x, train_y = load_split("train", settings.data.fashion_mnist_dir)
        test_x, test_y = load_split("test", settings.data.fashion_mnist_dir)
        order, unlabeled = stream_order(train_y, settings.model.seed, limit)
        q_idx = np.random.default_rng(settings.model.seed + 1).choice(len(test_x), size=queries, replace=False)
        return cls(limit, train_x, train_y, test_x, test_y, order, unlabeled, q_idx)

    @property
    def labels(self) -> list[int | None]:
        """Each streamed image's labels header: none for one sent unlabeled."""
        return [None if u else int(y) for u, y in zip(self.unlabeled, self.train_y[self.order])]

    @property
    def n_labeled(self) -> int:
        return int((~self.unlabeled).sum())
