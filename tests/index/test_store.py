"""The LMDB store: one transaction per batch, offsets with the data, overwrite semantics, growth, full disk."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from streamhash.errors import SchemaMismatchError, StoreError, StoreFullError
from streamhash.index.store import ItemWrite, Store


def items(n, *, prefix="id", bits=32, seed=0, blob_bytes=100):
    rng = np.random.default_rng(seed)
    return [ItemWrite(f"{prefix}{i}", rng.integers(0, 256, bits // 8, dtype=np.uint8).tobytes(), b"b" * blob_bytes,
                      "image/png", (i % 3,) if i % 4 else None) for i in range(n)]


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
    # the multi-index tables forget the old code and know the new one
    with s.env.begin() as txn:
        old = s.tables.candidates(txn, s.db["tables"], 1, items(1)[0].code, 1)
        new = s.tables.candidates(txn, s.db["tables"], 1, again[0].code, 1)
    assert 6 in new.tolist() and 1 not in old.tolist()


def test_failed_transaction_leaves_nothing(tmp_path):
    s = Store(tmp_path, bits=32)
    bad = items(3) + [ItemWrite("short", b"\x00", b"x", "image/png", None)]
    with pytest.raises(StoreError, match="code of 1 bytes"):
        s.write_batch(bad, {("t", 0): 4})
    assert s.count() == 0 and s.offsets() == {}


def test_map_grows_on_demand(tmp_path):
    s = Store(tmp_path, bits=32, initial_map_size=256 * 1024)
    s.write_batch(items(500, blob_bytes=2000), {("t", 0): 500})
    assert s.count() == 500
    assert s.env.info()["map_size"] > 256 * 1024


def test_map_ceiling_is_a_clear_error_and_loses_nothing_committed(tmp_path):
    s = Store(tmp_path, bits=32, initial_map_size=128 * 1024, max_map_size=256 * 1024)
    s.write_batch(items(10), {("t", 0): 10})
    with pytest.raises(StoreFullError, match="ceiling"):
        s.write_batch(items(400, prefix="big", blob_bytes=4000), {("t", 0): 410})
    assert s.count() == 10 and s.offsets() == {("t", 0): 10}


def test_reopen_checks_bits_and_keeps_data(tmp_path):
    Store(tmp_path, bits=32).write_batch(items(3), {("t", 0): 3})
    # a second process may not reopen an env this process has open: use a subprocess for the checks
    code = textwrap.dedent(f"""
        from streamhash.index.store import Store
        from streamhash.errors import SchemaMismatchError
        try:
            Store({str(tmp_path)!r}, bits=64)
        except SchemaMismatchError as e:
            print("mismatch:", e)
        s = Store({str(tmp_path)!r}, readonly=True)
        print(s.count(), s.bits, s.offsets())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "mismatch: store" in out and "holds 32-bit codes" in out
    assert "3 32 {('t', 0): 3}" in out


def test_readonly_open_of_missing_store_says_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="start a worker first"):
        Store(tmp_path / "nothing", readonly=True)


def test_crash_mid_batch_commits_nothing(tmp_path):
    """A writer killed inside its transaction leaves the store as it was before the batch."""
    code = textwrap.dedent(f"""
        import os, numpy as np
        from streamhash.index.store import Store, ItemWrite
        s = Store({str(tmp_path)!r}, bits=32)
        mk = lambda i: ItemWrite(f"id{{i}}", bytes(4), b"x", "image/png", (1,))
        s.write_batch([mk(i) for i in range(5)], {{("t", 0): 5}})
        def die(txn):
            for i in range(5, 10):
                txn.put(f"id{{i}}".encode(), b"{{}}", db=s.db["items"])
            os._exit(9)
        s._write(die)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    s = Store(tmp_path, bits=32)
    assert s.count() == 5 and s.offsets() == {("t", 0): 5}
    assert s.read_meta()["next_seq"] == 6


def test_models_are_versioned(tmp_path):
    s = Store(tmp_path, bits=32)
    assert s.get_model() == (0, None)
    v1 = s.put_model(b"one", make_current=True)
    v2 = s.put_model(b"two")
    assert (v1, v2) == (1, 2)
    assert s.get_model() == (1, b"one") and s.get_model(2) == (2, b"two")


def test_schema_mismatch_is_typed(tmp_path):
    s = Store(tmp_path, bits=32)
    s._write(lambda txn: s._put_meta(txn, {"schema_version": 999}))
    s.close()
    with pytest.raises(SchemaMismatchError, match="schema 999"):
        Store(tmp_path, bits=32)


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


def test_learned_codes_replace_provisional_ones_with_new_seqs(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))
    assert s.put_codes(["id1", "gone"], np.full((2, 4), 5, np.uint8), model_version=3) == [4]
    gen, model_version, changes = s.changes_since(3)
    assert (gen, model_version) == (1, 3)
    assert [(c.id, c.code, c.ts) for c in changes] == [("id1", bytes([5] * 4), None)]  # not a fresh message
    assert s.count() == 3


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


def test_two_writing_threads_through_thousands_of_map_growths_lose_nothing(tmp_path, caplog):
    """The reliability issue's deadlock: write_batch and put_codes on two threads while the map grows.

    Before the store serialised its writers and resized only with no transaction open, this failed
    every time with "Cannot set_mapsize while a write transaction is active", "mdb_del: Invalid
    argument" or a hang. A reader thread runs too: LMDB forbids a resize under any open transaction.
    """
    import logging
    import threading

    caplog.set_level(logging.INFO, logger="streamhash.index.store")
    s = Store(tmp_path, bits=32, initial_map_size=1 << 20, map_growth_factor=1.0)  # +64 KiB per growth
    n_batches, per_batch, errors = 300, 20, []
    written = threading.Event()

    def ingest():
        try:
            for b in range(n_batches):
                s.write_batch(items(per_batch, prefix=f"b{b}-", seed=b, blob_bytes=12_000), {("t", 0): (b + 1) * per_batch})
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            written.set()

    def relearn():
        rng = np.random.default_rng(1)
        try:
            while not written.is_set():
                ids = [f"b{b}-{i}" for b in rng.integers(0, n_batches, 5) for i in range(per_batch)]
                s.put_codes(ids, rng.integers(0, 256, (len(ids), 4), dtype=np.uint8))
        except Exception as exc:
            errors.append(exc)

    def read():
        try:
            while not written.is_set():
                s.snapshot()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (ingest, relearn, read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads), "a writer is stuck"
    assert errors == []
    growths = sum("growing LMDB map" in r.getMessage() for r in caplog.records)
    assert growths >= 1000
    want = {f"b{b}-{i}" for b in range(n_batches) for i in range(per_batch)}
    snap = s.snapshot()
    assert set(snap.ids) == want and len(snap.ids) == len(want)
    assert s.offsets() == {("t", 0): n_batches * per_batch}
    assert all(c is not None for c in snap.codes)


def read_only_count(path) -> int:
    code = f"from streamhash.index.store import Store; print(Store({str(path)!r}, readonly=True).count())"
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def test_a_second_writer_is_refused_while_readers_are_welcome(tmp_path):
    from streamhash.errors import StoreLockedError

    s = Store(tmp_path, bits=32)
    s.write_batch(items(3))
    code = textwrap.dedent(f"""
        from streamhash.errors import StoreLockedError
        from streamhash.index.store import Store
        try:
            Store({str(tmp_path)!r}, bits=32)
        except StoreLockedError as exc:
            print(exc)
            raise SystemExit(3)
        raise SystemExit(0)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 3 and f"pid {__import__('os').getpid()}" in out.stdout
    assert read_only_count(tmp_path) == 3  # readers in other processes are not locked out
    with pytest.raises(StoreLockedError):
        Store(tmp_path, bits=32)  # a second handle in the same process is refused too
    s.close()
    Store(tmp_path, bits=32).close()  # released on close (and by the kernel when a holder dies)


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


def test_learned_codes_and_the_inferring_model_are_recorded(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3), model_version=4)
    s.put_codes(["id1"], np.zeros((1, 4), np.uint8), model_version=5)
    assert s.snapshot().learned.tolist() == [False, False, True]  # id1 moved to the end with its new seq
    assert s.get_item("id0")["model"] == 4


def test_offsets_move_backwards_after_a_log_reset_and_topic_ids_are_kept(tmp_path):
    s = Store(tmp_path, bits=32)
    s.write_batch(items(3), {("t", 0): 3000})
    s.set_offset("t", 0, 0)
    assert s.offsets() == {("t", 0): 0}
    assert s.topic_ids() == {}
    s.set_topic_id("t", "abc")
    s.set_topic_id("u", "def")
    assert s.topic_ids() == {"t": "abc", "u": "def"}


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 4 MiB tmpfs (root only): what a full disk looks like to LMDB, EIO from the commit's write."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_is_store_full_not_a_crash(tiny_tmpfs):
    s = Store(tiny_tmpfs / "index", bits=32, initial_map_size=64 << 20)  # the map is larger than the disk
    n = 0
    with pytest.raises(StoreFullError, match="disk full"):
        while n < 10_000:
            s.write_batch(items(20, prefix=f"x{n}-", seed=n, blob_bytes=20_000))
            n += 1
    assert 0 < n < 10_000
    assert s.count() == 20 * n  # every committed batch is intact; the failed one left nothing
