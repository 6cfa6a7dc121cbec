"""The re-router's decisions and its place in the commit order, with a fake producer (issue 25, item 4): a record
away from its key's home partition is produced there with its key, value, headers and timestamp plus where it came
from; one at home, of another topic, with a key that cannot be an id, too large, or re-routed once already, stays;
the produce is acknowledged before any shard write, and a failed one keeps the batch from committing."""

from __future__ import annotations

from collections import namedtuple

import pytest
from kafka.errors import KafkaTimeoutError

from streamhash import metrics as m
from streamhash.kafka.checkpoint import Checkpoint
from streamhash.kafka.partitioner import crc32_partition, murmur2_partition
from streamhash.records import MAX_HEADERS
from streamhash.services.worker.rehome import HEADER, Rehome

Rec = namedtuple("Rec", "topic partition offset key value headers timestamp")


class Future:
    def __init__(self, error=None):
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error
        return "ok"


class Producer:
    def __init__(self, log=None):
        self.sent, self.fail, self.log = [], [], log if log is not None else []

    def send(self, topic, **kw):
        self.sent.append((topic, kw))
        return Future(self.fail.pop(0) if self.fail else None)

    def flush(self, timeout=None):
        self.log.append("rehome")


def rehome(producer, partitioner="murmur2", partitions=4):
    return Rehome(producer, "imgs", partitioner, lambda topic: set(range(partitions)), max_value_bytes=100)


def away_key(partitioner="murmur2") -> tuple[bytes, int, int]:
    """A key whose home under ``partitioner`` is not where the other rule puts it: (key, home, elsewhere)."""
    home, other = (murmur2_partition, crc32_partition) if partitioner == "murmur2" else (crc32_partition, murmur2_partition)
    for i in range(100):
        key = f"c3-{i}".encode()
        if home(key, 4) != other(key, 4):
            return key, home(key, 4), other(key, 4)
    raise AssertionError("no key differs")


@pytest.mark.parametrize("partitioner", ["murmur2", "crc32"])
def test_a_record_away_from_home_is_sent_home_with_where_it_came_from(partitioner):
    p = Producer()
    r = rehome(p, partitioner)
    key, home, elsewhere = away_key(partitioner)
    headers = [("labels", b"7")]
    assert not r.away(Rec("imgs", home, 5, key, b"png", headers, 1234))
    assert r.away(Rec("imgs", elsewhere, 9, key, b"png", headers, 1234))
    assert r.away(Rec("imgs", elsewhere, 10, key, None, [], 1235))  # a tombstone follows its id
    assert p.sent == [
        ("imgs", dict(key=key, value=b"png", headers=[("labels", b"7"), (HEADER, f"{elsewhere}:9".encode())],
                      partition=home, timestamp_ms=1234)),
        ("imgs", dict(key=key, value=None, headers=[(HEADER, f"{elsewhere}:10".encode())], partition=home,
                      timestamp_ms=1235))]
    before = m.REROUTED.labels(topic="imgs")._value.get()
    assert r.flush() == 2 and r.flush() == 0
    assert m.REROUTED.labels(topic="imgs")._value.get() == before + 2


def test_what_stays_where_it_is():
    p = Producer()
    r = rehome(p)
    key, home, elsewhere = away_key()
    assert not r.away(Rec("other", elsewhere, 0, key, b"x", [], 1))  # not the images topic
    assert not r.away(Rec("imgs", elsewhere, 0, None, b"x", [], 1))  # no key: dead-lettered here
    assert not r.away(Rec("imgs", elsewhere, 0, b"\xff\xfe", b"x", [], 1))  # not an id
    assert not r.away(Rec("imgs", elsewhere, 0, key, b"x" * 101, [], 1))  # over the value limit: dead-lettered here
    assert not r.away(Rec("imgs", elsewhere, 0, key, b"x", [(HEADER, b"1:2")], 1))  # never twice
    assert not rehome(p, partitions=1).away(Rec("imgs", 0, 0, key, b"x", [], 1))
    assert p.sent == []


def test_a_record_at_the_header_limit_is_sent_without_the_marker():
    p = Producer()
    key, _, elsewhere = away_key()
    headers = [(f"h{i}", b"") for i in range(MAX_HEADERS)]
    assert rehome(p).away(Rec("imgs", elsewhere, 0, key, b"x", headers, 1))
    assert p.sent[0][1]["headers"] == headers


def test_the_checkpoint_flushes_re_routed_records_before_any_shard_write_and_a_failure_commits_nothing():
    log: list = []

    class Step:
        applied: dict = {}

        def flush(self):
            log.append("dlq")

        def advance(self, offsets):
            self.applied.update(offsets)

        def commit(self, offsets, timeout_ms=None):
            log.append("commit")

    class Write:
        offsets = {("imgs", 0): 3}

        def write(self):
            log.append("write")

    p = Producer(log)
    r = rehome(p)
    step = Step()
    cp = Checkpoint(step, step, step, rehome=r)
    key, _, elsewhere = away_key()
    p.fail = [KafkaTimeoutError()]  # the first send fails, the one the flush sends again succeeds
    assert r.away(Rec("imgs", elsewhere, 2, key, b"x", [], 1))
    with pytest.raises(KafkaTimeoutError):
        cp.commit([Write()], {("imgs", 0): 3})
    assert log == ["dlq", "rehome"] and len(p.sent) == 2  # sent again, nothing written or committed
    cp.commit([Write()], {("imgs", 0): 3})
    assert log[2:] == ["dlq", "rehome", "write", "commit"]


def test_a_re_routed_copy_older_than_its_ids_standing_write_is_not_written():
    Item = namedtuple("Item", "id")

    class Store:
        def __init__(self, held):
            self.held = held

        def get_item(self, item_id):
            return {"ts": self.held[item_id]} if item_id in self.held else None

    stores = {"s0": Store({"a": 5.0, "b": 5.0, "c": 5.0}), "s1": None}
    moved, direct = [(HEADER, b"1:0")], []
    batch = [  # (id, shard, ts, headers) -> kept?
        ("a", "s0", 4.0, moved, False),  # older than the shard's write
        ("b", "s0", 5.0, moved, True),  # the same send again (a re-route replayed after a crash)
        ("c", "s0", 6.0, moved, True),  # newer
        ("d", "s0", 1.0, direct, True),  # came home directly: its partition orders it
        ("d", "s0", 0.5, moved, False),  # older than the batch's own earlier write of d
        ("a", "s0", 1.0, direct, True),  # direct after a dropped copy: written
        ("e", "s1", 1.0, moved, True),  # shard closed under the batch: left to fail with it
    ]
    r = rehome(Producer())
    before = m.REROUTED_STALE.labels(topic="imgs")._value.get()
    keep = r.current([Item(i) for i, *_ in batch], [Rec("imgs", 0, 0, b"k", b"v", h, 0) for *_, h, _ in batch],
                     [ts for _, _, ts, _, _ in batch], [s for _, s, *_ in batch], stores.get)
    assert keep == [n for n, row in enumerate(batch) if row[-1]]
    assert m.REROUTED_STALE.labels(topic="imgs")._value.get() == before + 2


def test_a_replayed_dead_letter_loses_the_re_route_mark_so_it_may_be_re_routed_again():
    from streamhash.kafka.dlq_reader import DeadLetter

    d = DeadLetter(b"k", b"v", [("labels", b"1"), (HEADER, b"2:7"), ("error.stage", b"shape"),
                                ("source.partition", b"1")], 0, 0, 0)
    assert d.original_headers == [("labels", b"1")]
