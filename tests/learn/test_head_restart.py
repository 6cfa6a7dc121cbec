"""A round that brings a label no learned code had starts the hash head afresh (the backbone kept) and runs until the
hold-out's mAP stops rising, between ``iters`` and ``restart_factor`` x ``iters`` alternations."""

import numpy as np
import pytest
import torch

import streamhash.learn.dihn as dihn
from streamhash.config import LearnSettings
from streamhash.learn.dihn import DIHNLearner
from streamhash.learn.online import OnlineHasher
from streamhash.model.hashnet import HashNet, HashNetConfig

HOLDOUT_MAP = dihn.holdout_map
PATTERNS = np.random.default_rng(7).uniform(0, 255, (8, 28, 28))


def synth(n, classes, seed):
    rng = np.random.default_rng(seed)
    y = rng.choice(classes, n)
    return np.clip(PATTERNS[y] * 0.6 + rng.normal(0, 40, (n, 28, 28)) + 50, 0, 255).astype(np.uint8), y


def learner(**kw):
    kw = {"omega": 100, "iters": 2, "epochs": 1, "batch_size": 50, **kw}
    return DIHNLearner(HashNet(HashNetConfig(bits=16, seed=0)), seed=0, **kw)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("restart", [True, False])
def test_only_a_round_that_brings_a_new_label_restarts_the_head_and_the_backbone_is_kept(restart):
    """lr 0: nothing trains, so any change to the network is the restart's."""
    L = learner(lr=0.0, weight_decay=0.0, restart_head=restart)
    L.learn_many(*synth(100, [0, 1], 1))  # the first round: nothing learned before it, nothing to restart
    head, backbone = params(L.net.head), params(L.net.backbone)
    L.learn_many(*synth(100, [0, 1], 2))  # known labels
    assert same(params(L.net.head), head)
    L.learn_many(*synth(100, [1, 2], 3))  # label 2 is new
    assert same(params(L.net.backbone), backbone)
    assert same(params(L.net.head), head) is not restart
    if restart:  # nn.Linear's initialization: uniform within 1 / sqrt(fan_in)
        bound = 1 / np.sqrt(L.net.head.in_features)
        assert all(float(p.detach().abs().max()) <= bound for p in L.net.head.parameters())
        assert float(L.net.head.weight.std()) > bound / 3


def run_rounds(monkeypatch, scores, *, held=True, factor=3):
    """Round 1 learns classes 0-1, round 2 brings class 2; a tenth of each held out unless ``held`` is False.
    ``scores``: the hold-out mAP each alternation reports (None: the real one). Returns round 2's alternations."""
    it = iter(scores or ())
    monkeypatch.setattr(dihn, "holdout_map", HOLDOUT_MAP if scores is None else lambda *a, **k: lambda: next(it))
    L = learner(restart_factor=factor)
    x, y = np.concatenate([synth(100, [0, 1], 1)[0], synth(100, [1, 2], 2)[0]]), np.r_[synth(100, [0, 1], 1)[1],
                                                                                       synth(100, [1, 2], 2)[1]]
    fetch = lambda ids: x[np.asarray(ids)]  # noqa: E731
    hold = (np.arange(200) % 10 == 0) & held
    L.add_items(range(100), L.encode(x[:100]), y[:100], frozen=False, held=hold[:100])
    assert L.learn_round(fetch).iterations == 2
    L.add_items(range(100, 200), L.encode(x[100:]), y[100:], frozen=False, held=hold[100:])
    return L.learn_round(fetch).iterations


def test_a_restarted_round_runs_while_the_holdout_improves_and_stops_at_its_plateau(monkeypatch):
    assert run_rounds(monkeypatch, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]) == 6  # still rising: the cap, 3 x 2
    assert run_rounds(monkeypatch, [0.5] * 5) == 4  # flat: the first sets the best, three more without one
    assert run_rounds(monkeypatch, [0.1, 0.2, 0.3, 0.2, 0.25, 0.28, 0.9], factor=4) == 6  # three short of the third
    assert run_rounds(monkeypatch, None, held=False) == 2  # no hold-out to judge by: iters
    assert run_rounds(monkeypatch, None, factor=1) == 2
    assert 2 <= run_rounds(monkeypatch, None) <= 6  # the real hold-out mAP


def test_restart_settings_reach_the_learner_and_survive_a_save():
    h = OnlineHasher(HashNet(HashNetConfig(bits=16, seed=0)), LearnSettings(restart_head=False, restart_factor=5))
    L = DIHNLearner.from_bytes(h.learner.to_bytes())
    assert (L.restart_head, L.restart_factor) == (False, 5)
