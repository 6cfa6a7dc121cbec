"""The commit order as code, checked with fakes: DLQ flush, then the shards' transactions, then Kafka."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from streamhash.errors import GenerationChanged, StoreFullError
from streamhash.kafka.checkpoint import Checkpoint


class Recorder:
    def __init__(self, log: list, fail: dict):
        self.log, self.fail = log, fail
        self.applied: dict = {}

    def flush(self):
        self._step("flush")

    def advance(self, offsets):
        self.applied.update(offsets)

    def _step_write(self, shard):
        self._step("write" if shard is None else ("write", shard))

    def commit(self, offsets, timeout_ms=None):
        self._step("commit", {(tp.topic, tp.partition): o.offset for tp, o in offsets.items()})

    def _step(self, name, arg=None):
        self.log.append(name if arg is None else (name, arg))
        if name in self.fail:
            raise self.fail[name]


class Write:
    """One shard's write: records itself, fails as told."""

    def __init__(self, r: Recorder, offsets: dict, shard=None):
        self.r, self.offsets, self.shard = r, offsets, shard

    def write(self):
        self.r._step_write(self.shard)


def checkpoint(fail=None):
    log: list = []
    r = Recorder(log, fail or {})
    return Checkpoint(consumer=r, dead_letters=r, positions=r), r, log


def test_flush_then_state_then_offsets():
    cp, r, log = checkpoint()
    assert cp.commit([Write(r, {("t", 0): 7})], {("t", 0): 7}) == 1
    assert log == ["flush", "write", ("commit", {("t", 0): 7})]
    assert r.applied == {("t", 0): 7}


@pytest.mark.parametrize("step,error", [("flush", KafkaTimeoutError()), ("write", StoreFullError("full")),
                                        ("write", GenerationChanged(2, "swapped"))])
def test_a_failed_step_stops_the_steps_after_it(step, error):
    """A dead letter not acknowledged must not let its offset pass; a batch not stored must not be
    committed to Kafka (the caller retries the batch, or re-encodes it for the new generation)."""
    cp, r, log = checkpoint({step: error})
    with pytest.raises(type(error)):
        cp.commit([Write(r, {("t", 0): 1})], {("t", 0): 1})
    assert log[-1] == step and not any(isinstance(x, tuple) for x in log)
    assert r.applied == {}  # the shard's offsets are not marked applied: the retried batch writes it


def test_a_failed_kafka_commit_is_not_an_error():
    """The store already holds the offsets; the next owner of the partition seeks to them."""
    cp, r, log = checkpoint({"commit": KafkaTimeoutError()})
    assert cp.commit([Write(r, {("t", 0): 1})], {("t", 0): 1}) == 1
    assert log == ["flush", "write", ("commit", {("t", 0): 1})]


def test_kafka_offsets_are_committed_at_most_once_per_interval_and_the_newest_is_sent():
    """Every batch's state is written, but Kafka's offsets (a hint: the shards hold the truth) only once per
    interval, with each partition's newest offset; what is pending is committed on flush."""
    now = [0.0]
    log: list = []
    r = Recorder(log, {})
    cp = Checkpoint(consumer=r, dead_letters=r, positions=r, interval_s=1.0, clock=lambda: now[0])
    cp.commit([Write(r, {("t", 0): 1})], {("t", 0): 1})
    now[0] = 0.4
    cp.commit([Write(r, {("t", 0): 2, ("t", 1): 5})], {("t", 0): 2, ("t", 1): 5})
    now[0] = 0.8
    cp.commit([Write(r, {("t", 1): 6})], {("t", 1): 6})
    assert log == ["flush", "write", ("commit", {("t", 0): 1}), "flush", "write", "flush", "write"]
    now[0] = 1.1
    cp.commit([Write(r, {("t", 0): 3})], {("t", 0): 3})
    assert log[-1] == ("commit", {("t", 0): 3, ("t", 1): 6})
    cp.commit([Write(r, {("t", 2): 9})], {("t", 2): 9})
    cp.forget([("t", 2)])  # revoked: the new owner commits it
    cp.commit([Write(r, {("t", 1): 7})], {("t", 1): 7})
    cp.flush_offsets(timeout_s=5)
    assert log[-1] == ("commit", {("t", 1): 7})
    cp.flush_offsets()  # nothing pending: no request
    assert log[-1] == ("commit", {("t", 1): 7}) and log.count("write") == 6


def test_a_retried_batch_skips_the_shards_that_committed_it_and_keeps_their_order():
    """Shards are written in the order given; when the second fails, the retry writes only it (and those after)."""
    cp, r, log = checkpoint({("write", "b"): StoreFullError("full")})
    batch = [Write(r, {("t", 0): 4}, "a"), Write(r, {("t", 1): 9, ("c", 1): 2}, "b"), Write(r, {("t", 2): 3}, "c")]
    with pytest.raises(StoreFullError):
        cp.commit(batch, {("t", 0): 4, ("t", 1): 9, ("c", 1): 2, ("t", 2): 3})
    assert log == ["flush", ("write", "a"), ("write", "b")] and r.applied == {("t", 0): 4}
    r.fail.clear()
    assert cp.commit(batch, {("t", 0): 4, ("t", 1): 9, ("c", 1): 2, ("t", 2): 3}) == 2
    assert log[3:] == ["flush", ("write", "b"), ("write", "c"), ("commit", {("t", 0): 4, ("t", 1): 9, ("c", 1): 2, ("t", 2): 3})]
