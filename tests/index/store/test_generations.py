"""Generations: built beside the live one, caught up, swapped atomically, dropped; cleaned up after a crash."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from streamhash.errors import StoreError
from streamhash.index.store import GenerationBuilder, ItemWrite, Store
from tests.index.store.support import codes_of, items


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
    # the replaced generation's codes can be dropped; the live one stays
    assert s.drop_generation(1) == 7
    assert codes_of(s, 1) == {} and len(codes_of(s, 2)) == 7


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
    s.put_codes(["id1"], np.full((1, 4), 5, np.uint8))  # drops id1's code from gen 2: the build must redo it
    assert s.ids_missing_from(gen, watermark) == ["id1"]
    s.swap_generation(gen, 2, ["id1"], np.full((1, 4), 9, np.uint8))
    assert codes_of(s, gen) == {"id0": "07070707", "id1": "09090909", "id2": "07070707"}


def test_an_interrupted_reencode_is_cleaned_at_start_up(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    gen, _ = s.begin_generation()
    s.put_generation_codes(gen, ["id0", "id1"], np.ones((2, 4), np.uint8))
    s.close()  # the crash: a pending generation with orphan codes
    s = Store(tmp_path, bits=32)
    assert s.abandon_pending_generation() == gen
    assert s.read_meta()["pending_generation"] is None
    assert not holds_generation(s, gen) and len(codes_of(s, 1)) == 4
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


def holds_generation(s, gen) -> bool:
    """Whether any code of ``gen`` is left."""
    return bool(codes_of(s, gen))


class Encoder:
    """``encode_ids`` for a builder: every code ``7``; ``during(call)`` runs before each call returns (the ingest
    path writing meanwhile)."""

    def __init__(self, during=lambda call: None):
        self.calls, self.during = [], during

    def __call__(self, ids):
        self.calls.append(list(ids))
        self.during(len(self.calls))
        return np.full((len(ids), 4), 7, np.uint8)


def test_builder_catches_up_items_written_during_the_build(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(6))
    writes = {1: [ItemWrite("late0", bytes(4), b"x", "image/png", None)],  # a new item during the first chunk
              2: [ItemWrite("id0", bytes(4), b"x", "image/png", (1,))],  # an overwrite of an item already encoded
              3: [ItemWrite("late1", bytes(4), b"y", "image/jpeg", None)]}  # during the catch-up: a straggler
    encode_ids, stragglers = Encoder(lambda call: s.write_batch(writes.get(call, []))), []

    def encode_blobs(blobs):
        stragglers.extend(blobs)
        return np.full((len(blobs), 4), 9, np.uint8)

    builder = GenerationBuilder(s, encode_ids=encode_ids, encode_blobs=encode_blobs, chunk=4, catch_up_rounds=1)
    assert builder.build(5) == 2
    assert encode_ids.calls == [["id0", "id1", "id2", "id3"], ["id4", "id5"], ["late0", "id0"]]
    assert stragglers == [(b"y", "image/jpeg")]
    snap = s.snapshot()
    assert (snap.generation, snap.model_version) == (2, 5) and s.read_meta()["pending_generation"] is None
    assert {i: bytes(c).hex() for i, c in zip(snap.ids, snap.codes)} == {
        **{f"id{i}": "07070707" for i in range(6)}, "late0": "07070707", "late1": "09090909"}
    assert s.ids_missing_from(2) == [] and builder.replaced == 1
    assert codes_of(s, 2) == {i: bytes(c).hex() for i, c in zip(snap.ids, snap.codes)}
    assert builder.drop_replaced() > 0 and builder.replaced is None
    assert not holds_generation(s, 1) and holds_generation(s, 2)


@pytest.mark.parametrize("gap", ["a straggler and no encode_blobs", "an item the encoder skipped"])
def test_builder_swap_refuses_an_incomplete_generation_and_drops_it(tmp_path, gap):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    before = s.snapshot()
    if gap == "an item the encoder skipped":  # before the watermark: no catch-up looks for it
        encode_ids, encode_blobs = (lambda ids: np.full((len(ids) - 1, 4), 7, np.uint8)), (lambda blobs: np.zeros((len(blobs), 4), np.uint8))
    else:
        encode_ids = Encoder(lambda call: s.write_batch(items(1, prefix=f"late{call}-")))  # ingestion never stops
        encode_blobs = None
    builder = GenerationBuilder(s, encode_ids=encode_ids, encode_blobs=encode_blobs, catch_up_rounds=2)
    with pytest.raises(StoreError, match="has no code in generation 2"):
        builder.build(5)
    snap = s.snapshot()
    assert (snap.generation, snap.model_version) == (1, 0) and s.read_meta()["pending_generation"] is None
    np.testing.assert_array_equal(snap.codes[:4], before.codes)
    assert not holds_generation(s, 2) and builder.replaced is None


def test_a_build_interrupted_by_a_crash_leaves_nothing_after_start_up_clean_up(tmp_path):
    code = textwrap.dedent(f"""
        import os, numpy as np
        from streamhash.index.store import GenerationBuilder, ItemWrite, Store
        s = Store({str(tmp_path)!r}, bits=32)
        s.write_batch([ItemWrite(f"id{{i}}", bytes([i] * 4), b"x", "image/png", None) for i in range(6)])
        calls = []
        def encode_ids(ids):
            calls.append(ids)
            if len(calls) == 2:
                os._exit(9)  # killed half way: the first chunk's codes and table rows are in generation 2
            return np.full((len(ids), 4), 7, np.uint8)
        GenerationBuilder(s, encode_ids=encode_ids, encode_blobs=None, chunk=3).build(5)
    """)
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 9
    s = Store(tmp_path, bits=32)
    assert s.read_meta()["pending_generation"] == 2 and holds_generation(s, 2)
    assert s.abandon_pending_generation() == 2
    assert s.read_meta()["pending_generation"] is None and not holds_generation(s, 2)
    snap = s.snapshot()
    assert snap.generation == 1 and [bytes(c) for c in snap.codes] == [bytes([i] * 4) for i in range(6)]
    assert GenerationBuilder(s, encode_ids=Encoder()).build(6) == 2  # the next re-encode starts over


def test_a_crash_between_swap_and_drop_is_cleaned_up_at_start_up(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(5))
    assert GenerationBuilder(s, encode_ids=Encoder()).build(3) == 2
    s.close()  # the crash: generation 1 was swapped out but never dropped
    s = Store(tmp_path, bits=32)
    assert holds_generation(s, 1)
    assert s.abandon_pending_generation() is None
    assert not holds_generation(s, 1) and holds_generation(s, 2)
    snap = s.snapshot()
    assert (snap.generation, snap.model_version, len(snap.ids)) == (2, 3, 5) and (snap.codes == 7).all()


def test_a_selective_build_copies_learned_and_current_codes_and_encodes_only_stale_ones(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(6), model_version=1)  # inferred by network 1
    s.write_batch(items(2, prefix="cur", seed=1), model_version=2)  # already inferred by network 2
    s.write_batch(items(1, prefix="old", seed=4))  # no network recorded (a store older than provenance)
    learned = np.arange(8, dtype=np.uint8).reshape(2, 4) + 200
    s.put_codes(["id0", "id1"], learned)
    before = {i: bytes(c) for i, c in zip(s.snapshot().ids, s.snapshot().codes)}
    during_build = []

    def during(call):
        if call == 1:  # a learned item sent again is a new, inferred item: encoded by the catch-up
            during_build.append(s.provenance())
            s.write_batch([ItemWrite("id1", bytes(4), b"x", "image/png", (1,))], model_version=1)

    encode_ids = Encoder(during)
    builder = GenerationBuilder(s, encode_ids=encode_ids, chunk=100)
    assert builder.build(2) == 2
    assert encode_ids.calls == [["id2", "id3", "id4", "id5", "old0"], ["id1"]]
    assert (builder.images_reencoded, builder.codes_copied) == (6, 4)  # id1 was copied before its re-send
    snap = s.snapshot()
    codes = {i: bytes(c) for i, c in zip(snap.ids, snap.codes)}
    assert codes["id0"] == learned[0].tobytes()  # bit-exact: never decoded
    assert codes["cur0"] == before["cur0"] and codes["cur1"] == before["cur1"]
    assert all(codes[i] == bytes([7] * 4) for i in ("id1", "id2", "id3", "id4", "id5", "old0"))
    ids, is_learned, model = s.provenance()
    prov = {i: (bool(a), int(b)) for i, a, b in zip(ids, is_learned, model)}
    assert prov == {"id0": (True, 1), "id1": (False, 2), "cur0": (False, 2), "cur1": (False, 2), "old0": (False, 2),
                    **{f"id{i}": (False, 2) for i in range(2, 6)}}
    # while the build ran the records still named the networks of the live codes
    ids, _, model = during_build[0]
    assert dict(zip(ids, model.tolist()))["id2"] == 1 and dict(zip(ids, model.tolist()))["old0"] == -1
    # a second re-encode with the same network has nothing left to decode
    again = GenerationBuilder(s, encode_ids=Encoder())
    again.build(2)
    assert again.images_reencoded == 0 and again.codes_copied == 9


def test_an_item_written_again_while_its_old_image_is_encoded_gets_the_new_images_code(tmp_path):
    """The encoder read the old image; the item's new seq tells the put to leave it to the catch-up."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3), model_version=1)

    def encode_ids(ids):  # a code made of each image's first byte, read before the overwrite lands
        blobs = s.get_blobs(ids)
        if "id1" in ids and blobs[ids.index("id1")][0] != b"new":
            s.write_batch([ItemWrite("id1", bytes(4), b"new", "image/png", None)], model_version=1)
        return np.array([[b[0][0]] * 4 for b in blobs], np.uint8)

    builder = GenerationBuilder(s, encode_ids=encode_ids, encode_blobs=None)
    builder.build(2)
    assert s.get_item("id1")["code"] == bytes([ord("n")] * 4) and s.get_item("id0")["code"] == bytes([ord("b")] * 4)
    assert builder.images_reencoded == 4  # id1 was decoded twice


def test_stragglers_of_the_swap_are_copied_when_learned_and_encoded_otherwise(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(2), model_version=1)
    gen, watermark = s.begin_generation()
    s.put_generation_codes(gen, ["id0", "id1"], np.zeros((2, 4), np.uint8))
    s.write_batch(items(2, prefix="late", seed=3), model_version=1)
    s.put_codes(["late0"], np.full((1, 4), 5, np.uint8))
    seen, reencoded = [], ["id0", "id1"]

    def encode_blobs(blobs):
        seen.extend(blobs)
        return np.full((len(blobs), 4), 9, np.uint8)

    s.swap_generation(gen, 2, [], np.zeros((0, 4), np.uint8), after_seq=watermark, encode_blobs=encode_blobs,
                      reencoded=reencoded)
    assert len(seen) == 1 and reencoded == ["id0", "id1", "late1"]
    assert s.get_item("late0")["code"] == bytes([5] * 4) and s.get_item("late1")["code"] == bytes([9] * 4)
    assert [s.get_item(i)["model"] for i in ("id0", "late1")] == [2, 2]


def test_a_shard_is_built_into_the_generation_the_learner_announced(tmp_path):
    """Shards re-encode on their own schedule (a shard unowned for a while skips generations): each is built
    straight into the announced number, so every shard reports the learner's generation, never a local count."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    builder = GenerationBuilder(s, encode_ids=lambda ids: np.zeros((len(ids), 4), np.uint8))
    assert builder.build(7, generation=5) == 5
    builder.drop_replaced()
    assert s.read_meta()["generation"] == 5 and s.read_meta()["model_version"] == 7 and s.count() == 4
    with pytest.raises(StoreError, match="not above"):
        s.begin_generation(5)


class ItemReads:
    """Wraps a store's write transactions to count, per transaction, the item records read and the change-log
    entries walked: the work a transaction does per item of the shard, whatever the clock says."""

    def __init__(self, s):
        self.s, self.per_txn, write = s, [], s._env.write

        def counted(fn, **kw):
            return write(lambda txn: self._run(fn, txn), **kw)

        s._env.write = counted

    def _run(self, fn, txn):
        proxy = _CountingTxn(txn, self.s.db)
        try:
            return fn(proxy)
        finally:
            self.per_txn.append((getattr(fn, "__qualname__", ""), proxy.reads))


class _CountingTxn:
    def __init__(self, txn, db):
        self._txn, self._db, self.reads = txn, db, 0

    def get(self, key, *args, db=None, **kw):
        self.reads += db is self._db["items"]
        return self._txn.get(key, *args, db=db, **kw)

    def cursor(self, db=None):
        cur = self._txn.cursor(db=db)
        return _CountingCursor(cur, self) if db is self._db["changes"] else cur

    def __getattr__(self, name):
        return getattr(self._txn, name)


class _CountingCursor:
    def __init__(self, cur, owner):
        self._cur, self._owner = cur, owner

    def __iter__(self):
        for entry in self._cur:
            self._owner.reads += 1
            yield entry

    def __getattr__(self, name):
        return getattr(self._cur, name)


def test_a_reencode_writes_in_short_transactions_and_its_swap_reads_only_the_items_written_since(tmp_path):
    """An ingest commit of the shard waits for the re-encode's transaction in progress: each must be short,
    whatever the shard's size. Before, the builder copied and wrote 2,048 items a transaction and the
    swap read every item of the shard (its completeness check) and rewrote every re-encoded record
    (5,506 item reads in the swap here)."""
    s = Store(tmp_path, bits=32)
    for i in range(0, 3000, 1000):
        s.write_batch(items(1000, prefix=f"b{i}-", seed=i), model_version=1)
    s.put_codes([f"b0-{i}" for i in range(0, 1000, 2)], np.full((500, 4), 3, np.uint8))  # learned: copied
    written = []

    def during(call):  # the ingest path goes on: a new item, an overwrite, and a learned code during the build
        if call == 1:
            written.append(s.write_batch([ItemWrite("late", bytes(4), b"x", "image/png", None)], model_version=1))
            s.write_batch([ItemWrite("b1000-5", bytes(4), b"y", "image/png", (1,))], model_version=1)
            s.put_codes(["b2000-7"], np.full((1, 4), 5, np.uint8))

    reads = ItemReads(s)
    builder = GenerationBuilder(s, encode_ids=Encoder(during), encode_blobs=lambda blobs: np.zeros((len(blobs), 4), np.uint8))
    assert builder.build(2) == 2 and builder.drop_replaced() > 0
    swap = [n for name, n in reads.per_txn if name.startswith("Generations.swap")]
    assert swap == [0]  # the catch-up read the three items written meanwhile; nothing was written after it
    txn_items = s.generations.txn_items
    assert max(n for _, n in reads.per_txn) <= txn_items + 1, sorted(reads.per_txn, key=lambda r: -r[1])[:3]
    snap = s.snapshot()
    assert (snap.generation, len(snap.ids), s.read_meta()["pending_generation"]) == (2, 3001, None)
    codes = dict(zip(snap.ids, map(bytes, snap.codes)))
    assert codes["b0-0"] == bytes([3] * 4) and codes["b2000-7"] == bytes([5] * 4)
    assert codes["late"] == codes["b1000-5"] == codes["b0-1"] == bytes([7] * 4)
    assert s.ids_missing_from(2) == [] and not holds_generation(s, 1)


def test_the_swap_still_refuses_a_generation_an_item_has_no_code_in(tmp_path):
    """The swap no longer reads every item to check the generation is complete: it counts the codes written
    into it (meta.pending_codes), kept in step by the ingest path's overwrites during the build."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))
    gen, watermark = s.begin_generation()
    s.put_generation_codes(gen, ["id0", "id1", "id2", "id3"], np.zeros((4, 4), np.uint8))
    s.write_batch([ItemWrite("id2", bytes(4), b"x", "image/png", None)])  # its code in gen is dropped
    assert s.read_meta()["pending_codes"] == 3
    with pytest.raises(StoreError, match="item 'id2' has no code in generation 2"):
        s.swap_generation(gen, 3, [], np.zeros((0, 4), np.uint8), after_seq=s.read_meta()["next_seq"] - 1)
    s.put_generation_codes(gen, ["id2"], np.ones((1, 4), np.uint8))
    assert s.swap_generation(gen, 3, [], np.zeros((0, 4), np.uint8), after_seq=s.read_meta()["next_seq"] - 1) == 1
    assert s.get_item("id2")["code"] == bytes([1] * 4) and s.get_item("id0")["model"] == 3


def test_a_build_pauses_before_each_of_its_steps(tmp_path):
    """The worker's re-encoder lets the ingest path go first before every step (Reencoder.pause): a step is at
    most one transaction or one encoded chunk, so a batch never waits for more than one."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(600), model_version=1)
    s.put_codes([f"id{i}" for i in range(0, 600, 3)], np.full((200, 4), 3, np.uint8))
    events, write = [], s._env.write

    def logged(fn, **kw):
        events.append("txn")
        return write(fn, **kw)

    s._env.write = logged
    builder = GenerationBuilder(s, encode_ids=Encoder(lambda call: events.append("encode")), chunk=256,
                                pause=lambda: events.append("pause"))
    assert builder.build(2) == 2 and builder.images_reencoded == 400
    steps = events[events.index("pause"):]  # after begin
    assert all(steps[i - 1] == "pause" for i, e in enumerate(steps) if e != "pause")
    assert steps.count("encode") == 2 and steps.count("txn") == 3 + 2 + 1  # copies, writes of 256 + 144, swap
