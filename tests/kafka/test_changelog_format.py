"""The changelog's record format: what the checkpoint writes, a restore and the learner read back exactly."""

import pytest

from streamhash.errors import InternalRecordRejected
from streamhash.kafka import changelog as cl


def _state(**kw):
    base = dict(id="c3-1", code=bytes(range(8)), blob=b"\x89PNG...", ctype="image/png", labels=(3, 7), ts=12.5,
                model=4, learned=True, learned_by=5, quarantined=False, generation=2, feature=b"\x00\x01" * 10)
    return cl.ItemState(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"feature": None}, {"labels": None, "learned": False, "learned_by": None},
                                {"blob": b"", "model": None}, {"id": "é/ü 1"}])
def test_item_state_round_trip(kw):
    s = _state(**kw)
    key, value = cl.encode(s)
    assert cl.parse(key, value) == s


@pytest.mark.parametrize("u", [cl.Updated("c3-1", 12.5, "learned", bytes(range(8)), 5), cl.Updated("é 1", 3.0, "quarantine")])
def test_update_round_trip_under_a_key_no_item_id_has(u):
    key, value = cl.encode_update(u)
    assert cl.parse(key, value) == u
    assert key != u.id.encode() and key.startswith(cl.UPDATE_PREFIX)


def test_tombstones_and_offsets_marker():
    assert [cl.parse(*t) for t in cl.encode_tombstones("a")] == [cl.Removed("a"), cl.Removed("a")]
    offsets = {("t.images", 3): 17, ("t.codes", 3): 5}
    assert cl.parse(*cl.encode_offsets(offsets)) == cl.Offsets(offsets)
    with pytest.raises(InternalRecordRejected):  # the marker's key is no item id: a tombstone of it is refused
        cl.parse(cl.OFFSETS_KEY, None)


@pytest.mark.parametrize("value", [b"junk", cl.MAGIC + b"\x00\x00\x00\x05{}", cl.encode(_state())[1][:-1]])
def test_malformed_values_are_refused(value):
    with pytest.raises(InternalRecordRejected):
        cl.parse(b"x", value)


@pytest.mark.parametrize("value", [b"junk", cl.MAGIC + b"{}", cl.UPDATE_MAGIC + b'{"ts": 1, "kind": "erase", "learned_by": 1, '
                                   b'"code": ""}', cl.UPDATE_MAGIC + b'{"ts": 1, "kind": "learned", "learned_by": 1, "code": "zz"}'])
def test_malformed_updates_are_refused(value):
    with pytest.raises(InternalRecordRejected):
        cl.parse(cl.UPDATE_PREFIX + b"x", value)


def test_signed_records():
    secret, topic = b"k", "t.images.changelog"
    key, value = cl.encode(_state())
    headers = cl.sign_headers(secret, topic, key, value)
    assert cl.parse(key, value, headers, topic=topic, secret=secret) == _state()
    for bad in ([], cl.sign_headers(b"other", topic, key, value), cl.sign_headers(secret, "other", key, value)):
        with pytest.raises(InternalRecordRejected):
            cl.parse(key, value, bad, topic=topic, secret=secret)
