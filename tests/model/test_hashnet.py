"""Backbones by name: a backbone registered in one line builds, serialises and is rebuilt by from_bytes."""

import numpy as np
import pytest
import torch
from torch import nn

from streamhash.config import ModelSettings
from streamhash.errors import ConfigError
from streamhash.model.hashnet import HashNet, HashNetConfig, backbone_names, register_backbone
from streamhash.model.state import initial_net


class TinyBackbone(nn.Module):
    """Mean-pooled pixels through one linear layer: enough to carry weights through a round trip."""

    out_features = 8

    def __init__(self, cfg: HashNetConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.channels, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


register_backbone("tiny", TinyBackbone)


def test_a_registered_backbone_round_trips_through_bytes():
    net = HashNet(HashNetConfig(bits=16, backbone="tiny", seed=3))
    with torch.no_grad():
        net.backbone.fc.weight.mul_(-2)  # trained-looking weights, not the seed's: from_bytes must load them
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    back = HashNet.from_bytes(net.to_bytes())
    assert isinstance(back.backbone, TinyBackbone) and back.cfg == net.cfg
    np.testing.assert_array_equal(back.encode_real(images), net.encode_real(images))
    assert set(back.state_dict()) == {"backbone.fc.weight", "backbone.fc.bias", "head.weight", "head.bias"}


def test_the_builtin_backbones_are_registered_and_unknown_names_refused():
    assert {"small_cnn", "efficientnet_lite0", "tiny"} <= set(backbone_names())
    with pytest.raises(ValueError, match="unknown backbone 'nope'"):
        HashNet(HashNetConfig(backbone="nope"))
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("small_cnn", TinyBackbone)
    register_backbone("tiny", TinyBackbone)  # the same entry again: harmless


def test_the_settings_name_a_backbone_and_the_network_refuses_an_unknown_one():
    """The settings hold the name (config imports nothing above it); building the network, at a process's start,
    refuses a name nobody registered with a ConfigError, which the command line reports as a usage error."""
    assert ModelSettings(backbone="tiny").backbone == "tiny"
    assert ModelSettings().backbone == "small_cnn"
    mc = ModelSettings(backbone="resnet9000")
    with pytest.raises(ConfigError, match="unknown backbone 'resnet9000' \\(model.backbone\\)"):
        initial_net(mc)
