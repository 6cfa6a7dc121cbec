"""The MIHash re-encode test: index as it is vs after the selective re-encode, on a reservoir that holds a
labeled hold-out (learned codes, never trained on; the test compares their shadows, the inferred codes they
would hold unlabeled); fires only when the gain clears its bootstrap noise bound and the index holds
inferred codes to re-encode. Synthetic cases with a known answer, a stub learner standing in for the
network (its "images" are item indices); every fourth item unlabeled, as in a partly labeled stream."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from streamhash.codes import pack_signs
from streamhash.config import LearnSettings
from streamhash.learn.mi import mi_gain, mi_per_anchor
from streamhash.learn.online import OnlineHasher, in_holdout
from streamhash.model.hashnet import HashNet, HashNetConfig

BITS = 32


def class_codes(n_classes: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice([-1.0, 1.0], (n_classes, BITS))


def noisy(signs: np.ndarray, flip: float, seed: int) -> np.ndarray:
    """Packed codes from +-1 codes with a fraction ``flip`` of the bits flipped at random."""
    flips = np.random.default_rng(seed).random(signs.shape) < flip
    return pack_signs(np.where(flips, -signs, signs))


class StubLearner:
    """An IncrementalHasher whose "network" maps item index -> a code: ``net_codes`` (packed, per item).
    A round gives every pending item its class code (DCC-like learned codes, perfect for the labels)."""

    bits = BITS

    def __init__(self, net_codes: np.ndarray, labels: np.ndarray, learned_codes: np.ndarray):
        self.net, self.net_codes, self.labels, self.learned_codes = object(), net_codes, labels, learned_codes
        self.codes_of: dict = {}
        self.pending: list = []
        self.omega_asked: list = []

    @property
    def n_pending(self) -> int:
        return len(self.pending)

    @property
    def pending_ids(self) -> list:
        return list(self.pending)

    def add_items(self, ids, codes, labels=None, *, frozen=True, held=None):
        for i, c, lab in zip(ids, codes, labels if labels is not None else [None] * len(ids)):
            self.codes_of[i] = np.asarray(c)
            if lab and not frozen:
                self.pending.append(i)

    def learn_round(self, fetch_images=None):
        from streamhash.learn.dihn import RoundResult

        ids, self.pending = self.pending, []
        self.omega_asked += ids
        codes = self.learned_codes[np.asarray(ids, int)] if ids else np.zeros((0, BITS // 8), np.uint8)
        for i, c in zip(ids, codes):
            self.codes_of[i] = c
        return RoundResult(ids, codes, len(ids), 0.0, 0.0, 1, len(ids), 1)

    def codes(self, ids=None):
        return np.stack([self.codes_of[i] for i in ids])

    def set_codes(self, ids, codes):
        for i, c in zip(ids, codes):
            self.codes_of[i] = c

    def reencode(self, fetch_images=None, ids=None):
        raise NotImplementedError

    def encode(self, images):
        return self.net_codes[np.asarray(images, int)]

    def quarantine_pending(self):
        ids, self.pending = self.pending, []
        return ids


def world(n=400, n_classes=5, seed=0, flip=0.1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    cc = class_codes(n_classes, seed)
    learned = pack_signs(cc[y])  # what DCC gives: the class code
    good_net = noisy(cc[y], flip, seed + 1)  # a network that separates the classes
    random_net = rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)  # an old network: codes unrelated to labels
    return y, learned, good_net, random_net


def hasher_with(stub, settings: LearnSettings, y, indexed_codes, seed=0, unlabeled_every=4):
    """Every ``unlabeled_every``-th item unlabeled (0: all labeled): the inferred codes a re-encode would fix."""
    h = OnlineHasher(HashNet(HashNetConfig(bits=BITS)), settings, learner=stub, seed=seed)
    h.observe(list(range(len(y))), indexed_codes,
              [None if unlabeled_every and i % unlabeled_every == 0 else int(v) for i, v in enumerate(y)])
    return h


def n_unlabeled(n, every=4):
    return len(range(0, n, every))


def test_stale_random_inferred_codes_and_a_separating_network_fire():
    y, learned, good_net, random_net = world()
    s = LearnSettings(reservoir_size=300, holdout_fraction=0.3)
    h = hasher_with(StubLearner(good_net, y, learned), s, y, random_net)
    rep = h.learn_round(lambda ids: np.asarray(ids))
    assert sorted(rep.round.ids) == [i for i in range(len(y)) if i % 4]  # every labeled item learned, hold-out too
    assert rep.mi.changed > 0 and rep.gain > 0.05  # the hold-out's shadows: random codes, as the unlabeled ones
    assert rep.sigma > 0 and rep.gain > 2 * rep.sigma and rep.reencode
    assert rep.cost == n_unlabeled(len(y))  # the unlabeled items' stale codes: the images a re-encode decodes and encodes
    assert rep.mi_live < rep.mi_candidate
    # the re-encode gives the inferred codes the current network's encodings, and the shadows follow:
    # the same network again finds nothing to gain
    again = h.learn_round(lambda ids: np.asarray(ids))
    assert again.mi.changed == 0 and again.gain == 0.0 and not again.reencode


def test_a_fully_labeled_index_never_fires_however_stale_the_shadows():
    """Every stored code learned (class-incremental): nothing to re-encode, so no trigger, though the
    hold-out's shadows are random codes the current network would beat."""
    y, learned, good_net, random_net = world()
    # unstratified: the shadows weigh as sampled (stratified, they weigh the index's share of inferred codes, 0 here)
    h = hasher_with(StubLearner(good_net, y, learned), LearnSettings(reservoir_size=300, holdout_fraction=0.3,
                                                                     reservoir_strata=False), y,
                    random_net, unlabeled_every=0)
    rep = h.learn_round(lambda ids: np.asarray(ids))
    assert rep.gain > 2 * rep.sigma > 0 and rep.cost == 0
    assert not rep.reencode and h.trigger.fired == 0


def test_a_round_without_the_test_does_not_fire_or_feed_the_trigger():
    """``test=False`` (a caller whose re-encode policy ignores the test): the case above would fire."""
    y, learned, good_net, random_net = world()
    h = hasher_with(StubLearner(good_net, y, learned), LearnSettings(reservoir_size=300, holdout_fraction=0.3), y, random_net)
    rep = h.learn_round(lambda ids: np.asarray(ids), test=False)
    assert not rep.reencode and rep.mi.n == 0 and rep.cost == n_unlabeled(len(y))
    assert h.trigger.fired == 0 and h.trigger.last is None


def test_everything_learned_gives_zero_gain_and_never_fires():
    y, learned, good_net, random_net = world()
    s = LearnSettings(reservoir_size=300, holdout_fraction=0.0)
    stub = StubLearner(good_net, y, learned)
    h = hasher_with(stub, s, y, random_net)
    for r in range(3):
        rep = h.learn_round(lambda ids: np.asarray(ids))
        assert rep.gain == 0.0 and rep.sigma == 0.0 and rep.mi.changed == 0 and rep.cost == n_unlabeled(len(y))
        assert not rep.reencode


@pytest.mark.parametrize("seed", range(5))
def test_the_network_that_made_the_stale_codes_gives_zero_gain(seed):
    """Two identical networks: the inferred codes already are the candidate ones."""
    y, learned, good_net, _ = world(seed=seed)
    s = LearnSettings(reservoir_size=300, holdout_fraction=0.3)
    rep = hasher_with(StubLearner(good_net, y, learned), s, y, good_net, seed=seed).learn_round(lambda ids: np.asarray(ids))
    assert rep.gain == 0.0 and rep.mi.changed == 0 and not rep.reencode and rep.cost > 0


def test_two_networks_of_equal_quality_do_not_fire_across_seeds():
    """The stale codes come from a network as good as the current one (other bit noise, same rate): the
    gain is noise, and the bootstrap bound keeps it from firing."""
    fired, gains = 0, []
    for seed in range(30):
        y, learned, good_net, _ = world(seed=seed, flip=0.15)
        cc = class_codes(5, seed)
        old_net = noisy(cc[y], 0.15, seed + 1000)
        s = LearnSettings(reservoir_size=300, holdout_fraction=0.3)
        rep = hasher_with(StubLearner(good_net, y, learned), s, y, old_net, seed=seed).learn_round(lambda ids: np.asarray(ids))
        assert rep.mi.changed > 0 and rep.sigma > 0
        fired += rep.reencode
        gains.append(rep.gain / rep.sigma)
    assert fired <= 1, gains  # one-sided 2 sigma: ~2% a draw
    assert abs(np.mean(gains)) < 1.0, gains  # centred on no gain


def test_mi_gain_bootstrap_is_seeded_and_matches_per_anchor_means():
    y, learned, good_net, random_net = world(n=120)
    cand = learned.copy()
    live = learned.copy()
    live[:40] = random_net[:40]
    g1 = mi_gain(good_net, live, cand, y.tolist(), BITS, seed=3)
    g2 = mi_gain(good_net, live, cand, y.tolist(), BITS, seed=3)
    assert g1 == g2 and g1.changed == 40 and g1.n == 120
    assert g1.live == pytest.approx(mi_per_anchor(good_net, y.tolist(), BITS, db_codes=live).mean())
    assert g1.candidate == pytest.approx(mi_per_anchor(good_net, y.tolist(), BITS, db_codes=cand).mean())
    assert g1.gain == pytest.approx(g1.candidate - g1.live)
    # the anchor's own database code is never compared with it
    other = live.copy()
    other[0] = ~other[0]
    np.testing.assert_array_equal(mi_per_anchor(good_net, y.tolist(), BITS, db_codes=other)[0],
                                  mi_per_anchor(good_net, y.tolist(), BITS, db_codes=live)[0])


def test_holdout_is_deterministic_across_processes_and_sized_by_the_fraction():
    ids = [f"img-{i:07d}" for i in range(20_000)] + list(range(5000))
    mask = in_holdout(ids, 0.1)
    assert 0.09 < mask.mean() < 0.11
    np.testing.assert_array_equal(mask, in_holdout(ids, 0.1))
    assert not in_holdout(ids, 0.0).any() and (in_holdout(ids, 0.2) >= mask).all()  # nested as the fraction grows
    code = ("from streamhash.learn.online import in_holdout; import numpy as np; "
            "ids=[f'img-{i:07d}' for i in range(20000)]+list(range(5000)); "
            "print(np.flatnonzero(in_holdout(ids, 0.1)).sum())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == int(np.flatnonzero(mask).sum())


def test_holdout_items_are_learned_never_enter_omega_and_are_the_same_after_a_restart():
    from tests.learn.test_dihn import synth

    x, y = synth(200, [0, 1, 2, 3], 4)
    net = HashNet(HashNetConfig(bits=16, seed=0))
    s = LearnSettings(round_every=50, omega=150, epochs=1, reservoir_size=200, holdout_fraction=0.25,
                      reservoir_strata=False)  # one reservoir holding every labeled item
    held = set(np.flatnonzero(in_holdout(range(200), 0.25)).tolist())
    assert 20 < len(held) < 80
    arrival = net.encode(x)
    for restart in range(2):
        h = OnlineHasher(net, s, iters=1)
        h.observe(range(200), arrival, y)
        assert h.n_pending == 200
        h.ready()  # folds them into the learner
        assert held <= set(h.learner.pending_ids)  # in B_new: their codes are learned
        asked = []
        res = h.learner.learn_round(lambda ids, asked=asked: asked.extend(ids) or x[np.asarray(ids)])
        assert asked and not held & set(asked)  # never in Omega: the network never sees their images
        assert held <= set(res.ids)
        # the reservoir samples every labeled item; the hold-out stands for inferred codes, with its arrival
        # codes as shadows
        payloads = dict(zip(h.reservoir.ids, h.reservoir.payloads))
        assert set(payloads) == set(range(200)) and {i for i, p in payloads.items() if p[1]} == held
        assert all(payloads[i][2] == arrival[i].tobytes() for i in held)


def test_stratified_reservoir_gives_the_holdout_half_the_slots_and_weighs_it_back():
    """reservoir_strata: the hold-out, standing for the inferred codes, fills a stratum of its own; in the MI
    comparison each stratum weighs its share of the index (here 25% inferred: the unlabeled), not of the
    sample (50%)."""
    y, learned, good_net, random_net = world(n=600)
    s = LearnSettings(reservoir_size=200, holdout_fraction=0.3, reservoir_strata=True)
    h = hasher_with(StubLearner(good_net, y, learned), s, y, random_net)
    rep = h.learn_round(lambda ids: np.asarray(ids))
    held = {i for i in np.flatnonzero(in_holdout(range(len(y)), 0.3)).tolist() if i % 4}
    assert len(h.reservoir) == len(h.inferred_reservoir) == 100
    assert set(h.inferred_reservoir.ids) <= held and not set(h.reservoir.ids) & held
    inferred = np.array([True] * 100 + [False] * 100)
    w = h._strata_weights(inferred)
    share = n_unlabeled(len(y)) / len(y)
    assert w[:100].sum() / w.sum() == pytest.approx(share)  # the inferred stratum weighs its index share
    assert rep.reencode and rep.gain > 2 * rep.sigma  # stale random codes still fire
