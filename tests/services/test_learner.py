"""The worker's learner thread over a real LMDB store: restarts, empty rounds, failed rounds."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace

import pytest

from streamhash import metrics as m
from streamhash.config import Settings
from streamhash.index.store import ItemWrite, Store
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.model.state import ModelState
from streamhash.records import ImageSpec, encode_npy
from streamhash.services.learner import LearnerThread
from tests.conftest import synthetic_images


def make_worker(path, *, labeled: bool = True, **learn):
    settings = Settings(learn={"round_every": 10_000, "omega": 64, "epochs": 1, "reservoir_size": 50, "holdout_fraction": 0.0, **learn})
    store = Store(path, bits=32)
    net = HashNet(HashNetConfig(bits=32))
    version = store.put_model(net.to_bytes(), make_current=True)
    images, labels = synthetic_images(120, seed=2)
    codes = net.encode(images)
    store.write_batch([ItemWrite(f"i{i}", codes[i].tobytes(), encode_npy(images[i]), "application/x-npy",
                                 (int(labels[i]),) if i % 3 and labeled else None) for i in range(120)], model_version=version)
    return SimpleNamespace(store=store, spec=ImageSpec.from_settings(settings), settings=settings,
                           state=ModelState(net, version=version, generation=1))


@pytest.fixture
def worker(tmp_path):
    w = make_worker(tmp_path / "index")
    yield w
    w.store.close()


def run_until(thread: LearnerThread, predicate, timeout: float = 60) -> None:
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)
    finally:
        thread.stop()
        thread.join(10)


def test_labeled_items_indexed_but_not_learned_before_a_restart_are_learned_next(worker):
    """They were registered as frozen old codes after a restart, so the crash lost their learning."""
    learner = LearnerThread(worker)
    assert learner.hasher.n_pending == 80  # every labeled item: none was learned yet
    learner.request_round()
    run_until(learner, lambda: worker.state.current().version == 2)
    learned = worker.store.snapshot().learned
    assert learned.sum() == 80
    assert LearnerThread(worker).hasher.n_pending == 0  # and a second restart has nothing left to learn


def test_a_requested_round_with_nothing_new_keeps_the_model_version(worker, caplog):
    caplog.set_level(logging.INFO, logger="streamhash.learner")
    learner = LearnerThread(worker)
    learner.request_round()
    run_until(learner, lambda: worker.state.current().version == 2)
    models_before = worker.store.get_model(3)
    learner = LearnerThread(worker)
    learner.request_round()
    run_until(learner, lambda: "no new labeled items" in caplog.text)
    assert worker.state.current().version == 2 and worker.store.read_meta()["model_version"] == 2
    assert models_before == worker.store.get_model(3) == (3, None)  # no version 3 was stored


def test_a_failed_round_quarantines_its_items_and_the_next_round_succeeds(worker, monkeypatch):
    learner = LearnerThread(worker)
    failures = m.LEARNING_ROUND_FAILURES._value.get()
    real = learner.hasher.learn_round
    calls = []

    def fail_once(fetch):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("Maximum allowed dimension exceeded")  # what an unbounded label once did
        return real(fetch)

    monkeypatch.setattr(learner.hasher, "learn_round", fail_once)
    learner.request_round()
    run_until(learner, lambda: m.LEARNING_ROUND_FAILURES._value.get() > failures)
    assert learner.hasher.n_pending == 0  # quarantined: not retried forever
    assert worker.store.snapshot().quarantined.sum() == 80
    assert worker.state.current().version == 1
    # new labeled items are learned by the next round as usual
    images, labels = synthetic_images(20, seed=9)
    codes = worker.state.current().net.encode(images)
    worker.store.write_batch([ItemWrite(f"n{i}", codes[i].tobytes(), encode_npy(images[i]), "application/x-npy",
                                        (int(labels[i]),)) for i in range(20)])
    learner = LearnerThread(worker)
    monkeypatch.setattr(learner.hasher, "learn_round", fail_once)
    assert learner.hasher.n_pending == 20  # the quarantine outlives a restart
    learner.request_round()
    run_until(learner, lambda: worker.state.current().version == 2)


def lag_count() -> float:
    return m.WORKER_REGISTRY.get_sample_value("streamhash_learn_lag_seconds_count") or 0.0


def test_a_reencode_keeps_the_rounds_learned_codes_and_encodes_only_the_stale_inferred_ones(tmp_path):
    w = make_worker(tmp_path / "index", mi_threshold=-1.0)  # every round re-encodes
    learner, rounds = LearnerThread(w), []
    real = learner.hasher.learn_round
    learner.hasher.learn_round = lambda fetch: rounds.append(real(fetch)) or rounds[-1]
    reencoded, lags = m.REENCODED_IMAGES._value.get(), lag_count()
    learner.request_round()
    run_until(learner, lambda: w.state.current().generation == 2)
    assert rounds[0].reencode and len(rounds[0].round.ids) == 80
    snap = w.store.snapshot()
    assert (snap.generation, snap.model_version) == (2, 2) and snap.learned.sum() == 80
    codes = dict(zip(snap.ids, snap.codes))
    for item_id, code in zip(rounds[0].round.ids, rounds[0].round.codes):
        assert bytes(codes[item_id]) == bytes(code)  # DCC's codes, not the new network's
    assert m.REENCODED_IMAGES._value.get() - reencoded == 40  # the unlabeled ones, and nothing else
    _, learned, model = w.store.provenance()
    assert set(model[~learned].tolist()) == {2} and (~learned).sum() == 40
    assert lag_count() - lags == 80
    w.store.close()


def test_a_round_runs_once_the_oldest_labeled_item_waited_round_max_age_s(tmp_path):
    w = make_worker(tmp_path / "index", round_max_age_s=0.5)  # 80 pending, far below round_every
    learner, lags = LearnerThread(w), lag_count()
    started = time.monotonic()
    run_until(learner, lambda: w.state.current().version == 2)
    assert time.monotonic() - started >= 0.5 and w.store.snapshot().learned.sum() == 80
    assert lag_count() - lags == 80
    w.store.close()


def test_an_unlabeled_only_stream_says_it_cannot_learn(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="streamhash.learner")
    w = make_worker(tmp_path / "index", labeled=False, round_every=200, round_max_age_s=0)
    learner = LearnerThread(w)
    blocked = lambda: m.WORKER_REGISTRY.get_sample_value("streamhash_learning_blocked", {"reason": "no_labels"})
    learner.check_blocked()
    assert blocked() == 0  # the 120 unlabeled items in the store: fewer than a round needs
    images, _ = synthetic_images(120, seed=5)
    records = [SimpleNamespace(id=f"u{i}", labels=None) for i in range(120)]
    learner.on_indexed(records, w.state.current().net.encode(images), list(range(120)))
    learner.check_blocked()
    learner.check_blocked()
    assert blocked() == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot learn" in warnings[0].getMessage()
    learner.on_indexed([SimpleNamespace(id="l0", labels=(3,))], w.state.current().net.encode(images[:1]), [120])
    learner.check_blocked()
    assert blocked() == 0 and "learning starts" in caplog.text
    w.store.close()


def test_the_holdout_keeps_inferred_codes_and_the_mi_test_reports_its_noise_and_cost(tmp_path):
    from streamhash.learn.online import in_holdout

    w = make_worker(tmp_path / "index", holdout_fraction=0.25)
    labeled = [f"i{i}" for i in range(120) if i % 3]
    held = {i for i, h in zip(labeled, in_holdout(labeled, 0.25)) if h}
    assert 5 < len(held) < 40
    learner, rounds = LearnerThread(w), []
    assert learner.hasher.n_pending == 80 - len(held)
    real = learner.hasher.learn_round
    learner.hasher.learn_round = lambda fetch: rounds.append(real(fetch)) or rounds[-1]
    learner.request_round()
    run_until(learner, lambda: w.state.current().version == 2)
    rep = rounds[0]
    assert set(rep.round.ids) == set(labeled) - held
    assert rep.cost == 40 + len(held)  # the unlabeled and the hold-out: every inferred code is stale now
    assert rep.mi.n == 50 and rep.sigma >= 0 and rep.reencode == (rep.gain > 2 * rep.sigma)
    gauge = m.WORKER_REGISTRY.get_sample_value
    assert gauge("streamhash_mi_gain_sigma") == pytest.approx(rep.sigma)
    assert gauge("streamhash_reencode_cost_items") == 40 + len(held)
    ids, learned, _ = w.store.provenance()
    learned_ids = {i for i, x in zip(ids, learned) if x}
    assert learned_ids == set(labeled) - held  # the hold-out kept its inferred codes
    restarted = LearnerThread(w)  # the same hold-out after a restart: nothing left to learn
    assert restarted.hasher.n_pending == 0 and not restarted.hasher.ready()
    assert restarted.hasher.n_inferred == 40 + len(held)
    w.store.close()
