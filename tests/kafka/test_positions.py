"""Where partitions resume: shard offsets over Kafka's, and reset logs rewound (fakes for the consumer and shards)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from kafka import TopicPartition

from streamhash import metrics as m
from streamhash.kafka.positions import Positions


class FakeShards:
    """OwnedShards' offset side: one shard per partition number, holding the offsets and topic ids of its topics."""

    def __init__(self, offsets, topic_ids=None):
        self._offsets, self._ids = dict(offsets), {}
        for (topic, partition) in self._offsets:
            if topic in (topic_ids or {}):
                self._ids[(topic, partition)] = topic_ids[topic]

    def offsets(self):
        return dict(self._offsets)

    def offsets_of(self, topic, partition):
        return {k: v for k, v in self._offsets.items() if k[1] == partition}

    def set_offset(self, topic, partition, offset):
        self._offsets[(topic, partition)] = offset

    def topic_id(self, topic, partition):
        return self._ids.get((topic, partition))

    def set_topic_id(self, topic, partition, topic_id):
        self._ids[(topic, partition)] = topic_id


class FakeConsumer:
    def __init__(self, assigned, *, highwater=None, committed=None, topic_id=None, position=0, log_start=0):
        self.assigned, self.hw, self.committed_ = set(assigned), dict(highwater or {}), dict(committed or {})
        self.positions = {tp: position for tp in assigned}
        self.log_start = log_start
        self._client = SimpleNamespace(cluster=SimpleNamespace(topic_id=lambda topic: topic_id))

    def assignment(self):
        return self.assigned

    def highwater(self, tp):
        return self.hw.get(tp)

    def committed(self, tp):
        return self.committed_.get(tp)

    def position(self, tp):
        return self.positions[tp]

    def seek(self, tp, offset):
        self.positions[tp] = offset

    def seek_to_beginning(self, tp):
        self.positions[tp] = self.log_start

    def beginning_offsets(self, tps):
        return {tp: self.log_start for tp in tps}


def rec(topic, partition, offset):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset)


T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_opened_shards_resume_at_their_stored_offset_else_the_log_start_never_kafkas():
    """A new shard holds its whole partition: the group's committed offset may come from a shard elsewhere
    (a root moved aside, another machine), and starting there would leave the new shard without its head."""
    consumer = FakeConsumer([T0, T1], committed={T0: 40, T1: 90}, position=77, log_start=5)
    pos = Positions(consumer, FakeShards({("t", 0): 50}))
    pos.resume([T0, T1])
    assert consumer.positions[T0] == 50  # the shard is the truth (a crash between its commit and Kafka's)
    assert consumer.positions[T1] == 5  # no offset in the shard: the log start, not Kafka's 90
    assert pos.applied == {("t", 0): 50}


def test_a_closed_shard_is_forgotten():
    pos = Positions(FakeConsumer([T0]), FakeShards({("t", 0): 50}))
    pos.forget([T0])
    assert pos.applied == {}


def test_records_the_store_already_holds_are_dropped_and_counted():
    pos = Positions(FakeConsumer([T0], highwater={T0: 60}), FakeShards({("t", 0): 50}))
    before = m.MESSAGES_REPLAYED._value.get()
    kept = pos.keep({T0: [rec("t", 0, o) for o in range(45, 55)]})
    assert [r.offset for r in kept] == list(range(50, 55))
    assert m.MESSAGES_REPLAYED._value.get() == before + 5


def test_a_high_watermark_behind_the_stored_offset_rewinds_to_the_log_start():
    """A memory-storage broker restarted: its log starts again at 0 while the store says 3000."""
    consumer = FakeConsumer([T0], highwater={T0: 500}, position=500)
    store = FakeShards({("t", 0): 3000})
    pos = Positions(consumer, store)
    kept = pos.keep({T0: [rec("t", 0, o) for o in range(0, 500)]})
    assert kept == []  # fetched again from the log start, in order
    assert consumer.positions[T0] == 0 and store.offsets() == {("t", 0): 0} and pos.applied[("t", 0)] == 0


def test_a_changed_topic_id_rewinds_each_partition_whose_shard_stored_the_old_one():
    """The new log may already be past the old offset (no watermark sign). A shard not open now keeps
    the old id and is rewound when its partition is assigned to some worker and the shard opened."""
    old, new = uuid.uuid4(), uuid.uuid4()
    consumer = FakeConsumer([T0], highwater={T0: 5000}, topic_id=new, position=3000)
    shards = FakeShards({("t", 0): 3000, ("t", 1): 2000}, {"t": str(old)})
    pos = Positions(consumer, shards)
    pos.forget([T1])  # not open here
    assert pos.keep({T0: [rec("t", 0, 3000)]}) == []
    assert shards.offsets() == {("t", 0): 0, ("t", 1): 2000}
    assert consumer.positions[T0] == 0 and shards.topic_id("t", 0) == str(new)
    assert pos.keep({}) == [] and pos.epoch == 1  # once
    consumer.assigned.add(T1)  # later opened here: its shard still has the old id
    consumer.hw[T1] = 5000
    pos.resume([T1])
    pos.keep({})
    assert shards.offsets()[("t", 1)] == 0 and pos.epoch == 2


def test_the_first_topic_id_seen_is_recorded_without_a_rewind():
    consumer = FakeConsumer([T0], highwater={T0: 100}, topic_id=uuid.uuid4(), position=50)
    store = FakeShards({("t", 0): 50})
    assert Positions(consumer, store).keep({T0: [rec("t", 0, 50)]}) != []
    assert store.offsets() == {("t", 0): 50} and store.topic_id("t", 0) is not None


def test_lag_is_high_watermark_minus_position():
    consumer = FakeConsumer([T0, T1], highwater={T0: 100}, position=70)
    assert Positions(consumer, FakeShards({})).lag() == 30


def test_a_batch_polled_before_a_rewind_learns_which_partitions_to_drop():
    """A batch in flight when the log was reset held the new log's records past the old offset; written,
    its offsets moved the partition past the new log's head again and those records were lost."""
    consumer = FakeConsumer([T0, T1], highwater={T0: 40, T1: 500}, position=0)
    pos = Positions(consumer, FakeShards({("t", 0): 100, ("t", 1): 100}))
    polled_at = pos.epoch
    pos.keep({})
    assert pos.rewound_since(polled_at) == {("t", 0)}
    assert pos.rewound_since(pos.epoch) == set()
