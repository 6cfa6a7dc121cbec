"""The CPU inference engine: the frozen EfficientNet-Lite0 exported to ONNX and run by ONNX Runtime gives
torch's features (stated tolerance below), the exported file is cached by weights and reused, and the
backbone runs it on the CPU (torch elsewhere, or when asked)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="the ONNX Runtime engine is in the extra 'natural' (pip install onnxruntime onnx)")
pytest.importorskip("onnx", reason="exporting needs onnx (extra 'natural')")

from streamhash.model import engine as engine_mod  # noqa: E402
from streamhash.model.efficientnet import EfficientNetLite0Backbone  # noqa: E402
from streamhash.model.engine import FeatureEngine, weights_hash  # noqa: E402
from streamhash.model.hashnet import HashNet, HashNetConfig  # noqa: E402
from tests.photos import photo  # noqa: E402

# fp32 in both engines; measured max |diff| 7e-6 on features up to 5.5 (ONNX Runtime fuses batch norm into the
# convolutions and sums in another order). The bounds leave room for other CPUs' kernels, not for a wrong graph:
# a graph run with batch-norm in training mode differed by 5.6 with cosine 0.13.
ATOL = 1e-3
MIN_COSINE = 0.99999


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def backbone(cache):
    return EfficientNetLite0Backbone(engine="auto", cache_dir=cache)


def _photos(n: int, size: int) -> np.ndarray:
    return np.stack([np.asarray(photo(seed, size, size)) for seed in range(n)])


def test_onnx_runtime_features_match_torch_within_tolerance(backbone):
    images = _photos(6, 32)  # CIFAR-sized photos, upsampled to 224 by both paths alike
    eng = backbone.onnx_engine()
    onnx_feats = eng.features(images)
    with torch.no_grad():
        torch_feats = backbone.net.extract_features(engine_mod.to_network_input(images, 224)).mean(dim=(2, 3)).numpy()
    assert onnx_feats.shape == (6, 1280) and onnx_feats.dtype == np.float32
    assert np.abs(onnx_feats - torch_feats).max() < ATOL
    assert _cosine(onnx_feats, torch_feats).min() > MIN_COSINE
    # float input in [-1, 1] (the hash network's tensors) and a gray image take the same path
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(eng.features(x), onnx_feats, atol=1e-5)
    gray = images[:2, :, :, 0]
    np.testing.assert_allclose(eng.features(gray), eng.features(np.repeat(gray[..., None], 3, axis=3)), atol=1e-5)
    assert eng.name == "onnxruntime:efficientnet_lite0-224"
    eng.max_batch = 4  # a large batch runs in chunks (4 + 2 here): the same features
    try:
        np.testing.assert_allclose(eng.features(images), onnx_feats, atol=1e-5)
    finally:
        eng.max_batch = 64


def test_the_backbone_runs_the_engine_on_the_cpu_and_torch_when_asked(backbone):
    assert backbone.uses_onnx(torch.device("cpu")) and not backbone.uses_onnx(torch.device("cuda"))
    assert backbone.engine_name("cpu") == "onnxruntime:efficientnet_lite0-224"
    assert backbone.engine_name("cuda") == "torch:efficientnet_lite0-224"
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    via_onnx = backbone(x)
    backbone.engine = "torch"
    try:
        via_torch = backbone(x)
    finally:
        backbone.engine = "auto"
    assert _cosine(via_onnx.numpy(), via_torch.numpy()).min() > MIN_COSINE
    assert np.abs(via_onnx.numpy() - via_torch.numpy()).max() < ATOL


def test_the_exported_file_is_cached_by_weights_and_reused(backbone, cache, monkeypatch):
    first = backbone.onnx_engine().path
    assert first.parent == cache / "onnx" and first.name.startswith("efficientnet_lite0-224-")
    stamp = first.stat().st_mtime_ns

    def no_export(*_a, **_k):
        raise AssertionError("exported again although the cached file was there")

    monkeypatch.setattr(engine_mod, "export_onnx", no_export)
    again = EfficientNetLite0Backbone(cache_dir=cache)  # another process, same weights: same file, no export
    feats = again.features(_photos(2, 32))
    assert again.onnx_engine().path == first and first.stat().st_mtime_ns == stamp
    assert feats.shape == (2, 1280)
    assert sorted(p.name for p in (cache / "onnx").iterdir()) == [first.name]  # no temporary file left behind
    assert first.stat().st_mode & 0o444 == 0o444  # readable by a process running as another user


def test_other_weights_get_another_file_never_a_stale_graph(tmp_path):
    def tiny() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()

    a, b = tiny(), tiny()
    assert weights_hash(a) == weights_hash(b.to(memory_format=torch.channels_last))  # layout is not weights
    with torch.no_grad():
        b[1].running_mean += 1.0  # a buffer counts too
    ea, eb = FeatureEngine(a, "tiny", 16, cache_dir=tmp_path), FeatureEngine(b, "tiny", 16, cache_dir=tmp_path)
    assert ea.path != eb.path
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        np.testing.assert_allclose(eb.run(x), b(x).numpy(), atol=1e-5)
        np.testing.assert_allclose(ea.run(x), a(x).numpy(), atol=1e-5)


def test_loaded_weights_drop_the_engine_built_for_the_old_ones(tmp_path):
    net = HashNet(HashNetConfig(bits=16, backbone="efficientnet_lite0", image_size=32, channels=3))
    net.backbone._cache_dir = tmp_path
    images = _photos(4, 32)
    before = net.encode_real(images)
    old_path = net.backbone.onnx_engine().path
    state = net.state_dict()
    state["backbone.net._conv_head.weight"] = state["backbone.net._conv_head.weight"] * 0.5
    net.load_state_dict(state)
    assert net.backbone.onnx_engine().path != old_path
    after = net.encode_real(images)
    net.backbone.engine = "torch"
    np.testing.assert_allclose(after, net.encode_real(images), atol=1e-4)
    assert not np.allclose(before, after, atol=1e-3)


def test_sessions_follow_the_torch_thread_setting_and_copies_open_their_own(backbone):
    eng = backbone.onnx_engine()
    assert eng.session(1).get_session_options().intra_op_num_threads == 1
    threads = torch.get_num_threads()
    assert eng.session().get_session_options().intra_op_num_threads == threads
    clone = copy.deepcopy(eng)  # e.g. a learner copying its network: the session is not copied, the file is
    assert clone._sessions == {} and clone.path == eng.path
    x = _photos(2, 32)
    np.testing.assert_array_equal(clone.features(x), eng.features(x))


def test_int8_engines_are_their_own_files_and_static_needs_calibration(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images = _photos(24, 16)
    with pytest.raises(ValueError, match="calibration"):
        FeatureEngine(module, "tiny", 16, cache_dir=tmp_path, quantize="static")
    with pytest.raises(ValueError, match="quantize"):
        FeatureEngine(module, "tiny", 16, cache_dir=tmp_path, quantize="int4")
    fp32 = FeatureEngine(module, "tiny", 16, cache_dir=tmp_path)
    static = FeatureEngine(module, "tiny", 16, cache_dir=tmp_path, quantize="static", calibration=images[:16])
    other = FeatureEngine(module, "tiny", 16, cache_dir=tmp_path, quantize="static", calibration=images[8:])
    dynamic = FeatureEngine(module, "tiny", 16, cache_dir=tmp_path, quantize="dynamic")
    paths = {e.path for e in (fp32, static, other, dynamic)}
    assert len(paths) == 4  # other calibration data, another file
    assert static.name == "onnxruntime:tiny-16-int8-static"
    ref = fp32.features(images)
    for eng in (static, dynamic):  # int8 is an approximation: close to fp32, not equal
        assert _cosine(eng.features(images), ref).min() > 0.95

