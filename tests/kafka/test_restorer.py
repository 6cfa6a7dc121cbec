"""Restoring a shard from a real changelog partition: batched, resumable after a crash, reset below the log start."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
from kafka import KafkaConsumer

from streamhash.index.store import ItemWrite, Store
from streamhash.kafka import changelog as cl
from streamhash.kafka import restorer as restorer_mod
from streamhash.kafka.produce import make_producer
from streamhash.kafka.restorer import Restorer

pytestmark = pytest.mark.integration


def _state(i: int, v: int) -> cl.ItemState:
    return cl.ItemState(f"x{i}", bytes([i % 256, v]), f"blob{i}.{v}".encode(), "image/png", (v,), float(v),
                        model=1, learned=v % 2 == 1, learned_by=2 if v % 2 else None)


@pytest.fixture
def changelog(kafka_settings):
    """Partition 0 of a changelog: 60 items, 20 of them written again, 5 removed, an offsets marker after each 10."""
    topic, producer = f"{kafka_settings.topic}.changelog", make_producer(kafka_settings)
    expected: dict = {}
    n = 0
    for i in list(range(60)) + list(range(0, 40, 2)) + [3, 5, 7, 9, 11]:
        if i in expected and i % 2 == 1:
            key, value = cl.encode_tombstones(f"x{i}")[0]
            expected.pop(i)
        else:
            v = 1 if i not in expected else 2
            key, value = cl.encode(_state(i, v))
            expected[i] = v
        producer.send(topic, key=key, value=value, partition=0)
        n += 1
        if n % 10 == 0:
            key, value = cl.encode_offsets({("img", 0): n})
            producer.send(topic, key=key, value=value, partition=0)
    producer.flush()
    producer.close()
    return kafka_settings, topic, {f"x{i}": _state(i, v) for i, v in expected.items()}


def _consumer(kafka):
    return KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest")


def _restore(kafka, store, topic, **kw) -> Restorer:
    r = Restorer(_consumer(kafka), store, topic, 0, batch_records=10, **kw)
    try:
        while not r.step(0.2):
            pass
    finally:
        r.close()
    return r


def _held(store) -> dict:
    ids, _, _ = store.provenance()
    out = {}
    for i in ids:
        rec = store.get_item(i, with_blob=True)
        out[i] = cl.ItemState(i, rec["code"], rec["blob"], rec["ctype"], tuple(rec["labels"]), rec["ts"],
                              model=rec["model"], learned=bool(rec.get("learned")), learned_by=rec.get("learned_by"))
    return out


def test_a_crash_mid_restore_resumes_from_the_shards_changelog_offset(changelog, tmp_path, monkeypatch):
    kafka, topic, expected = changelog
    store = Store(tmp_path / "s", bits=16)
    calls, real = [], restorer_mod.apply_changelog

    def crash_on_the_fourth(*a, **kw):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("killed")
        return real(*a, **kw)

    monkeypatch.setattr(restorer_mod, "apply_changelog", crash_on_the_fourth)
    with pytest.raises(RuntimeError):
        _restore(kafka, store, topic)
    assert store.read_meta()["restoring"] is True  # partial: the query side says so
    reached = store.offsets()[(topic, 0)]
    assert reached == 30  # three runs of 10 records each committed, with the offset they reached
    monkeypatch.setattr(restorer_mod, "apply_changelog", real)
    again = _restore(kafka, store, topic)
    total = 60 + 20 + 5 + 8
    assert again.records == total - reached  # resumed, not replayed from the start
    assert _held(store) == expected
    assert store.offsets()[("img", 0)] == 80 and store.offsets()[(topic, 0)] == total
    assert store.read_meta()["restoring"] is False
    store.close()


def test_records_the_shard_already_holds_are_replayed_without_a_new_seq(changelog, tmp_path):
    """A worker killed after producing a batch's changelog records may have committed the batch to its shard with the
    offset of the records before: the restore replays them. Replayed states the shard holds keep their seq (the
    scale-out test's kill -9 counted 234 items written twice before)."""
    kafka, topic, expected = changelog
    store = Store(tmp_path / "s", bits=16)
    _restore(kafka, store, topic)
    next_seq = store.read_meta()["next_seq"]
    states = sorted(expected.values(), key=lambda e: e.id)
    changed = dataclasses.replace(states[0], labels=(7,))
    counts = restorer_mod.apply_changelog(store, states[1:] + [changed], {})
    assert counts["unchanged"] == len(states) - 1 and counts["written"] == 1
    assert store.read_meta()["next_seq"] == next_seq + 1  # only the state that differs is written again
    assert _held(store) == {**expected, changed.id: changed}
    store.close()


def test_an_offset_below_the_log_start_empties_the_shard_and_restores_from_there(changelog, tmp_path, monkeypatch):
    kafka, topic, expected = changelog
    store = Store(tmp_path / "s", bits=16)
    store.set_offset(topic, 0, 2)
    store.write_batch([ItemWrite("stale", b"\0\0", b"", "image/png", None)])  # a removal the log no longer holds
    monkeypatch.setattr(KafkaConsumer, "beginning_offsets", lambda self, tps: {tp: 5 for tp in tps})
    fresh = []

    def reset():
        store.close()
        shutil.rmtree(tmp_path / "s")
        fresh.append(Store(tmp_path / "s", bits=16))
        return fresh[0]

    r = _restore(kafka, store, topic, reset=reset)
    assert fresh and r.store is fresh[0]
    held = _held(fresh[0])
    assert "stale" not in held
    # offsets 0-4 (x0-x4) lie below the (faked) log start: x0, x2, x4 come again later, x3 is removed later, and x1,
    # only there, is not restored (a real log start passes only records that were deleted)
    assert held == {k: v for k, v in expected.items() if k != "x1"}
    fresh[0].close()


def test_a_shard_from_before_the_changelog_is_sent_there_once_and_then_restores_elsewhere(kafka_settings, tmp_path):
    from streamhash.kafka.changelog_writer import ChangelogWriter
    from streamhash.kafka.topics import ensure_topics

    ensure_topics(kafka_settings)
    topic = kafka_settings.changelog_topic
    legacy = Store(tmp_path / "old", bits=16)
    legacy.write_batch([ItemWrite(f"y{i}", bytes([i, 1]), f"b{i}".encode(), "image/png", (i % 3,), float(i))
                        for i in range(25)], {(kafka_settings.topic, 0): 25}, model_version=1)
    writer = ChangelogWriter(make_producer(kafka_settings), topic)
    _restore(kafka_settings, legacy, topic, writer=writer)
    writer.producer.close()
    assert legacy.offsets()[(topic, 0)] == 26  # 25 items and the offsets marker
    moved = Store(tmp_path / "new", bits=16)
    _restore(kafka_settings, moved, topic)
    assert _held(moved) == _held(legacy) and moved.offsets()[(kafka_settings.topic, 0)] == 25
    legacy.close()
    moved.close()
