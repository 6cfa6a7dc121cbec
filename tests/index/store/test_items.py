"""Items: one transaction per batch, offsets with the data, overwrite semantics, learned codes."""

import dataclasses

import numpy as np
import pytest

from streamhash.errors import StoreError
from streamhash.index.store import ItemWrite, Store
from tests.index.store.support import codes_of, items


def test_batch_writes_items_codes_blobs_and_offsets_together(tmp_path):
    s = Store(tmp_path, bits=32)
    batch = items(10)
    seqs = s.write_batch(batch, {("t", 0): 10, ("t", 1): 3})
    assert seqs == list(range(1, 11))
    assert s.count() == 10
    assert s.offsets() == {("t", 0): 10, ("t", 1): 3}
    rec = s.get_item("id5", with_blob=True)
    assert rec["code"] == batch[5].code and rec["blob"] == batch[5].blob and rec["labels"] == [2]
    assert s.get_item("id4")["labels"] is None
    assert s.get_blobs(["id1", "nope"]) == [(b"b" * 100, "image/png"), None]
    snap = s.snapshot()
    assert snap.ids == [f"id{i}" for i in range(10)] and snap.seqs.tolist() == seqs
    np.testing.assert_array_equal(snap.codes[3], np.frombuffer(batch[3].code, np.uint8))


def test_resent_id_overwrites_and_moves_to_the_end(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(5))
    again = items(2, seed=9)
    s.write_batch(again, {("t", 0): 7})
    assert s.count() == 5
    snap = s.snapshot()
    assert snap.ids == ["id2", "id3", "id4", "id0", "id1"]  # overwritten ids have new, later seqs
    assert s.get_item("id0")["code"] == again[0].code
    gen, _, changes = s.changes_since(5)
    assert [c.id for c in changes] == ["id0", "id1"]
    # one code per item in the generation: the new one
    assert codes_of(s, 1) == {i: bytes(c).hex() for i, c in zip(snap.ids, snap.codes)}
    assert codes_of(s, 1)["id0"] == again[0].code.hex()


def test_a_message_written_again_unchanged_keeps_its_seq(tmp_path):
    """A message consumed again (a worker killed after its shard committed the batch but before Kafka heard of it,
    then its partition taken over) writes nothing: no new seq, no change for followers. The scale-out test's
    kill -9 counted 234-938 such items twice before (about one run in three)."""
    s = Store(tmp_path, bits=32)
    batch = items(5)
    s.write_batch(batch, {("t", 0): 5})
    assert s.write_batch([batch[1], batch[3]], {("t", 0): 7}) == [2, 4]
    assert s.read_meta()["next_seq"] == 6 and s.changes_since(5)[2] == [] and s.offsets() == {("t", 0): 7}
    relabeled = dataclasses.replace(batch[2], labels=(9,))  # the same id with another state: written, a new seq
    assert s.write_batch([relabeled]) == [6] and s.get_item("id2")["labels"] == [9]


class CountingEnv:
    """An LMDB environment that counts the transactions begun on it."""

    def __init__(self, env):
        self.inner, self.begun = env, 0

    def begin(self, **kwargs):
        self.begun += 1
        return self.inner.begin(**kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_get_items_gives_what_get_item_gives_each_id_from_one_read_transaction(tmp_path):
    """Present, absent, removed, re-sent, learned, quarantined and re-encoded items, ids repeated: the batched look-up
    (the learner's re-learned codes, over every shard) is ``get_item`` without blob, in one transaction."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(8), model_version=1)
    s.put_codes(["id3"], np.full((1, 4), 9, np.uint8), model_version=2)
    s.quarantine(["id4"])
    gen, _ = s.begin_generation()
    ids = s.ids_missing_from(gen)
    s.swap_generation(gen, 3, ids, np.full((len(ids), 4), 7, np.uint8))  # generation_model 3: inferred ones move on
    s.write_batch(items(1, seed=3, prefix="id5"), model_version=4, deletes=["id1"])  # "id50" new, id1 removed
    wanted = ["id0", "id1", "never", "id3", "id4", "id50", "id7", "id0", "id6"]
    expected = [s.get_item(i) for i in wanted]
    assert [r is None for r in expected] == [False, True, True, False, False, False, False, False, False]
    assert expected[3]["learned"] and expected[3]["model"] == 1 and expected[0]["model"] == 3  # learned: kept
    s._env.env = counting = CountingEnv(s._env.env)
    assert s.get_items(wanted) == expected and counting.begun == 1
    assert s.get_items([]) == [] and s.get_items(["never"]) == [None]


def test_failed_transaction_leaves_nothing(tmp_path):
    s = Store(tmp_path, bits=32)
    bad = items(3) + [ItemWrite("short", b"\x00", b"x", "image/png", None)]
    with pytest.raises(StoreError, match="code of 1 bytes"):
        s.write_batch(bad, {("t", 0): 4})
    assert s.count() == 0 and s.offsets() == {}


def test_learned_codes_replace_provisional_ones_with_new_seqs(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))
    assert s.put_codes(["id1", "gone"], np.full((2, 4), 5, np.uint8), model_version=3) == [4]
    gen, model_version, changes = s.changes_since(3)
    assert (gen, model_version) == (1, 3)
    assert [(c.id, c.code, c.ts) for c in changes] == [("id1", bytes([5] * 4), None)]  # not a fresh message
    assert s.count() == 3


def test_learned_codes_and_the_inferring_model_are_recorded(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3), model_version=4)
    s.put_codes(["id1"], np.zeros((1, 4), np.uint8), model_version=5)
    assert s.snapshot().learned.tolist() == [False, True, False]  # id1 keeps its place: snapshots are in arrival order
    assert s.get_item("id0")["model"] == 4


def test_learner_updates_apply_by_seq_with_the_codes_offset_in_one_transaction(tmp_path):
    """A learned code is for the item the learner read (its seq): an id written again since keeps its
    new code; an unknown id is counted missing; the codes topic's offset moves with them."""
    from streamhash.kafka.modelbus import CodeUpdate

    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))  # seqs 1, 2, 3
    s.write_batch(items(1, seed=5))  # id0 written again: seq 4
    code = bytes([7, 7, 7, 7])
    got = s.apply_updates([CodeUpdate("id1", 2, "learned", 2, code), CodeUpdate("id0", 1, "learned", 2, code),
                           CodeUpdate("nope", 9, "learned", 2, code), CodeUpdate("id2", 3, "quarantine", 2)],
                          {("t.codes", 0): 4})
    assert got == {"applied": 1, "stale": 1, "missing": 1, "quarantined": 1}
    assert s.get_item("id1")["code"] == code and s.get_item("id1")["learned"] and s.get_item("id1")["learned_by"] == 2
    assert s.get_item("id0")["code"] == items(1, seed=5)[0].code
    assert s.get_item("id2")["quarantined"] and s.offsets() == {("t.codes", 0): 4}
    again = s.apply_updates([CodeUpdate("id1", 2, "learned", 2, code)], {("t.codes", 0): 5})
    assert again["stale"] == 1  # applying gave id1 a new seq: a re-published update is a no-op
    with pytest.raises(StoreError):
        s.apply_updates([CodeUpdate("id1", s.get_item("id1")["seq"], "learned", 2, b"\x01")], {})
    assert s.offsets() == {("t.codes", 0): 5}  # the refused transaction wrote nothing


def test_changes_if_committed_reads_only_after_a_commit(tmp_path):
    """A follower's wake-up with nothing committed since its last snapshot opens no transaction."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))
    txnid, gen, model_version, changes = s.changes_if_committed(0, -1)
    assert [c.seq for c in changes] == [1, 2, 3] and (gen, model_version) == s.changes_since(0)[:2]
    reads = []
    read = s._env.read
    s._env.read = lambda fn: reads.append(1) or read(fn)
    assert s.changes_if_committed(3, txnid) is None and not reads
    s.write_batch(items(1, seed=4))
    txnid2, _, _, changes = s.changes_if_committed(3, txnid)
    assert txnid2 > txnid and [c.seq for c in changes] == [4] and len(reads) == 1
    s.set_offset("t", 0, 5)  # any commit moves the snapshot: read again, nothing new in the change log
    assert s.changes_if_committed(4, txnid2)[3] == []


def test_a_removed_item_leaves_every_sub_database_and_followers_read_the_removal_in_seq_order(tmp_path):
    """Tombstones (issue 28): record, code, blob and change entry gone in the batch's transaction; ``changes_since``
    hands the removal out under its own seq, between the writes around it; an absent id changes nothing."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(5), {("t", 0): 5})
    s.write_batch(items(1, prefix="late"), {("t", 0): 7}, deletes=["id1", "never-stored"])
    assert s.count() == 5 and s.get_item("id1") is None and s.get_blobs(["id1"]) == [None]
    assert "id1" not in codes_of(s, 1) and s.offsets() == {("t", 0): 7}
    assert s.snapshot().ids == ["id0", "id2", "id3", "id4", "late0"]
    _, _, changes = s.changes_since(0)
    assert [(c.seq, c.id, c.deleted) for c in changes] == [
        (1, "id0", False), (3, "id2", False), (4, "id3", False), (5, "id4", False), (6, "late0", False), (7, "id1", True)]
    s.write_batch(items(2), {("t", 0): 9})  # written again after its removal: back, under a new seq
    _, _, changes = s.changes_since(6)
    assert [(c.id, c.deleted) for c in changes] == [("id1", True), ("id0", False), ("id1", False)]
    assert s.get_item("id1")["code"] == items(2)[1].code
    # a follower cut at a limit gets no removal past the last write it was handed
    _, _, cut = s.changes_since(0, limit=2)
    assert [(c.seq, c.deleted) for c in cut] == [(3, False), (4, False)]


def test_a_removal_during_a_re_encode_is_not_brought_back_by_the_swap(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(6))
    gen, _ = s.begin_generation()
    ids = s.ids_missing_from(gen)
    s.write_batch([], deletes=["id2", "id3"])  # while the new generation is being built
    s.swap_generation(gen, 2, ids, np.zeros((len(ids), 4), np.uint8))
    assert s.snapshot().ids == ["id0", "id1", "id4", "id5"] and set(codes_of(s, gen)) == {"id0", "id1", "id4", "id5"}
