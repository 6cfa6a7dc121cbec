"""What the store keeps for a network (issue 23): images for a backbone trained end to end, the frozen part's
output (float16) for a frozen one; encode/forward/to_tensor take that stored input, encode_images takes images,
and both give the same codes. A cut splits the frozen backbone: the part before it runs once per image (ONNX
Runtime on the CPU), the tail after it learns with the head, and a serialised network rebuilds the same cut."""

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from streamhash.model.efficientnet import EfficientNetLite0Backbone
from streamhash.model.hashnet import HashNet, HashNetConfig
from tests.photos import photo


def _photos(n: int, size: int = 32) -> np.ndarray:
    return np.stack([np.asarray(photo(seed, size, size)) for seed in range(n)])


def test_a_network_trained_end_to_end_stores_the_image_itself():
    net = HashNet(HashNetConfig(bits=16))
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    assert not net.frozen and net.prepare(images) is images  # no copy, no cost
    assert net.stored_shape == (28, 28) and net.stored_dtype == np.uint8 and net.feature_spec() is None
    assert net.encode_images(images).tolist() == net.encode(images).tolist()


@pytest.fixture(scope="module")
def photo_net(tmp_path_factory):
    net = HashNet(HashNetConfig(bits=32, backbone="efficientnet_lite0", image_size=32, channels=3, seed=1))
    net.backbone._cache_dir = tmp_path_factory.mktemp("onnx")
    return net


def test_a_frozen_backbone_stores_its_pooled_feature_in_float16(photo_net):
    images = _photos(5)
    stored = photo_net.prepare(images)
    assert photo_net.frozen and stored.dtype == np.float16 and stored.shape == (5, 1280)
    assert photo_net.feature_spec() == {"backbone": "efficientnet_lite0", "cut": "pooled", "feature_shape": [1280],
                                        "dtype": "float16", "input_size": 224}
    codes = photo_net.encode(stored)
    assert photo_net.encode_images(images).tolist() == codes.tolist()
    assert photo_net.encode(images).tolist() == codes.tolist()  # images where a stored input goes: prepared first
    # float16 rounding moves u by far less than the margin of almost every bit: codes from float32 features agree
    full = photo_net.backbone.features(images)
    with torch.no_grad():
        u32 = torch.tanh(photo_net.head(torch.from_numpy(full))).numpy()
    u16 = photo_net.encode_real(stored)
    assert np.abs(u16 - u32).max() < 5e-3
    assert ((u16 > 0) == (u32 > 0)).mean() > 0.99


def test_a_round_trains_the_head_on_stored_features_without_the_backbone(photo_net, monkeypatch):
    stored = photo_net.prepare(_photos(6))

    def no_backbone(*_a, **_k):
        raise AssertionError("the frozen part ran on a stored input")

    monkeypatch.setattr(photo_net.backbone, "_run_frozen", no_backbone)
    x = photo_net.to_tensor(stored)
    assert x.dtype == torch.float32 and tuple(x.shape) == (6, 1280)
    photo_net.train()
    loss = photo_net(x).sum()
    loss.backward()
    assert photo_net.head.weight.grad is not None
    assert [n for n, p in photo_net.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    photo_net.zero_grad()
    photo_net.eval()


def test_the_cut_is_serialised_and_a_network_saved_before_cuts_loads(photo_net):
    raw = photo_net.to_bytes()
    again = HashNet.from_bytes(raw)
    assert again.cfg.cut == "" and again.backbone.cut == "pooled"
    stored = photo_net.prepare(_photos(3))
    assert again.encode(stored).tolist() == photo_net.encode(stored).tolist()
    state = torch.load(__import__("io").BytesIO(raw), weights_only=True)
    assert not any(k.startswith("backbone.frozen_part") for k in state["state"])  # the same keys as before cuts


class _FakeCuts(types.ModuleType):
    """A stand-in for streamhash.model.cuts (its split's signature): frozen = stem + all blocks but the last two,
    tail = those + the head conv. The mechanism is tested apart from the cuts chosen (tests/model/test_cuts.py)."""

    @staticmethod
    def split(net, cut, input_size):
        assert cut == "last2"
        k = len(net._blocks) - 2

        class Frozen(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                x = net._swish(net._bn0(net._conv_stem(x)))
                for block in net._blocks[:k]:
                    x = block(x)
                return x

        class Tail(nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = nn.ModuleList(net._blocks[k:])
                self.conv_head, self.bn1 = net._conv_head, net._bn1

            def forward(self, x):
                for block in self.blocks:
                    x = block(x)
                return net._swish(self.bn1(self.conv_head(x))).mean(dim=(2, 3))

        frozen = Frozen()
        with torch.no_grad():
            shape = tuple(frozen(torch.zeros(1, 3, input_size, input_size)).shape[1:])
        return frozen, Tail(), shape


def test_a_cut_stores_the_activation_before_it_and_its_tail_learns(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "streamhash.model.cuts", _FakeCuts("streamhash.model.cuts"))
    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=32, channels=3, cut="last2"))
    net.backbone._cache_dir = tmp_path
    images = _photos(3)
    stored = net.prepare(images)  # through ONNX Runtime: the frozen part exported on its own
    assert stored.dtype == np.float16 and stored.shape == (3, *net.stored_shape) and len(net.stored_shape) == 3
    assert net.feature_spec()["cut"] == "last2" and list(net.backbone.onnx_engine().path.parent.iterdir())
    assert all(p.requires_grad for p in net.backbone.tail.parameters())
    assert not any(p.requires_grad for p in net.backbone.net._blocks[0].parameters())
    assert not any(p.requires_grad for p in net.backbone.net._conv_stem.parameters())
    # the whole network in torch, from the image: what the stored activation and the tail give, to float16
    with torch.no_grad():
        whole = net.backbone.net.extract_features(
            torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                            size=(224, 224), mode="bilinear", align_corners=False)).mean(dim=(2, 3))
        via_stored = net.backbone.tail(torch.from_numpy(stored).float())
    assert torch.nn.functional.cosine_similarity(whole, via_stored).min() > 0.999
    rebuilt = HashNet.from_bytes(net.to_bytes())
    assert rebuilt.cfg.cut == "last2" and rebuilt.encode(stored).tolist() == net.encode(stored).tolist()
    net.train()
    assert net.backbone.tail.training and not net.backbone.frozen_part.training
    net(net.to_tensor(stored)).sum().backward()
    assert net.backbone.tail.conv_head.weight.grad is not None
    net.eval()


def test_prepare_of_no_images_is_an_empty_batch_of_the_stored_shape(photo_net):
    empty = photo_net.prepare(np.zeros((0, 32, 32, 3), np.uint8))
    assert empty.shape == (0, 1280) and empty.dtype == np.float16
    assert photo_net.encode(empty).shape == (0, 4)


def test_the_backbone_alone_gives_the_pooled_feature_of_images_as_before():
    bb = EfficientNetLite0Backbone(engine="torch")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = bb.net.extract_features(torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear",
                                                                      align_corners=False)).mean(dim=(2, 3))
    torch.testing.assert_close(bb(x), ref)


def test_the_projects_cut_before_the_last_stage_plugs_in(tmp_path):
    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=32, channels=3, cut="stage7"))
    net.backbone._cache_dir = tmp_path
    images = _photos(2)
    stored = net.prepare(images)
    assert stored.shape == (2, 192, 7, 7) and net.feature_spec()["feature_shape"] == [192, 7, 7]
    assert net.encode_images(images).tolist() == net.encode(stored).tolist()
    rebuilt = HashNet.from_bytes(net.to_bytes())
    assert rebuilt.backbone.cut == "stage7" and rebuilt.encode(stored).tolist() == net.encode(stored).tolist()
    assert any(p.requires_grad for p in net.backbone.tail.parameters())


def test_a_new_tail_keeps_the_frozen_parts_export(tmp_path, monkeypatch):
    from streamhash.model import engine as engine_mod

    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=32, channels=3, cut="stage7"))
    net.backbone._cache_dir = tmp_path
    images = _photos(2)
    stored, path = net.prepare(images), net.backbone.onnx_engine().path
    state = net.state_dict()
    tail_key = next(k for k in state if k.startswith("backbone.net._conv_head"))
    state[tail_key] = state[tail_key] * 0.5  # a model version whose tail learned
    net.load_state_dict(state)

    def no_export(*_a, **_k):
        raise AssertionError("the frozen part was exported again for a new tail")

    monkeypatch.setattr(engine_mod, "export_onnx", no_export)
    assert net.backbone.onnx_engine().path == path
    np.testing.assert_array_equal(net.prepare(images), stored)
