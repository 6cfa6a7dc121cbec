"""The check suite every learner passes (the contract in ``streamhash/learn/base.py``), river style: one suite,
run against every learner, as ``tests/index/backend_checks.py`` is for Hamming backends.

Each check takes ``factory()``, which makes an empty learner of :data:`BITS` bits for 28x28 gray images, and
drives it as :class:`~streamhash.learn.online.OnlineHasher` and ``streamhash eval`` do. :func:`yield_checks`
lists them; ``test_learners.py`` runs them against :class:`~streamhash.learn.dihn.DIHNLearner` and the
minimal learner written there.
"""

from __future__ import annotations

import numpy as np

from streamhash.codes import hamming_brute
from streamhash.learn.base import IncrementalHasher, RoundResult

BITS = 16
N_CLASSES = 3
PATTERNS = np.random.default_rng(123).integers(0, 256, (N_CLASSES, 28, 28))


class World:
    """Items ``item-<i>`` with 28x28 images of class-specific patterns plus noise and their labels; ``fetch``
    records every id a learner asks images of."""

    def __init__(self, n: int = 120, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, N_CLASSES, n)
        self.images = np.clip(PATTERNS[self.labels] * 0.6 + rng.normal(0, 40, (n, 28, 28)) + 50, 0, 255).astype(np.uint8)
        self.random_codes = rng.integers(0, 256, (n, BITS // 8), dtype=np.uint8)
        self.fetched: list = []

    def ids(self, rows) -> list[str]:
        return [f"item-{r}" for r in rows]

    def fetch(self, ids: list) -> np.ndarray:
        self.fetched += ids
        return self.images[[int(i.split("-")[1]) for i in ids]]

    def add(self, learner, rows, *, frozen: bool, labeled: bool = True, held=None) -> list[str]:
        ids = self.ids(rows)
        labels = [int(self.labels[r]) for r in rows] if labeled else None
        learner.add_items(ids, self.random_codes[list(rows)], labels, frozen=frozen, held=held)
        return ids


def yield_checks():
    yield from (check_is_an_incremental_hasher, check_added_codes_come_back, check_a_readded_id_keeps_its_last_code,
                check_a_round_learns_every_pending_code_and_freezes_it, check_frozen_codes_never_change_in_a_round,
                check_unlabeled_items_are_never_pending, check_held_items_are_learned_but_their_images_never_fetched,
                check_learned_codes_follow_the_labels, check_quarantine_freezes_pending_codes_as_they_are,
                check_set_codes_replaces_and_freezes, check_encode_shape_and_determinism, check_should_stop_false_runs_the_round,
                check_state_round_trip, check_forgotten_items_are_never_pending_fetched_or_learned_from)


def check_id(check) -> str:
    return check.__name__


def check_is_an_incremental_hasher(factory):
    learner = factory()
    assert isinstance(learner, IncrementalHasher)
    assert learner.bits == BITS and learner.n_pending == 0 and list(learner.pending_ids) == []


def check_added_codes_come_back(factory):
    learner, w = factory(), World()
    ids = w.add(learner, range(10), frozen=True)
    w.add(learner, range(10, 20), frozen=True, labeled=False)
    np.testing.assert_array_equal(learner.codes(ids), w.random_codes[:10])
    np.testing.assert_array_equal(learner.codes(w.ids([15, 3])), w.random_codes[[15, 3]])
    assert learner.codes(ids).dtype == np.uint8 and learner.n_pending == 0


def check_a_readded_id_keeps_its_last_code(factory):
    learner, w = factory(), World()
    w.add(learner, range(5), frozen=True)
    learner.add_items(w.ids([2, 2]), w.random_codes[[7, 8]], [0, 0], frozen=True)  # a re-sent message, twice
    np.testing.assert_array_equal(learner.codes(w.ids([2])), w.random_codes[[8]])


def check_a_round_learns_every_pending_code_and_freezes_it(factory):
    learner, w = factory(), World()
    w.add(learner, range(60), frozen=True)
    new = w.add(learner, range(60, 90), frozen=False)
    assert learner.n_pending == 30 and sorted(learner.pending_ids) == sorted(new)
    res = learner.learn_round(w.fetch)
    assert isinstance(res, RoundResult) and sorted(res.ids) == sorted(new)
    assert res.codes.shape == (30, BITS // 8) and res.codes.dtype == np.uint8
    np.testing.assert_array_equal(learner.codes(res.ids), res.codes)
    assert res.changed == int((res.codes != w.random_codes[[int(i.split("-")[1]) for i in res.ids]]).any(axis=1).sum())
    assert learner.n_pending == 0 and list(learner.pending_ids) == []
    again = learner.learn_round(w.fetch)  # nothing pending: nothing learned, nothing changed
    assert again.ids == [] and again.codes.shape == (0, BITS // 8)
    np.testing.assert_array_equal(learner.codes(res.ids), res.codes)


def check_frozen_codes_never_change_in_a_round(factory):
    learner, w = factory(), World()
    old = w.add(learner, range(50), frozen=True)
    unlabeled = w.add(learner, range(50, 70), frozen=True, labeled=False)
    w.add(learner, range(70, 100), frozen=False)
    first = learner.learn_round(w.fetch)
    w.add(learner, range(100, 120), frozen=False)
    learner.learn_round(w.fetch)
    np.testing.assert_array_equal(learner.codes(old), w.random_codes[:50])
    np.testing.assert_array_equal(learner.codes(unlabeled), w.random_codes[50:70])
    np.testing.assert_array_equal(learner.codes(first.ids), first.codes)  # last round's codes: frozen too


def check_unlabeled_items_are_never_pending(factory):
    learner, w = factory(), World()
    ids = w.add(learner, range(20), frozen=False, labeled=False)
    learner.add_items(w.ids([20, 21]), w.random_codes[[20, 21]], [None, []], frozen=False)
    assert learner.n_pending == 0
    assert learner.learn_round(w.fetch).ids == []
    np.testing.assert_array_equal(learner.codes(ids), w.random_codes[:20])


def check_held_items_are_learned_but_their_images_never_fetched(factory):
    learner, w = factory(), World()
    w.add(learner, range(40), frozen=True)
    held = np.arange(30) % 3 == 0
    new = w.add(learner, range(40, 70), frozen=False, held=held)
    res = learner.learn_round(w.fetch)
    assert sorted(res.ids) == sorted(new)
    assert not set(w.fetched) & {i for i, h in zip(new, held) if h}


def check_learned_codes_follow_the_labels(factory):
    """After a round, learned codes of one class are nearer each other than to the other classes' (the codes
    they replaced were random)."""
    learner, w = factory(), World()
    w.add(learner, range(60), frozen=False)
    res = learner.learn_round(w.fetch)
    rows = [int(i.split("-")[1]) for i in res.ids]
    d = hamming_brute(res.codes, res.codes).astype(float)
    same = w.labels[rows][:, None] == w.labels[rows][None, :]
    np.fill_diagonal(same, False)
    other = w.labels[rows][:, None] != w.labels[rows][None, :]
    assert d[same].mean() + 2 < d[other].mean(), (d[same].mean(), d[other].mean())


def check_quarantine_freezes_pending_codes_as_they_are(factory):
    learner, w = factory(), World()
    w.add(learner, range(40), frozen=True)
    bad = w.add(learner, range(40, 50), frozen=False)
    assert sorted(learner.quarantine_pending()) == sorted(bad)
    assert learner.n_pending == 0 and list(learner.pending_ids) == []
    assert learner.learn_round(w.fetch).ids == []
    np.testing.assert_array_equal(learner.codes(bad), w.random_codes[40:50])
    w.add(learner, range(50, 60), frozen=False)  # later items learn as usual; the quarantined stay out
    res = learner.learn_round(w.fetch)
    assert sorted(res.ids) == sorted(w.ids(range(50, 60)))
    np.testing.assert_array_equal(learner.codes(bad), w.random_codes[40:50])


def check_set_codes_replaces_and_freezes(factory):
    learner, w = factory(), World()
    frozen = w.add(learner, range(20), frozen=True)
    pending = w.add(learner, range(20, 30), frozen=False)
    learner.set_codes(frozen[:5] + pending[:5], w.random_codes[60:70])  # a re-encode's codes
    np.testing.assert_array_equal(learner.codes(frozen[:5] + pending[:5]), w.random_codes[60:70])
    assert sorted(learner.pending_ids) == sorted(pending[5:])
    res = learner.learn_round(w.fetch)
    assert sorted(res.ids) == sorted(pending[5:])
    np.testing.assert_array_equal(learner.codes(pending[:5]), w.random_codes[65:70])


def check_encode_shape_and_determinism(factory):
    learner, w = factory(), World()
    codes = learner.encode(w.images[:12])
    assert codes.shape == (12, BITS // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(learner.encode(w.images[:12]), codes)
    np.testing.assert_array_equal(learner.encode(w.images[[5, 0]]), codes[[5, 0]])  # each image on its own
    assert learner.encode(w.images[:0]).shape == (0, BITS // 8)


def check_should_stop_false_runs_the_round(factory):
    learner, w = factory(), World()
    new = w.add(learner, range(30), frozen=False)
    res = learner.learn_round(w.fetch, should_stop=lambda: False)  # the learner process always passes one
    assert sorted(res.ids) == sorted(new) and learner.n_pending == 0


def check_state_round_trip(factory):
    """``from_bytes(to_bytes())``: the same codes, pending items, network and next round."""
    learner, w = factory(), World()
    w.add(learner, range(40), frozen=True)
    w.add(learner, range(40, 70), frozen=False)
    learner.learn_round(w.fetch)
    w.add(learner, range(70, 90), frozen=False)
    w.add(learner, range(90, 100), frozen=True, labeled=False)
    copy = type(learner).from_bytes(learner.to_bytes())
    ids = w.ids(range(100))
    np.testing.assert_array_equal(copy.codes(ids), learner.codes(ids))
    assert sorted(copy.pending_ids) == sorted(learner.pending_ids) and copy.n_pending == 20
    np.testing.assert_array_equal(copy.encode(w.images[:8]), learner.encode(w.images[:8]))
    a, b = learner.learn_round(w.fetch), copy.learn_round(w.fetch)
    assert a.ids == b.ids
    np.testing.assert_array_equal(a.codes, b.codes)


def check_forgotten_items_are_never_pending_fetched_or_learned_from(factory):
    """Tombstones: removed items (frozen or pending) leave learning; the next round neither fetches nor learns them."""
    learner, w = factory(), World()
    w.add(learner, range(40), frozen=True)
    w.add(learner, range(40, 50), frozen=False)
    gone = w.ids(range(5)) + w.ids(range(45, 50))
    assert learner.forget(gone + ["never-added"]) == 10
    assert learner.n_pending == 5 and sorted(learner.pending_ids) == sorted(w.ids(range(40, 45)))
    asked: list = []
    res = learner.learn_round(lambda ids: (asked.extend(ids), w.fetch(ids))[1])
    assert not set(gone) & set(asked) and sorted(res.ids) == sorted(w.ids(range(40, 45)))
    w.add(learner, range(45, 47), frozen=False)  # an id sent again after its removal learns as a new one
    assert sorted(learner.learn_round(w.fetch).ids) == sorted(w.ids(range(45, 47)))
