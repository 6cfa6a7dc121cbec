"""The schema: a reopened store keeps its data and refuses other settings or another schema; schema 1 is migrated."""

import json
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest

from streamhash.errors import SchemaMismatchError
from streamhash.index.multihash import Substrings
from streamhash.index.store import Store
from tests.index.store.support import items


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


def test_schema_mismatch_is_typed(tmp_path):
    s = Store(tmp_path, bits=32)
    s._write(lambda txn: s._put_meta(txn, {"schema_version": 999}))
    s.close()
    with pytest.raises(SchemaMismatchError, match="schema 999"):
        Store(tmp_path, bits=32)


def test_a_newer_schema_is_refused_read_only_too(tmp_path):
    s = Store(tmp_path, bits=32)
    s._write(lambda txn: s._put_meta(txn, {"schema_version": 999}))
    s.close()
    with pytest.raises(SchemaMismatchError, match=r"schema 999, this build reads \(1, 2, 3, 4\)"):
        Store(tmp_path, readonly=True)


# ---------------------------------------------------------------- schema 1 (LMDB multi-index tables) -> 2
def schema_1_shard(path, n=6):
    """A shard as schema 1 left it. Its items, codes, blobs, change log and offsets are laid out as now (written
    here by today's Store); besides them, as the schema-1 code wrote them: the ``tables`` sub-database (dupsort,
    dupfixed), one row per (code, substring) keyed generation (8 B) + table (1 B) + substring value, valued by
    the item's seq (8 B), and ``schema_version`` 1 and ``multihash_tables`` in meta."""
    s = Store(path, bits=32)
    s.write_batch(items(n), {("t", 0): n})
    s.close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        tables = env.open_db(b"tables", txn=txn, dupsort=True, dupfixed=True)
        meta, codes, recs = (env.open_db(name, txn=txn, create=False) for name in (b"meta", b"codes", b"items"))
        for key, code in txn.cursor(db=codes):
            seq = json.loads(txn.get(key[8:], db=recs))["seq"]
            for j, v in enumerate(Substrings(32, 2).values(code)):
                txn.put(key[:8] + bytes([j]) + v.to_bytes(2, "big"), seq.to_bytes(8, "big"), db=tables, dupdata=True)
        txn.put(b"schema_version", b"1", db=meta)
        txn.put(b"multihash_tables", b"2", db=meta)
        for later in (b"deletes", b"recodes"):  # schema 3's and 4's: not there yet
            txn.drop(env.open_db(later, txn=txn, create=False), delete=True)
    env.close()
    return n * 2  # table rows


def raw_state(path, store=None) -> dict:
    """What the LMDB file holds, read without the store's code: schema, the tables' rows (None: no such
    sub-database), items and meta keys. ``store``: the Store holding it open in this process (one
    environment per file and process), read through its LMDB handle."""
    env = store.env if store is not None else lmdb.open(str(path), max_dbs=16, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            meta = {k.decode(): json.loads(v) for k, v in txn.cursor(db=env.open_db(b"meta", txn=txn, create=False))}
            has_tables = txn.get(b"tables") is not None
            rows = txn.stat(env.open_db(b"tables", txn=txn, create=False))["entries"] if has_tables else None
            n = txn.stat(env.open_db(b"items", txn=txn, create=False))["entries"]
    finally:
        if store is None:
            env.close()
    return {"schema": meta["schema_version"], "table_rows": rows, "items": n, "multihash_tables": meta.get("multihash_tables")}


def test_a_schema_1_shard_is_read_as_it_is_and_migrated_by_its_writer(tmp_path):
    rows = schema_1_shard(tmp_path)
    assert raw_state(tmp_path) == {"schema": 1, "table_rows": rows, "items": 6, "multihash_tables": 2}
    reader = Store(tmp_path, readonly=True)  # a query server: reads it, changes nothing
    snap = reader.snapshot()
    assert reader.count() == 6 and len(snap.ids) == 6 and reader.get_item("id1")["code"] == items(6)[1].code
    reader.close()
    assert raw_state(tmp_path)["schema"] == 1

    s = Store(tmp_path, bits=32)  # its worker: migrated in place
    assert raw_state(tmp_path, s) == {"schema": 4, "table_rows": None, "items": 6, "multihash_tables": None}
    assert s.read_meta()["schema_version"] == 4 and s.offsets() == {("t", 0): 6}
    s.write_batch(items(2, prefix="new"), {("t", 0): 8})
    gen, _ = s.begin_generation()  # a re-encode over the migrated shard
    s.swap_generation(gen, 2, s.ids_missing_from(gen), np.zeros((8, 4), np.uint8))
    assert s.drop_generation(1) == 8
    s.close()
    s = Store(tmp_path, bits=32)
    assert s.count() == 8 and s.snapshot().generation == 2 and s.read_meta()["schema_version"] == 4
    s.close()


def test_a_crash_during_the_migration_leaves_schema_1_whole(tmp_path):
    rows = schema_1_shard(tmp_path)
    # the writer dies inside the migration's transaction, after the drop, before the schema number is written
    script = textwrap.dedent(f"""
        import os
        from streamhash.index.store.env import Environment
        from streamhash.index.store import Store
        put_meta = Environment.put_meta
        def dying(self, txn, meta):
            if meta.get("schema_version") == 4:
                os._exit(17)
            put_meta(self, txn, meta)
        Environment.put_meta = dying
        Store({str(tmp_path)!r}, bits=32)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr
    assert raw_state(tmp_path) == {"schema": 1, "table_rows": rows, "items": 6, "multihash_tables": 2}
    s = Store(tmp_path, bits=32)
    assert s.count() == 6 and s.read_meta()["schema_version"] == 4
    s.close()
    assert raw_state(tmp_path)["table_rows"] is None


def test_a_reader_open_across_the_migration_keeps_reading(tmp_path):
    schema_1_shard(tmp_path)
    # a query server holding the shard open (another process: one LMDB environment per process)
    script = textwrap.dedent(f"""
        import sys
        from streamhash.index.store import Store
        s = Store({str(tmp_path)!r}, readonly=True)
        print(s.count(), len(s.snapshot().ids), flush=True)
        sys.stdin.readline()
        print(s.count(), sorted(s.snapshot().ids)[-1], s.get_item("new0")["code"].hex(), flush=True)
    """)
    reader = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().split() == ["6", "6"]
        s = Store(tmp_path, bits=32)
        s.write_batch(items(1, prefix="new"))
        s.close()
        out, err = reader.communicate("go\n", timeout=60)
    finally:
        reader.kill()
    assert reader.returncode == 0, err
    assert out.split() == ["7", "new0", items(1, prefix="new")[0].code.hex()]
    assert raw_state(tmp_path)["schema"] == 4


def test_a_schema_2_shard_without_deletes_is_read_as_it_is_and_gets_them_from_its_writer(tmp_path):
    """Schema 3 adds ``deletes`` (removed items). A read-only opener of an older shard finds none: nothing was
    removed from it; its writer creates it and writes the schema number."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4), {("t", 0): 4})
    s.close()
    env = lmdb.open(str(tmp_path), max_dbs=16)
    with env.begin(write=True) as txn:
        for later in (b"deletes", b"recodes"):
            txn.drop(env.open_db(later, txn=txn, create=False), delete=True)
        txn.put(b"schema_version", b"2", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()
    reader = Store(tmp_path, readonly=True)
    assert [c.id for c in reader.changes_since(0)[2]] == [f"id{i}" for i in range(4)]
    reader.close()
    s = Store(tmp_path, bits=32)
    assert s.read_meta()["schema_version"] == 4
    s.write_batch([], deletes=["id1"])
    assert [(c.id, c.deleted) for c in s.changes_since(4)[2]] == [("id1", True)]
    s.close()


def test_a_schema_3_shard_keeps_its_learned_items_where_their_latest_write_put_them(tmp_path):
    """Schema 4 adds ``recodes``: a learned code no longer moves its item in ``changes``. A shard written at schema 3
    holds items moved there by a learned code, with no ``arrived`` in their records: they keep that place, a later
    learned code keeps it too, and sending the item again or removing it leaves no entry behind in either log."""
    s = Store(tmp_path, bits=32)
    s.write_batch(items(4))  # seqs 1-4
    s.close()
    env = lmdb.open(str(tmp_path), max_dbs=16)
    with env.begin(write=True) as txn:  # id1 given a learned code by the schema-3 code: unlinked, linked at seq 5
        dbs = {n: env.open_db(n.encode(), txn=txn, create=False) for n in ("items", "codes", "changes", "meta")}
        rec = json.loads(txn.get(b"id1", db=dbs["items"]))
        rec.update(seq=5, recoded=True, learned=True)
        txn.put(b"id1", json.dumps(rec).encode(), db=dbs["items"])
        txn.put((1).to_bytes(8, "big") + b"id1", bytes(4), db=dbs["codes"])
        txn.delete((2).to_bytes(8, "big"), db=dbs["changes"])
        txn.put((5).to_bytes(8, "big"), b"id1", db=dbs["changes"])
        txn.put(b"next_seq", b"6", db=dbs["meta"])
        txn.put(b"schema_version", b"3", db=dbs["meta"])
        txn.drop(env.open_db(b"recodes", txn=txn, create=False), delete=True)
    env.close()
    reader = Store(tmp_path, readonly=True)
    assert reader.snapshot().ids == ["id0", "id2", "id3", "id1"] and reader.snapshot().arrivals.tolist() == [1, 3, 4, 5]
    assert [(c.seq, c.id, c.ts) for c in reader.changes_since(4)[2]] == [(5, "id1", None)]
    reader.close()
    s = Store(tmp_path, bits=32)
    assert s.read_meta()["schema_version"] == 4
    s.put_codes(["id1", "id0"], np.full((2, 4), 9, np.uint8))  # seqs 6, 7
    snap = s.snapshot()
    assert snap.ids == ["id0", "id2", "id3", "id1"] and snap.seqs.tolist() == [7, 3, 4, 6]
    assert [(c.seq, c.arrival) for c in s.changes_since(5)[2]] == [(6, 5), (7, 1)]
    s.write_batch(items(2, seed=4)[1:])  # id1 sent again: arrives at 8
    s.write_batch([], deletes=["id0"])
    assert s.snapshot().ids == ["id2", "id3", "id1"] and s.snapshot().arrivals.tolist() == [3, 4, 8]
    with s.env.begin() as txn:
        assert txn.stat(s.db["recodes"])["entries"] == 0 and txn.stat(s.db["changes"])["entries"] == 3
    s.close()
