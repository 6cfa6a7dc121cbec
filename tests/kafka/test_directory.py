"""The serving map (streamhash.kafka.directory): every partition to exactly one live server, a ready copy before a
restoring one, the newest advert first; tombstones and the TTL take servers off; forged adverts are refused."""

from __future__ import annotations

from collections import namedtuple

import pytest

from streamhash.errors import InternalRecordRejected
from streamhash.kafka.directory import Advert, ServingMap, parse_advert
from streamhash.kafka.modelbus import SIGNATURE_HEADER, signature
from streamhash.services.discovery import merge
from streamhash.services.router import Answer

Record = namedtuple("Record", "topic partition offset key value headers")
TOPIC = "t.images.serving"
KEY = b"k" * 32


def advert(url: str, parts, restoring=(), ts=100.0) -> Advert:
    return Advert(url, frozenset(parts), frozenset(restoring), ts)


def test_every_partition_goes_to_exactly_one_server():
    m = ServingMap(ttl_s=10)
    m.apply("http://a", advert("http://a", [0, 1, 2], ts=100))
    m.apply("http://b", advert("http://b", [2, 3], ts=101))  # 2 on both: the newest advert wins
    r = m.routes(range(5), now=105)
    assert r.servers == {"http://a": (0, 1), "http://b": (2, 3)}
    assert r.missing == (4,) and r.restoring == frozenset() and r.partial
    assert sorted(p for ps in r.servers.values() for p in ps) == [0, 1, 2, 3]


def test_a_ready_copy_beats_a_newer_restoring_one_and_restoring_alone_is_partial():
    m = ServingMap(ttl_s=10)
    m.apply("http://old", advert("http://old", [0, 1], ts=100))
    m.apply("http://new", advert("http://new", [0, 1, 2], restoring=[0, 2], ts=103))
    r = m.routes([0, 1, 2], now=104)
    assert r.servers == {"http://old": (0,), "http://new": (1, 2)}
    assert r.restoring == {2} and r.missing == () and r.partial
    m.apply("http://new", advert("http://new", [0, 1, 2], ts=105))  # restored
    r = m.routes([0, 1, 2], now=106)
    assert r.servers == {"http://new": (0, 1, 2)} and not r.partial


def test_ttl_tombstone_and_an_older_advert():
    m = ServingMap(ttl_s=10)
    m.apply("http://a", advert("http://a", [0], ts=100))
    m.apply("http://b", advert("http://b", [1], ts=100))
    assert m.routes([0, 1], now=110).missing == ()
    assert m.routes([0, 1], now=110.5).missing == (0, 1)  # both died without a tombstone: past the TTL
    m.apply("http://a", advert("http://a", [0], ts=109))
    m.apply("http://a", advert("http://a", [0, 1], ts=105))  # a retry of an older word: ignored
    assert m.routes([0, 1], now=112).servers == {"http://a": (0,)}
    m.apply("http://a", None)  # the tombstone of a clean stop
    assert m.routes([0, 1], now=112).missing == (0, 1)
    m.apply("http://gone", None)  # a tombstone for a server never seen: nothing to do


def record(value: bytes | None, key: bytes = b"http://a:1", signed_with: bytes | None = None, headers=None) -> Record:
    if signed_with is not None:
        headers = [(SIGNATURE_HEADER, signature(signed_with, TOPIC, key, b"", value or b""))]
    return Record(TOPIC, 0, 7, key, value, headers or [])


GOOD = advert("http://a:1", [0, 3], [3], ts=5.0).to_value()


def test_parse_signed_forged_unsigned_and_malformed():
    assert parse_advert(record(GOOD)) == ("http://a:1", advert("http://a:1", [0, 3], [3], ts=5.0))
    assert parse_advert(record(GOOD, signed_with=KEY), KEY)[1].partitions == {0, 3}
    assert parse_advert(record(None, signed_with=KEY), KEY) == ("http://a:1", None)
    bad = [record(GOOD), record(GOOD, signed_with=b"other"), record(None),  # unsigned, forged, unsigned tombstone
           record(GOOD, headers=[(SIGNATURE_HEADER, b"00")])]
    for rec in bad:
        with pytest.raises(InternalRecordRejected, match="sign"):
            parse_advert(rec, KEY)
    malformed = [b"[]", b"{", b'{"url": "http://b:1", "partitions": [], "restoring": [], "ts": 1}',
                 b'{"url": "http://a:1", "partitions": [true], "restoring": [], "ts": 1}',
                 b'{"url": "http://a:1", "partitions": [-1], "restoring": [], "ts": 1}',
                 b'{"url": "http://a:1", "partitions": [1], "restoring": [2], "ts": 1}',
                 b'{"url": "http://a:1", "partitions": [1], "restoring": [], "ts": "now"}']
    for value in malformed:
        with pytest.raises(InternalRecordRejected):
            parse_advert(record(value))
    with pytest.raises(InternalRecordRejected, match="key"):
        parse_advert(record(GOOD, key=b""))


def hit(i: str, d: int, p: int) -> dict:
    return {"id": i, "distance": d, "labels": None, "shard": f"t/{p}"}


def answer(url: str, hits: list[dict], parts) -> Answer:
    return Answer(url, 200, {"results": hits, "generation": 1, "model_version": 1, "code_hex": "00", "partial": False,
                             "shards": [{"shard": f"t/{p}", "generation": 1, "model_version": 1, "index_size": 10,
                                         "answered": True} for p in parts]})


def test_merge_orders_by_distance_then_partition_and_drops_a_partition_routed_elsewhere():
    m = ServingMap(ttl_s=10)
    m.apply("http://a", advert("http://a", [0, 2], ts=100))
    m.apply("http://b", advert("http://b", [1, 2], restoring=[1], ts=101))
    routes = m.routes([0, 1, 2, 3], now=101)  # a: 0; b: 1 (restoring), 2; 3 nobody
    a = answer("http://a", [hit("x", 1, 0), hit("stale", 1, 2), hit("y", 3, 0)], [0, 2])  # ignored its partitions
    b = answer("http://b", [hit("u", 1, 1), hit("v", 1, 2), hit("w", 2, 1)], [1, 2])
    out = merge([b, a], routes, "t", k=10)
    assert [h["id"] for h in out["results"]] == ["x", "u", "v", "w", "y"]
    assert [(s["shard"], s["answered"], s.get("restoring")) for s in out["shards"]] == [
        ("t/0", True, None), ("t/1", True, True), ("t/2", True, None), ("t/3", False, None)]
    assert out["index_size"] == 30 and out["partial"] is True
