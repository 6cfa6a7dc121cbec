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


@pytest.fixture
def worker(tmp_path):
    settings = Settings(learn={"round_every": 10_000, "omega": 64, "epochs": 1, "reservoir_size": 50})
    store = Store(tmp_path / "index", bits=32)
    net = HashNet(HashNetConfig(bits=32))
    version = store.put_model(net.to_bytes(), make_current=True)
    images, labels = synthetic_images(120, seed=2)
    codes = net.encode(images)
    store.write_batch([ItemWrite(f"i{i}", codes[i].tobytes(), encode_npy(images[i]), "application/x-npy",
                                 (int(labels[i]),) if i % 3 else None) for i in range(120)], model_version=version)
    yield SimpleNamespace(store=store, spec=ImageSpec.from_settings(settings), settings=settings,
                          state=ModelState(net, version=version, generation=1))
    store.close()


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
