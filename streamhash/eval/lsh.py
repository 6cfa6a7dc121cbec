"""Locality-sensitive hashing baseline: signs of random Gaussian projections of centred pixels."""

from __future__ import annotations

import numpy as np

from streamhash.codes import pack_signs


class LSH:
    def __init__(self, bits: int, dim: int, seed: int = 0):
        self.bits = bits
        self.W = np.random.default_rng(seed).standard_normal((dim, bits)).astype(np.float32)
        self.mean = np.zeros(dim, np.float32)

    def fit(self, images: np.ndarray) -> "LSH":
        """Centre on the mean of the data available at the start (the initial database)."""
        self.mean = images.reshape(len(images), -1).astype(np.float32).mean(0) / 255.0
        return self

    def encode(self, images: np.ndarray, batch: int = 8192) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch):
            x = images[s:s + batch].reshape(-1, self.W.shape[0]).astype(np.float32) / 255.0 - self.mean
            out.append(pack_signs(x @ self.W))
        return np.concatenate(out) if out else np.zeros((0, self.bits // 8), np.uint8)
