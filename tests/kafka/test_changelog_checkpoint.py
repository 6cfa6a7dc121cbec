"""The checkpoint with a changelog: dead letters, then the changelog acknowledged, then the shards (storing the
changelog's offset), then Kafka; a changelog that fails stops the batch before any shard commits."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError

from streamhash.index.store.root import ShardKey
from streamhash.kafka.checkpoint import Checkpoint
from tests.kafka.test_checkpoint import Recorder


class Write:
    def __init__(self, r: Recorder, partition: int, offsets: dict):
        self.r, self.key, self.offsets = r, ShardKey("t", partition), offsets
        self.image_offsets = dict(offsets)

    def write(self):
        self.r._step("write", dict(self.image_offsets))


class Changelog:
    topic = "t.changelog"

    def __init__(self, r: Recorder):
        self.r, self.sent = r, []

    def send(self, w):
        self.sent.append(w.key.partition)
        self.r._step("send", w.key.partition)

    def flush(self):
        self.r._step("changelog")
        return {p: 100 + p for p in self.sent}


def test_the_changelog_is_acknowledged_before_any_shard_commits_and_its_offset_is_stored_with_the_shard():
    log: list = []
    r = Recorder(log, {})
    cp = Checkpoint(consumer=r, dead_letters=r, positions=r, changelog=Changelog(r))
    writes = [Write(r, 0, {("t", 0): 5}), Write(r, 1, {("t", 1): 7})]
    assert cp.commit(writes, {("t", 0): 5, ("t", 1): 7}) == 2
    assert log == ["flush", ("send", 0), ("send", 1), "changelog",
                   ("write", {("t", 0): 5, ("t.changelog", 0): 100}), ("write", {("t", 1): 7, ("t.changelog", 1): 101}),
                   ("commit", {("t", 0): 5, ("t", 1): 7})]
    assert r.applied == {("t", 0): 5, ("t", 1): 7}  # the changelog's offset is the shard's, not a consumed one


def test_a_changelog_not_acknowledged_stops_the_batch_before_the_shards():
    log: list = []
    r = Recorder(log, {"changelog": KafkaTimeoutError()})
    cp = Checkpoint(consumer=r, dead_letters=r, positions=r, changelog=Changelog(r))
    with pytest.raises(KafkaTimeoutError):
        cp.commit([Write(r, 0, {("t", 0): 5})], {("t", 0): 5})
    assert not any(isinstance(x, tuple) and x[0] in ("write", "commit") for x in log) and r.applied == {}
