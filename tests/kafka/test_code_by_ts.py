"""A learned code addressed by the item's timestamp (a changelog-fed learner knows no shard seq): applied to the
item it was learned from, stale for an id written again since, whatever seq a restore gave the item."""

from __future__ import annotations

import json

import pytest

from streamhash.errors import InternalRecordRejected
from streamhash.index.store import ItemWrite, Store
from streamhash.kafka.modelbus import CodeUpdate, parse_code


class _Rec:
    def __init__(self, key, value):
        self.key, self.value, self.headers, self.topic, self.partition, self.offset = key, value, [], "t.codes", 0, 0


def test_a_code_by_timestamp_applies_to_its_item_and_is_stale_once_the_id_is_sent_again(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch([ItemWrite(f"id{i}", bytes(4), b"b", "image/png", (1,), ts=1000.0 + i) for i in range(3)])
    s.write_batch([ItemWrite("id0", bytes(4), b"c", "image/png", (2,), ts=2000.0)])  # re-sent: a new timestamp
    code = bytes([7, 7, 7, 7])
    got = s.apply_updates([CodeUpdate("id0", 0, "learned", 2, code, ts=1000.0),
                           CodeUpdate("id1", 0, "learned", 2, code, ts=1001.0),
                           CodeUpdate("id2", 0, "quarantine", 2, ts=1002.0)], {})
    assert got == {"applied": 1, "stale": 1, "missing": 0, "quarantined": 1}
    assert s.get_item("id1")["code"] == code and s.get_item("id1")["learned_by"] == 2
    assert s.get_item("id0")["code"] == bytes(4)
    # a newer learned code of the same item (a restarted learner's) still applies: the last one wins
    again = s.apply_updates([CodeUpdate("id1", 0, "learned", 3, bytes([1, 2, 3, 4]), ts=1001.0)], {})
    assert again["applied"] == 1 and s.get_item("id1")["learned_by"] == 3


def test_the_timestamp_travels_on_the_codes_topic_and_is_checked():
    u = CodeUpdate("a", 0, "learned", 4, b"\x01\x02\x03\x04", ts=1733520000.123)
    back = parse_code(_Rec(b"a", u.to_value()), 4)
    assert back == u
    assert "ts" not in json.loads(CodeUpdate("a", 5, "learned", 4, b"\x01\x02\x03\x04").to_value())
    for bad in ("x", True, float("nan")):
        value = json.dumps({"seq": 0, "kind": "learned", "model_version": 4, "code": "01020304", "ts": bad}).encode()
        with pytest.raises(InternalRecordRejected):
            parse_code(_Rec(b"a", value), 4)
