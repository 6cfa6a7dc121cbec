"""Where an EfficientNet-Lite splits into a frozen part (run once per image, its output stored) and a tail that
learns with the hash head (run on stored activations: a round never decodes an image nor runs an early layer).

Cut names follow ``efficientnet_lite_pytorch``'s blocks. The package builds seven stages (its ``blocks_args``,
``r1_k3_s11_e1_i32_o16`` ... ``r1_k3_s11_e6_i192_o320``), each one or more ``MBConvBlock`` in ``net._blocks``,
then ``_conv_head`` (1x1 to 1280), BN and ReLU6, then the pooling:

* ``pooled``: everything frozen; the stored input is the pooled 1280-d feature; the tail is the identity.
* ``head``: the blocks frozen; ``_conv_head`` + BN learn (stored: the last block's output).
* ``stageK`` (K = 1..7): stage K's first block and everything after it learn (stored: stage K-1's output).
  On Lite0 ``stage7`` is the last block (192 -> 320) and the head; ``stage6`` adds the four 192-channel blocks.
* ``blockN``: block N (index in ``net._blocks``) and everything after it learn.

:func:`split` returns the two modules and the activation's shape; ``tail(frozen(x))`` equals the whole network's
pooled feature ``net.extract_features(x).mean((2, 3))`` in eval mode (``tests/model/test_cuts.py``). The frozen
part holds no trainable parameter and stays in eval mode; the tail shares the network's modules (not copies), with
the package's drop-connect rate per block index, so in training mode it is the network's own training forward.
Its batch-norm layers train with it unless ``freeze_bn`` (then their statistics never move):
``benchmarks/journal/2026-12-06-cifar10-cut.md`` measures both.
"""

from __future__ import annotations

import re

import torch
from torch import nn

CUT_HELP = "pooled, head, stage1..stage7 or block<N>"


def stage_starts(net: nn.Module) -> list[int]:
    """Index in ``net._blocks`` of each stage's first block (stage 1 first): every block keeps its stage's repeat
    count as the package built it (rounded by the depth multiplier, Lite1/Lite2 deeper than Lite0)."""
    starts, at = [], 0
    while at < len(net._blocks):
        starts.append(at)
        at += net._blocks[at]._block_args.num_repeat
    return starts


def first_tail_block(net: nn.Module, cut: str) -> int | None:
    """Index of the first block that learns for ``cut``; ``len(net._blocks)`` for ``head``, None for ``pooled``."""
    if cut == "pooled":
        return None
    if cut == "head":
        return len(net._blocks)
    m = re.fullmatch(r"stage(\d+)|block(\d+)", cut)
    if m is None:
        raise ValueError(f"unknown cut {cut!r}; one of {CUT_HELP}")
    if m.group(1) is not None:
        starts = stage_starts(net)
        k = int(m.group(1))
        if not 1 <= k <= len(starts):
            raise ValueError(f"cut {cut!r}: this network has stages 1..{len(starts)}")
        return starts[k - 1]
    n = int(m.group(2))
    if not 0 <= n < len(net._blocks):
        raise ValueError(f"cut {cut!r}: this network has blocks 0..{len(net._blocks) - 1}")
    return n


def _drop_rate(net: nn.Module, idx: int) -> float | None:
    rate = net._global_params.drop_connect_rate
    return rate * float(idx) / len(net._blocks) if rate else None


class Frozen(nn.Module):
    """Images (n, 3, S, S) in [-1, 1] -> the activation at the cut (the pooled feature for ``pooled``)."""

    def __init__(self, net: nn.Module, end: int | None):
        super().__init__()
        self.net, self.end = net, end
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Frozen:
        return super().train(False)  # frozen: batch-norm statistics never move

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(x)))
        if self.end is None:
            for block in net._blocks:
                x = block(x)
            return net._swish(net._bn1(net._conv_head(x))).mean(dim=(2, 3))
        for block in net._blocks[:self.end]:
            x = block(x)
        return x


class Tail(nn.Module):
    """The activation at the cut -> (n, out_features) pooled: the blocks from ``start`` on, the head, the mean."""

    def __init__(self, net: nn.Module, start: int, freeze_bn: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(net._blocks[start:])
        self.rates = [_drop_rate(net, i) for i in range(start, len(net._blocks))]
        self.conv_head, self.bn, self.act = net._conv_head, net._bn1, net._swish
        self.out_features = net._conv_head.out_channels
        self.freeze_bn = freeze_bn
        for p in self.parameters():
            p.requires_grad_(True)

    def train(self, mode: bool = True) -> Tail:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, rate in zip(self.blocks, self.rates):
            x = block(x, drop_connect_rate=rate)
        return self.act(self.bn(self.conv_head(x))).mean(dim=(2, 3))


def split(net: nn.Module, cut: str, input_size: int = 224, freeze_bn: bool = False) -> tuple[nn.Module, nn.Module, tuple]:
    """(frozen, tail, activation shape without the batch axis) for ``net`` (an ``efficientnet_lite_pytorch``
    ``EfficientNet``) cut at ``cut``, for square inputs of ``input_size``. ``pooled``'s tail is the identity.
    Both modules share ``net``'s parameters: split a fresh network per use when the tail will train."""
    start = first_tail_block(net, cut)
    frozen = Frozen(net, start)
    tail = nn.Identity() if start is None else Tail(net, start, freeze_bn)
    if start is None:
        tail.out_features = net._conv_head.out_channels
    with torch.no_grad():
        shape = tuple(frozen(torch.zeros(1, 3, input_size, input_size)).shape[1:])
    return frozen, tail, shape
