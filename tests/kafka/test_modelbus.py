"""The internal topics' parsers: every forged shape refused with a typed error, signatures checked, versions in order.

Each case below stopped or crash-looped the worker on a9a6b47 (issue 26): a ``"version": null`` header raised a
TypeError out of ``parse_model``, a 2-byte learned code raised in the store's transaction.
"""

from __future__ import annotations

import json
from collections import namedtuple

import pytest

from streamhash.config import ModelSettings
from streamhash.errors import InternalRecordRejected
from streamhash.kafka.modelbus import (MODEL_HEADER, SIGNATURE_HEADER, CodeUpdate, ModelAnnouncement, ModelReader,
                                       model_key, parse_code, parse_model, signature)
from streamhash.model.state import checked_model, initial_net

Rec = namedtuple("Rec", "topic partition offset key value headers")
KEY = b"s3cret"


def model_record(meta, value=b"weights", *, key=None, offset=0, sign_with=None, topic="p.models"):
    raw_meta = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    version = meta.get("version") if isinstance(meta, dict) else None
    if key is None:
        key = model_key(version) if type(version) is int and version >= 0 else b"model-x"
    headers = [(MODEL_HEADER, raw_meta)]
    if sign_with:
        headers.append((SIGNATURE_HEADER, signature(sign_with, topic, key, raw_meta, value)))
    return Rec(topic, 0, offset, key, value, headers)


def meta(version=2, generation=1, reencode=False, **extra):
    return {"version": version, "generation": generation, "reencode": reencode, "published": 1.0, **extra}


def code_record(value, key=b"item-1", *, sign_with=None, signed_for="p.codes"):
    value = value if isinstance(value, bytes) else json.dumps(value).encode()
    headers = [(SIGNATURE_HEADER, signature(sign_with, signed_for, key, b"", value))] if sign_with else []
    return Rec("p.codes", 1, 7, key, value, headers)


def test_a_well_formed_model_parses():
    a = parse_model(model_record(meta(version=3, generation=2, reencode=True)))
    assert (a.version, a.generation, a.reencode, a.raw) == (3, 2, True, b"weights")


@pytest.mark.parametrize("bad, why", [
    (meta(version=None), "version must be an integer"),
    (meta(version="2"), "version must be an integer"),
    (meta(version=2.0), "version must be an integer"),
    (meta(version=True), "version must be an integer"),
    (meta(version=0), "version must be an integer"),
    (meta(version=2**40), "version must be an integer"),
    (meta(generation=None), "generation must be an integer"),
    (meta(version=2, generation=3), "generation must be an integer"),
    (meta(reencode="yes"), "reencode must be true or false"),
    (meta(published=float("nan")), "published must be a number"),
    ({k: v for k, v in meta().items() if k != "version"}, "version must be an integer"),
    (b"not json", "not JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"x" * 5000, "header of 5000 bytes"),
])
def test_a_forged_model_header_is_refused_with_its_reason(bad, why):
    with pytest.raises(InternalRecordRejected, match=why) as err:
        parse_model(model_record(bad))
    assert err.value.stage == "models" and "offset 0" in str(err.value)


def test_a_model_without_header_or_value_or_with_two_headers_is_refused():
    with pytest.raises(InternalRecordRejected, match="no streamhash-model header"):
        parse_model(Rec("p.models", 0, 0, model_key(2), b"w", []))
    with pytest.raises(InternalRecordRejected, match="a network of 0 bytes"):
        parse_model(model_record(meta(), value=b""))
    two = model_record(meta())
    with pytest.raises(InternalRecordRejected, match="2 streamhash-model headers"):
        parse_model(two._replace(headers=two.headers * 2))
    with pytest.raises(InternalRecordRejected, match="is not b'model-000000000002'"):
        parse_model(model_record(meta(), key=b"model-000000000009"))


def test_with_a_key_only_a_model_signed_with_it_for_this_topic_is_taken():
    assert parse_model(model_record(meta(), sign_with=KEY), KEY).version == 2
    with pytest.raises(InternalRecordRejected, match="not signed"):
        parse_model(model_record(meta()), KEY)
    with pytest.raises(InternalRecordRejected, match="bad signature"):
        parse_model(model_record(meta(), sign_with=b"another key"), KEY)
    signed = model_record(meta(), sign_with=KEY)
    with pytest.raises(InternalRecordRejected, match="bad signature"):  # the weights changed after signing
        parse_model(signed._replace(value=b"weightz"), KEY)
    with pytest.raises(InternalRecordRejected, match="bad signature"):  # signed for another pipeline's topic
        parse_model(signed._replace(topic="other.models"), KEY)
    with pytest.raises(InternalRecordRejected, match="bad signature"):  # the metadata changed after signing
        parse_model(signed._replace(headers=[(MODEL_HEADER, json.dumps(meta(reencode=True)).encode()),
                                             signed.headers[1]]), KEY)


def test_a_well_formed_code_update_parses():
    u = parse_code(code_record({"seq": 4, "kind": "learned", "model_version": 2, "code": "0a0b0c0d"}), 4)
    assert u == CodeUpdate("item-1", 4, "learned", 2, bytes.fromhex("0a0b0c0d"))
    q = parse_code(code_record({"seq": 4, "kind": "quarantine", "model_version": 2, "code": ""}), 4)
    assert q.kind == "quarantine" and q.code == b""


@pytest.mark.parametrize("value, why", [
    ({"seq": 4, "kind": "learned", "model_version": 0, "code": "abcd"}, "model_version must be an integer"),
    ({"seq": 4, "kind": "learned", "model_version": 2, "code": "abcd"}, "a learned code of 2 bytes"),
    ({"seq": 4, "kind": "learned", "model_version": 2, "code": "zz" * 4}, "code is not hex"),
    ({"seq": 4, "kind": "learned", "model_version": 2, "code": 17}, "code must be a hex string"),
    ({"seq": None, "kind": "learned", "model_version": 2, "code": "00" * 4}, "seq must be an integer"),
    ({"seq": -1, "kind": "learned", "model_version": 2, "code": "00" * 4}, "seq must be an integer"),
    ({"seq": "4", "kind": "learned", "model_version": 2, "code": "00" * 4}, "seq must be an integer"),
    ({"seq": 4, "kind": "promoted", "model_version": 2, "code": "00" * 4}, "unknown code update kind"),
    ({"seq": 4, "kind": "quarantine", "model_version": 2, "code": "00" * 4}, "a quarantine mark carries no code"),
    ([1, 2, 3], "must be a JSON object"),
    (b"\xff\xfe", "not a UTF-8 key and a JSON value"),
    (b"x" * 5000, "a value of 5000 bytes"),
])
def test_a_forged_code_update_is_refused_with_its_reason(value, why):
    with pytest.raises(InternalRecordRejected, match=why) as err:
        parse_code(code_record(value), 4)
    assert err.value.stage == "codes"


def test_code_updates_are_checked_against_the_key():
    good = {"seq": 4, "kind": "learned", "model_version": 2, "code": "00" * 4}
    assert parse_code(code_record(good, sign_with=KEY), 4, KEY).seq == 4
    with pytest.raises(InternalRecordRejected, match="not signed"):
        parse_code(code_record(good), 4, KEY)
    with pytest.raises(InternalRecordRejected, match="bad signature"):  # a model's signature does not fit a code
        parse_code(code_record(good, sign_with=KEY, signed_for="p.models"), 4, KEY)


class _Reader(ModelReader):
    """The reader's admission rules without a consumer."""

    def __init__(self, check=None):  # noqa: D107  (no Kafka: only admit() is exercised)
        self.key, self.check, self.last = None, check, None


def test_versions_are_taken_in_order_never_backwards_or_past_a_gap():
    r = _Reader()
    assert r.admit(model_record(meta(version=5, generation=2))).version == 5  # the first read may be any
    assert r.admit(model_record(meta(version=5, generation=2))) is None  # a producer's retry: skipped silently
    with pytest.raises(InternalRecordRejected, match="version 999999 after version 5"):
        r.admit(model_record(meta(version=999999, generation=2)))
    with pytest.raises(InternalRecordRejected, match="version 4 after version 5"):
        r.admit(model_record(meta(version=4, generation=2)))
    with pytest.raises(InternalRecordRejected, match="version 5 after version 5"):  # same version, other bytes
        r.admit(model_record(meta(version=5, generation=2), value=b"other"))
    with pytest.raises(InternalRecordRejected, match="generation 4 after generation 2"):
        r.admit(model_record(meta(version=6, generation=4)))
    assert r.admit(model_record(meta(version=6, generation=3, reencode=True))).generation == 3
    assert r.admit(model_record(meta(version=7, generation=3))).version == 7


def test_a_model_that_does_not_load_fit_or_encode_is_refused_and_the_last_good_one_stays():
    mc = ModelSettings(bits=32)
    r = _Reader(check=lambda a: checked_model(a, mc))
    good = initial_net(mc).to_bytes()
    assert r.admit(model_record(meta(version=2), value=good)).net is not None
    with pytest.raises(InternalRecordRejected, match="does not load"):
        r.admit(model_record(meta(version=3), value=b"junk bytes"))
    with pytest.raises(InternalRecordRejected, match="'bits': 64"):
        r.admit(model_record(meta(version=3), value=initial_net(ModelSettings(bits=64)).to_bytes()))
    nan = initial_net(mc)
    for p in nan.parameters():
        p.data.fill_(float("nan"))
    with pytest.raises(InternalRecordRejected, match="finite=False"):
        r.admit(model_record(meta(version=3), value=nan.to_bytes()))
    assert r.last.version == 2  # none of those moved it
    assert r.admit(model_record(meta(version=3), value=good)).version == 3


def test_an_announcement_compares_without_its_network():
    a = ModelAnnouncement(2, 1, False, b"w")
    assert a == ModelAnnouncement(2, 1, False, b"w", net=object())
