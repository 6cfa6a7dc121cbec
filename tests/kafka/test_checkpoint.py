"""The commit order as code, checked with fakes: DLQ flush, then the shards' transactions, then Kafka."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from streamhash.errors import GenerationChanged, StoreFullError
from streamhash.kafka.checkpoint import Checkpoint


class Recorder:
    def __init__(self, log: list, fail: dict):
        self.log, self.fail = log, fail

    def flush(self):
        self._step("flush")

    def write_state(self, items):
        self._step("write")
        return list(range(len(items)))

    def commit(self, offsets, timeout_ms=None):
        self._step("commit", {(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})

    def _step(self, name, arg=None):
        self.log.append(name if arg is None else (name, arg))
        if name in self.fail:
            raise self.fail[name]


def checkpoint(fail=None):
    log: list = []
    r = Recorder(log, fail or {})
    return Checkpoint(consumer=r, dead_letters=r), r, log


def test_flush_then_state_then_offsets():
    cp, r, log = checkpoint()
    assert cp.commit(lambda: r.write_state(["a", "b"]), {("t", 0): 7}) == [0, 1]
    assert log == ["flush", "write", ("commit", {("t", 0): 7})]


@pytest.mark.parametrize("step,error", [("flush", KafkaTimeoutError()), ("write", StoreFullError("full")),
                                        ("write", GenerationChanged(2, "swapped"))])
def test_a_failed_step_stops_the_steps_after_it(step, error):
    """A dead letter not acknowledged must not let its offset pass; a batch not stored must not be
    committed to Kafka (the caller retries the batch, or re-encodes it for the new generation)."""
    cp, r, log = checkpoint({step: error})
    with pytest.raises(type(error)):
        cp.commit(lambda: r.write_state(["a"]), {("t", 0): 1})
    assert log[-1] == step and not any(isinstance(x, tuple) for x in log)


def test_a_failed_kafka_commit_is_not_an_error():
    """The store already holds the offsets; the next owner of the partition seeks to them."""
    cp, r, log = checkpoint({"commit": KafkaTimeoutError()})
    assert cp.commit(lambda: r.write_state(["a"]), {("t", 0): 1}) == [0]
    assert log == ["flush", "write", ("commit", {("t", 0): 1})]


def test_kafka_offsets_are_committed_at_most_once_per_interval_and_the_newest_is_sent():
    """Every batch's state is written, but Kafka's offsets (a hint: the shards hold the truth) only once per
    interval, with each partition's newest offset; what is pending is committed on flush."""
    now = [0.0]
    log: list = []
    r = Recorder(log, {})
    cp = Checkpoint(consumer=r, dead_letters=r, interval_s=1.0, clock=lambda: now[0])
    cp.commit(lambda: r.write_state(["a"]), {("t", 0): 1})
    now[0] = 0.4
    cp.commit(lambda: r.write_state(["b"]), {("t", 0): 2, ("t", 1): 5})
    now[0] = 0.8
    cp.commit(lambda: r.write_state(["c"]), {("t", 1): 6})
    assert log == ["flush", "write", ("commit", {("t", 0): 1}), "flush", "write", "flush", "write"]
    now[0] = 1.1
    cp.commit(lambda: r.write_state(["d"]), {("t", 0): 3})
    assert log[-1] == ("commit", {("t", 0): 3, ("t", 1): 6})
    cp.commit(lambda: r.write_state(["e"]), {("t", 2): 9})
    cp.forget([("t", 2)])  # revoked: the new owner commits it
    cp.commit(lambda: r.write_state(["f"]), {("t", 1): 7})
    cp.flush_offsets(timeout_s=5)
    assert log[-1] == ("commit", {("t", 1): 7})
    cp.flush_offsets()  # nothing pending: no request
    assert log[-1] == ("commit", {("t", 1): 7}) and log.count("write") == 6
