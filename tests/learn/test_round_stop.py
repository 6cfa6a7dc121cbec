"""A learning round asks ``should_stop`` between training batches: a stopping learner process abandons a round
of any size at once (RoundAbandoned), with nothing of it frozen, rather than finish it first."""

import numpy as np
import pytest

from streamhash.config import LearnSettings
from streamhash.learn.dihn import DIHNLearner, RoundAbandoned
from streamhash.learn.online import OnlineHasher
from streamhash.model.hashnet import HashNet, HashNetConfig
from tests.conftest import synthetic_images


def stop_after(n: int):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > n

    return should_stop, calls


def test_a_round_is_abandoned_between_batches_and_freezes_nothing():
    images, labels = synthetic_images(300, seed=3)
    dihn = DIHNLearner(HashNet(HashNetConfig(bits=16)), omega=300, epochs=50, iters=3, batch_size=50)
    dihn.add_items(list(range(300)), dihn.encode(images), labels.tolist(), frozen=False)
    should_stop, calls = stop_after(5)
    with pytest.raises(RoundAbandoned):
        dihn.learn_round(lambda ids: images[np.asarray(ids)], should_stop=should_stop)
    assert len(calls) == 6  # asked before each batch: stopped at the 6th, far from the 3 x 50 x 6 of the round
    assert dihn.n_pending == 300 and dihn.rounds == 0


def test_the_online_hasher_passes_it_down_and_a_round_runs_whole_without_it():
    images, labels = synthetic_images(120, seed=4)
    s = LearnSettings(omega=120, epochs=1, iters=1, reservoir_size=40, mi_bootstrap=5, holdout_fraction=0.0)
    hasher = OnlineHasher(HashNet(HashNetConfig(bits=16)), s)
    hasher.observe(list(range(120)), hasher.net.encode(images), labels.tolist())
    fetch = lambda ids: images[np.asarray(ids)]  # noqa: E731
    with pytest.raises(RoundAbandoned):
        hasher.learn_round(fetch, should_stop=lambda: True)
    report = hasher.learn_round(fetch, should_stop=lambda: False)
    assert len(report.round.ids) == 120 and hasher.n_pending == 0
