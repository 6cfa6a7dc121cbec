"""Generations: built beside the live one, caught up, swapped atomically, dropped; cleaned up after a crash."""

import numpy as np
import pytest

from streamhash.errors import StoreError
from streamhash.index.store import ItemWrite, Store
from tests.index.store.support import items


def test_generation_is_built_beside_the_live_one_and_swapped_atomically(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(6))
    old = s.snapshot()
    gen, watermark = s.begin_generation()
    assert (gen, watermark) == (2, 6)
    new_codes = np.full((4, 4), 7, np.uint8)
    s.put_generation_codes(gen, ["id0", "id1", "id2", "id3"], new_codes)
    # the live generation is untouched while the next one is built
    assert s.snapshot().generation == 1
    np.testing.assert_array_equal(s.snapshot().codes, old.codes)
    # a write during the build: an overwrite of id0 and a new item; both must be caught up
    s.write_batch([ItemWrite("id0", bytes(4), b"x", "image/png", (1,)), ItemWrite("new", bytes(4), b"x", "image/png", None)])
    missing = s.ids_missing_from(gen)
    assert sorted(missing) == ["id0", "id4", "id5", "new"]
    with pytest.raises(StoreError, match="has no code in generation 2"):
        s.swap_generation(gen, 5, [], np.zeros((0, 4), np.uint8))
    assert s.snapshot().generation == 1
    assert s.swap_generation(gen, 5, missing, np.full((4, 4), 9, np.uint8)) == 1
    snap = s.snapshot()
    assert (snap.generation, snap.model_version) == (2, 5)
    assert {i: bytes(c).hex() for i, c in zip(snap.ids, snap.codes)} == {
        "id1": "07070707", "id2": "07070707", "id3": "07070707", "id4": "09090909", "id5": "09090909",
        "id0": "09090909", "new": "09090909"}
    assert s.get_item("id4")["code"] == bytes([9] * 4) and s.get_item("id4")["generation"] == 2
    # the replaced generation's codes and tables can be dropped; the live one stays searchable
    assert s.drop_generation(1) > 0
    with s.env.begin() as txn:
        assert s.tables.candidates(txn, s.db["tables"], 1, bytes(4), 33).size == 0
        found = s.tables.candidates(txn, s.db["tables"], 2, bytes([7] * 4), 1)
    assert sorted(s.snapshot().ids[i] for i in np.searchsorted(snap.seqs, found)) == ["id1", "id2", "id3"]


def test_write_encoded_for_a_replaced_generation_is_refused(tmp_path):
    from streamhash.errors import GenerationChanged

    s = Store(tmp_path, bits=32)
    s.write_batch(items(2), generation=1)
    gen, _ = s.begin_generation()
    s.swap_generation(gen, 2, s.ids_missing_from(gen), np.zeros((2, 4), np.uint8))
    with pytest.raises(GenerationChanged):
        s.write_batch(items(1, prefix="late"), {("t", 0): 9}, generation=1)
    assert s.get_item("late0") is None and s.offsets() == {}


def test_learned_codes_during_a_build_are_caught_up_by_the_new_generation(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))
    gen, watermark = s.begin_generation()
    s.put_generation_codes(gen, ["id0", "id1", "id2"], np.full((3, 4), 7, np.uint8))
    s.put_codes(["id1"], np.full((1, 4), 5, np.uint8))  # its new seq would orphan id1's table entry in gen 2
    assert s.ids_missing_from(gen, watermark) == ["id1"]
    s.swap_generation(gen, 2, ["id1"], np.full((1, 4), 9, np.uint8))
    snap = s.snapshot()
    with s.env.begin() as txn:
        found = s.tables.candidates(txn, s.db["tables"], gen, bytes([9] * 4), 1)
    assert found.tolist() == [snap.seqs[snap.ids.index("id1")]]


def test_an_interrupted_reencode_is_cleaned_at_start_up(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    gen, _ = s.begin_generation()
    s.put_generation_codes(gen, ["id0", "id1"], np.ones((2, 4), np.uint8))
    s.close()  # the crash: a pending generation with orphan codes and table rows
    s = Store(tmp_path, bits=32)
    assert s.abandon_pending_generation() == gen
    assert s.read_meta()["pending_generation"] is None
    with s.env.begin() as txn:
        prefix = gen.to_bytes(8, "big")
        for db in ("codes", "tables"):
            cur = txn.cursor(db=s.db[db])
            assert not (cur.set_range(prefix) and cur.key().startswith(prefix)), db
    assert s.abandon_pending_generation() is None


def test_swap_encodes_late_items_inside_its_transaction(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    gen, watermark = s.begin_generation()
    s.put_generation_codes(gen, [f"id{i}" for i in range(4)], np.zeros((4, 4), np.uint8))
    s.write_batch(items(2, prefix="late", seed=3), generation=1)  # ingested after the catch-up
    with pytest.raises(StoreError, match="no code in generation"):
        s.swap_generation(gen, 7, [], np.zeros((0, 4), np.uint8))
    seen = []

    def encode_blobs(blobs):
        seen.extend(blobs)
        return np.full((len(blobs), 4), 9, np.uint8)

    assert s.swap_generation(gen, 7, [], np.zeros((0, 4), np.uint8), after_seq=watermark, encode_blobs=encode_blobs) == 1
    assert seen == [(b"b" * 100, "image/png")] * 2
    assert s.get_item("late0")["code"] == bytes([9] * 4) and s.read_meta()["model_version"] == 7

