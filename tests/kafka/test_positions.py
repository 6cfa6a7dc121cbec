"""Where partitions resume: store offsets over Kafka's, and reset logs rewound (fakes for the consumer)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace

from kafka import TopicPartition

from streamhash import metrics as m
from streamhash.kafka.positions import Positions


class FakeStore:
    def __init__(self, offsets, topic_ids=None):
        self._offsets, self._ids = dict(offsets), dict(topic_ids or {})

    def offsets(self):
        return dict(self._offsets)

    def topic_ids(self):
        return dict(self._ids)

    def set_offset(self, topic, partition, offset):
        self._offsets[(topic, partition)] = offset

    def set_topic_id(self, topic, topic_id):
        self._ids[topic] = topic_id


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

    def beginning_offsets(self, tps):
        return {tp: self.log_start for tp in tps}


def rec(topic, partition, offset):
    return SimpleNamespace(topic=topic, partition=partition, offset=offset)


T0, T1 = TopicPartition("t", 0), TopicPartition("t", 1)


def test_assigned_partitions_resume_at_the_store_offset_when_it_is_ahead_of_kafka():
    consumer = FakeConsumer([T0, T1], committed={T0: 40, T1: 90}, position=40)
    pos = Positions(consumer, FakeStore({("t", 0): 50, ("t", 1): 80}))
    pos.on_assigned([T0, T1])
    pos.reconcile()
    assert consumer.positions[T0] == 50  # crash between the store's commit and Kafka's
    assert consumer.positions[T1] == 40  # Kafka ahead of the store: left alone (never happens with one writer)


def test_records_the_store_already_holds_are_dropped_and_counted():
    pos = Positions(FakeConsumer([T0], highwater={T0: 60}), FakeStore({("t", 0): 50}))
    before = m.MESSAGES_REPLAYED._value.get()
    kept = pos.keep({T0: [rec("t", 0, o) for o in range(45, 55)]})
    assert [r.offset for r in kept] == list(range(50, 55))
    assert m.MESSAGES_REPLAYED._value.get() == before + 5


def test_a_high_watermark_behind_the_stored_offset_rewinds_to_the_log_start():
    """A memory-storage broker restarted: its log starts again at 0 while the store says 3000."""
    consumer = FakeConsumer([T0], highwater={T0: 500}, position=500)
    store = FakeStore({("t", 0): 3000})
    pos = Positions(consumer, store)
    kept = pos.keep({T0: [rec("t", 0, o) for o in range(0, 500)]})
    assert kept == []  # fetched again from the log start, in order
    assert consumer.positions[T0] == 0 and store.offsets() == {("t", 0): 0} and pos.applied[("t", 0)] == 0


def test_a_changed_topic_id_rewinds_every_stored_partition_of_the_topic():
    """The new log may already be past the old offset (no watermark sign), and a partition not assigned
    right now must not resume at its old offset later."""
    old, new = uuid.uuid4(), uuid.uuid4()
    consumer = FakeConsumer([T0], highwater={T0: 5000}, topic_id=new, position=3000)
    store = FakeStore({("t", 0): 3000, ("t", 1): 2000, ("u", 0): 10}, {"t": str(old)})
    pos = Positions(consumer, store)
    assert pos.reconcile() == {T0}
    assert store.offsets() == {("t", 0): 0, ("t", 1): 0, ("u", 0): 10}
    assert consumer.positions[T0] == 0 and store.topic_ids() == {"t": str(new)}
    assert pos.reconcile() == set()  # once


def test_the_first_topic_id_seen_is_recorded_without_a_rewind():
    consumer = FakeConsumer([T0], highwater={T0: 100}, topic_id=uuid.uuid4(), position=50)
    store = FakeStore({("t", 0): 50})
    assert Positions(consumer, store).reconcile() == set()
    assert store.offsets() == {("t", 0): 50} and "t" in store.topic_ids()


def test_lag_is_high_watermark_minus_position():
    consumer = FakeConsumer([T0, T1], highwater={T0: 100}, position=70)
    assert Positions(consumer, FakeStore({})).lag() == 30


def test_a_batch_polled_before_a_rewind_learns_which_partitions_to_drop():
    """A batch in flight when the log was reset held the new log's records past the old offset; written,
    its offsets moved the partition past the new log's head again and those records were lost."""
    consumer = FakeConsumer([T0, T1], highwater={T0: 40, T1: 500}, position=0)
    pos = Positions(consumer, FakeStore({("t", 0): 100, ("t", 1): 100}))
    polled_at = pos.epoch
    pos.reconcile()
    assert pos.rewound_since(polled_at) == {("t", 0)}
    assert pos.rewound_since(pos.epoch) == set()
