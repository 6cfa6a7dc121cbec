"""The changelog feed on a real broker (issue 25 item 2): items, learned codes and removals of every partition reach
the learner's sink; its own state store answers fetches; a restart reads only the tail; a re-encode is redone on
its copy with the network that opened the generation."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from kafka import KafkaConsumer

from streamhash.index.store import ItemWrite, Store
from streamhash.kafka import changelog as cl
from streamhash.kafka.changelog_feed import ChangelogFeed
from streamhash.kafka.changelog_state import LearnerState
from streamhash.kafka.modelbus import CodeUpdate
from streamhash.kafka.produce import make_producer
from streamhash.kafka.topics import ensure_topics
from streamhash.model.hashnet import HashNet, HashNetConfig
from streamhash.records import ImageSpec, decode_images, encode_png
from tests.conftest import synthetic_images

pytestmark = pytest.mark.integration


class Sink:
    """A Learning sink that records what it is told: id -> (code, labels, frozen, learned)."""

    def __init__(self):
        self.net = HashNet(HashNetConfig(bits=32))
        self.items: dict[str, tuple] = {}
        self.forgotten: list[str] = []

    def observe(self, ids, codes, labels=None, *, frozen=False, learned=True):
        for i, c, lab in zip(ids, codes, labels or [None] * len(ids)):
            self.items[i] = (c.tobytes(), lab, frozen, learned)

    def apply_reencode(self, ids, codes):
        for i, c in zip(ids, codes):
            self.items[i] = (c.tobytes(), *self.items[i][1:])

    def forget(self, ids):
        self.forgotten += ids
        for i in ids:
            self.items.pop(i, None)


def feed_for(kafka, path, sink, base=(1, None)) -> ChangelogFeed:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    return ChangelogFeed(consumer, kafka.changelog_topic, sink, ImageSpec(), LearnerState(path, kafka.changelog_topic),
                         base=base)


def read_all(feed: ChangelogFeed, want: int) -> int:
    from tests.support import wait_for

    start = feed.records_read
    wait_for(lambda: feed.poll() >= 0 and feed.records_read - start >= want, 30, f"{want} changelog records")
    return feed.records_read - start


def state(item_id, img, labels, ts, *, code=b"\0\0\0\0", model=1, learned=False):
    return cl.ItemState(item_id, code, encode_png(img), "image/png", labels, ts, model=model, learned=learned)


def test_items_codes_and_removals_of_every_partition_reach_the_learner_and_a_restart_reads_the_tail(kafka_settings, tmp_path):
    ensure_topics(kafka_settings)
    topic, images = kafka_settings.changelog_topic, synthetic_images(12, seed=3)[0]
    producer = make_producer(kafka_settings)

    def send(p, key, value):
        producer.send(topic, key=key, value=value, partition=p)

    for k in range(12):  # three per partition; every third unlabeled
        send(k % 4, *cl.encode(state(f"i{k}", images[k], None if k % 3 == 0 else (k % 5,), 100.0 + k)))
    send(0, *cl.encode_offsets({(kafka_settings.topic, 0): 3}))
    producer.flush()
    sink = Sink()
    feed = feed_for(kafka_settings, tmp_path / "learner", sink)
    assert read_all(feed, 13) == 13
    assert set(sink.items) == {f"i{k}" for k in range(12)}
    assert set(feed.pending_at) == {f"i{k}" for k in range(12) if k % 3}
    assert feed.pending_at["i5"] == (1, 105.0)
    got = feed.fetch_images(["i4", "i7"])
    np.testing.assert_array_equal(got, decode_images([(encode_png(images[k]), "image/png") for k in (4, 7)], ImageSpec()))
    ups = feed.code_updates(["i5"], "learned", 2, {"i5": np.array([1, 2, 3, 4], np.uint8)})
    assert ups == [(1, cl_update("i5", 105.0))] and "i5" not in feed.pending_at

    # the worker applied the code (an update naming the item's ts); one naming another ts is stale; a re-sent id
    # (new ts) is new; a stale copy's tombstones on another partition are ignored, real ones forget
    send(1, *cl.encode_update(cl.Updated("i5", 105.0, "learned", b"\1\2\3\4", 2)))
    send(1, *cl.encode_update(cl.Updated("i1", 99.0, "learned", b"\9\9\9\9", 2)))
    send(2, *cl.encode(state("i2", images[2], (3,), 200.0)))
    for tombstone in cl.encode_tombstones("i2"):  # i2 lives in partition 2
        send(3, *tombstone)
    for tombstone in cl.encode_tombstones("i8"):  # i8 lives in partition 0
        send(0, *tombstone)
    producer.flush()
    assert read_all(feed, 7) == 7
    assert sink.items["i5"][0] == b"\1\2\3\4" and "i5" not in feed.pending_at
    assert sink.items["i1"][0] == b"\0\0\0\0" and "i1" in feed.pending_at
    assert sink.items["i2"][1] == {3} and feed.pending_at["i2"] == (2, 200.0)
    assert "i8" not in sink.items and sink.forgotten == ["i8"] and "i8" not in feed.pending_at
    feed.close()

    # a restart: the state store into a new sink, then only what came since (an item and its learned code in one
    # read: it comes in learned)
    send(3, *cl.encode(state("i99", images[0], (1,), 300.0)))
    send(3, *cl.encode_update(cl.Updated("i99", 300.0, "learned", b"\5\5\5\5", 2)))
    producer.flush()
    producer.close()
    again = Sink()
    feed = feed_for(kafka_settings, tmp_path / "learner", again)
    assert read_all(feed, 2) == 2
    assert feed.poll() == 0 and feed.records_read == 2  # the tail alone
    assert set(again.items) == {f"i{k}" for k in range(12) if k != 8} | {"i99"}
    assert again.items["i5"][2:] == (True, True)  # a learned code: frozen
    assert again.items["i99"][0] == b"\5\5\5\5" and again.items["i99"][2:] == (True, True)
    assert again.items["i0"][2] and not again.items["i1"][2]  # unlabeled: frozen; labeled never learned: pending
    assert set(feed.pending_at) == {f"i{k}" for k in range(12) if k % 3 and k not in (5, 8)}

    # a re-encode announced (model 3 opened the generation): inferred codes of older networks re-encoded with it,
    # learned ones kept
    net = HashNet(HashNetConfig(bits=32, seed=7))
    assert feed.rebase(3, net) == 12 - 2  # every item but the learned i5 and i99 (i8 removed, i99 added)
    want = net.encode(decode_images([(encode_png(images[1]), "image/png")], ImageSpec()))[0].tobytes()
    assert again.items["i1"][0] == want and again.items["i5"][0] == b"\1\2\3\4"
    assert feed.rebase(3, net) == 0  # done once
    feed.close()


def cl_update(item_id, ts):
    return CodeUpdate(item_id, 0, "learned", 2, bytes([1, 2, 3, 4]), ts=ts)


def test_unsigned_forged_or_misfit_records_are_skipped_and_counted(kafka_settings, tmp_path):
    ensure_topics(kafka_settings)
    topic, img = kafka_settings.changelog_topic, synthetic_images(1, seed=4)[0][0]
    secret = b"feed-key"
    producer = make_producer(kafka_settings)
    good = cl.encode(state("ok", img, (1,), 10.0))
    wide = cl.encode(state("wide", img, (1,), 11.0, code=bytes(8)))  # a 64-bit code for a 32-bit learner
    for key, value in (good, wide):
        producer.send(topic, key=key, value=value, partition=0, headers=cl.sign_headers(secret, topic, key, value))
    producer.send(topic, key=b"forged", value=cl.encode(state("forged", img, (1,), 12.0))[1], partition=0)
    producer.flush()
    producer.close()
    sink = Sink()
    feed = feed_for(kafka_settings, tmp_path / "learner", sink)
    feed.secret = secret
    assert read_all(feed, 3) == 3
    assert set(sink.items) == {"ok"} and feed.rejected == 2 and feed.state.offsets() == {0: 3}
    feed.close()


def test_a_relearned_code_of_an_item_learned_before_goes_to_its_partition_with_its_timestamp(kafka_settings, tmp_path,
                                                                                             caplog):
    """relearn: a round re-learns the code of an item a former round learned (no longer pending): the update names
    its partition and timestamp from the feed's state store, and the worker's apply path writes it; an item re-sent
    since (not read yet) has another timestamp, so the worker finds its update stale."""
    ensure_topics(kafka_settings)
    topic, images = kafka_settings.changelog_topic, synthetic_images(4, seed=5)[0]
    shard = Store(tmp_path / "shard", bits=32, shard=2)  # the worker's shard of partition 2
    shard.write_batch([ItemWrite(f"i{k}", bytes(4), encode_png(images[k]), "image/png", (k,), 100.0 + k) for k in range(4)])
    producer = make_producer(kafka_settings)

    def send(item_state):
        key, value = cl.encode(item_state)
        producer.send(topic, key=key, value=value, partition=2)

    for k in range(4):
        send(state(f"i{k}", images[k], (k,), 100.0 + k))
    producer.flush()
    sink = Sink()
    feed = feed_for(kafka_settings, tmp_path / "learner", sink)
    assert read_all(feed, 4) == 4
    first = feed.code_updates(["i1", "i3"], "learned", 2, {i: np.full(4, 7, np.uint8) for i in ("i1", "i3")})
    assert shard.apply_updates([u for _, u in first], {})["applied"] == 2
    for k in (1, 3):  # the worker's changelog records of the applied codes
        send(state(f"i{k}", images[k], (k,), 100.0 + k, code=bytes([7] * 4), learned=True))
    producer.flush()
    assert read_all(feed, 2) == 2 and not feed.pending_at.keys() & {"i1", "i3"}

    new = {"i1": np.full(4, 9, np.uint8), "i3": np.full(4, 11, np.uint8)}
    with caplog.at_level(logging.WARNING, logger="streamhash.kafka.changelog_feed"):
        ups = feed.code_updates(["i1", "i3"], "learned", 3, new)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert ups == [(2, CodeUpdate("i1", 0, "learned", 3, bytes([9] * 4), ts=101.0)),
                   (2, CodeUpdate("i3", 0, "learned", 3, bytes([11] * 4), ts=103.0))]
    shard.write_batch([ItemWrite("i3", bytes(4), encode_png(images[3]), "image/png", (0,), 300.0)])  # i3 re-sent
    assert shard.apply_updates([u for _, u in ups], {}) == {"applied": 1, "quarantined": 0, "stale": 1, "missing": 0}
    got = shard.get_item("i1")
    assert got["code"] == bytes([9] * 4) and got["learned_by"] == 3
    assert shard.get_item("i3")["code"] == bytes(4)  # the re-sent item keeps its own code; it is learned as new
    producer.close()
    feed.close()
    shard.close()
