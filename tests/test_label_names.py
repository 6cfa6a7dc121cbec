"""Class names travel with the images: the ``label-names`` header of the message contract, each refusal with
its reason (what the dead-letter topic says), and the producer's side of it."""

import numpy as np
import pytest

from streamhash.errors import RecordRejected
from streamhash.kafka.produce import check, from_arrays
from streamhash.records import ImageSpec, encode_png, message_headers, parse_message

SPEC = ImageSpec(28, 28, 1)
PNG = encode_png(np.zeros((28, 28), np.uint8))


def parse(headers):
    return parse_message(b"id-1", PNG, headers, SPEC)


def test_names_pair_with_the_labels_in_the_order_sent():
    rec = parse([("labels", b"5, 3"), ("label-names", "dog, chat noir".encode())])
    assert rec.labels == (3, 5) and rec.label_names == ((3, "chat noir"), (5, "dog"))
    assert parse([("labels", b"3,3"), ("label-names", b"cat,cat")]).label_names == ((3, "cat"),)
    assert parse([("labels", b"3")]).label_names == ()  # names are optional
    assert parse([("labels", "7".encode()), ("Label-Names", "écureuil 🐿".encode())]).label_names == ((7, "écureuil 🐿"),)


@pytest.mark.parametrize("headers,fragment", [
    ([("label-names", b"cat")], "label-names without labels"),
    ([("labels", b"3,5"), ("label-names", b"cat")], "1 names for 2 labels"),
    ([("labels", b"3"), ("label-names", b"cat,dog")], "2 names for 1 labels"),  # a comma inside a name
    ([("labels", b"3,5"), ("label-names", b"cat,")], "name of label 5 must be 1 to 64 printable"),
    ([("labels", b"3"), ("label-names", b"x" * 65)], "1 to 64 printable"),
    ([("labels", b"3"), ("label-names", b"c\x00at")], "printable"),
    ([("labels", b"3"), ("label-names", b"line\nbreak")], "printable"),
    ([("labels", b"3"), ("label-names", b"\xff\xfe")], "not UTF-8"),
    ([("labels", b"3,3"), ("label-names", b"cat,dog")], "names label 3 twice"),
    ([("labels", b"3"), ("label-names", b"cat"), ("label-names", b"dog")], "duplicated header 'label-names'"),
    ([("labels", b"3"), ("label-names", b"a" * 5000)], "exceeds the 4096-byte limit"),
])
def test_names_that_cannot_be_matched_to_labels_are_refused_with_the_reason(headers, fragment):
    with pytest.raises(RecordRejected) as exc:
        parse(headers)
    assert exc.value.stage == "headers" and fragment in exc.value.message


def test_a_producer_sends_the_names_of_its_classes():
    images = np.zeros((3, 28, 28), np.uint8)
    sent = list(from_arrays(images, [2, 0, 2], prefix="p-", classes=("zero", "one", "two")))
    assert [(m.labels, m.label_names) for m in sent] == [(2, "two"), (0, "zero"), (2, "two")]
    assert all(check(m, SPEC) is None for m in sent)
    rec = parse(message_headers(sent[0].labels, "image/png", sent[0].label_names))
    assert rec.label_names == ((2, "two"),)
    assert [m.label_names for m in from_arrays(images[:1], None, prefix="q-", classes=("a",))] == [None]
    assert message_headers((1, 4), "image/png", ["b", "e"])[-1] == ("label-names", b"b,e")
    with pytest.raises(ValueError, match="comma"):
        message_headers(1, "image/png", "a,b")


def test_a_shard_keeps_the_names_and_a_later_name_wins_counted(tmp_path):
    from types import SimpleNamespace

    from streamhash import metrics as m
    from streamhash.index import label_names
    from streamhash.index.store import Store

    def recs(*pairs):
        return [SimpleNamespace(label_names=((label, name),)) for label, name in pairs]

    store = Store(tmp_path / "s", bits=32)
    replaced = m.LABEL_NAMES_REPLACED._value.get()
    assert label_names.record(store, recs((3, "cat"), (5, "dog")), [1.0, 2.0]) == 0
    assert label_names.stored(store) == {3: ("cat", 1.0), 5: ("dog", 2.0)}
    txnid = store._env.last_txnid()
    assert label_names.record(store, recs((3, "cat")) + [SimpleNamespace(label_names=())], [3.0, 4.0]) == 0
    assert store._env.last_txnid() == txnid  # nothing new: no transaction
    assert label_names.record(store, recs((3, "kitten"), (7, "horse")), [5.0, 6.0]) == 1
    assert m.LABEL_NAMES_REPLACED._value.get() == replaced + 1
    store.close()
    reopened = Store(tmp_path / "s", readonly=True)  # what a query server reads
    assert label_names.stored(reopened) == {3: ("kitten", 5.0), 5: ("dog", 2.0), 7: ("horse", 6.0)}
    other = {3: ("chat", 9.0), 5: ("dog", 1.0)}
    seen: set = set()
    assert label_names.merge([label_names.stored(reopened), other], seen) == {3: "chat", 5: "dog", 7: "horse"}
    assert len(seen) == 1  # label 3 is named differently by two shards: logged once
    reopened.close()


def test_the_changelog_marker_carries_the_shards_names_and_a_restore_writes_them(tmp_path):
    from types import SimpleNamespace

    from streamhash.index import label_names
    from streamhash.index.store import Store
    from streamhash.kafka import changelog as cl

    store = Store(tmp_path / "s", bits=32)
    label_names.record(store, [SimpleNamespace(label_names=((3, "cat"),))], [1.0])
    batch = [SimpleNamespace(label_names=((5, "dog"),)), SimpleNamespace(label_names=((3, "cat"),))]
    after = label_names.after(store, batch, [2.0, 3.0])
    assert after == {3: ("cat", 1.0), 5: ("dog", 2.0)}  # what the batch's marker says, before its commit
    key, value = cl.encode_offsets({("img", 0): 7}, after)
    got = cl.parse(key, value)
    assert got.offsets == {("img", 0): 7} and got.label_names == after
    assert cl.parse(*cl.encode_offsets({("img", 0): 7})).label_names == {}  # a marker without names, as before
    restored = Store(tmp_path / "r", bits=32)
    label_names.replace(restored, got.label_names)
    assert label_names.stored(restored) == after
    store.close()
    restored.close()
