"""Multi-index hash tables: candidates cover the true neighbours; tables always agree with codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import lmdb
import numpy as np
import pytest

from streamhash.codes import hamming_brute
from streamhash.index.multihash import TABLES_DB_FLAGS, MultiHashTables, choose_radius_strategy, verify
from streamhash.index.store import ItemWrite, Store

GEN = 3


@pytest.fixture()
def tables_db(tmp_path):
    env = lmdb.open(str(tmp_path / "t"), map_size=1 << 28, max_dbs=2)
    yield env, env.open_db(b"tables", **TABLES_DB_FLAGS)
    env.close()


def clustered_codes(rng, n, bits):
    """Codes around a few centres, so small radii have many true neighbours."""
    centres = rng.random((8, bits)) < 0.5
    noise = rng.random((n, bits)) < 0.06
    return np.packbits(centres[rng.integers(0, 8, n)] ^ noise, axis=1)


@pytest.mark.parametrize("bits,m", [(16, 1), (24, 2), (32, 2), (40, 3), (64, 4), (64, 5), (72, 4), (128, 8)])
def test_candidates_cover_true_neighbours(tables_db, bits, m):
    env, db = tables_db
    rng = np.random.default_rng(bits * 10 + m)
    t = MultiHashTables(bits, m)
    codes = clustered_codes(rng, 1500, bits)
    with env.begin(write=True) as txn:
        for seq, c in enumerate(codes):
            t.add(txn, db, GEN, seq + 100, c.tobytes())
        t.add(txn, db, GEN + 1, 7, codes[0].tobytes())  # another generation must never leak in
    queries = np.concatenate([codes[:6], clustered_codes(rng, 6, bits)])
    dist = hamming_brute(queries, codes)
    with env.begin() as txn:
        for radius in (0, 1, 2, 3, m + 1, 2 * m + 2, bits // 4):
            lims, seqs = t.candidates_batch(txn, db, GEN, queries, radius)
            for i, q in enumerate(queries):
                got = seqs[lims[i] : lims[i + 1]]
                want = np.flatnonzero(dist[i] < radius) + 100
                assert set(want) <= set(got.tolist()), (radius, i)
                assert (np.diff(got) > 0).all() and got.min(initial=100) >= 100  # sorted, unique, right gen
                np.testing.assert_array_equal(got, t.candidates(txn, db, GEN, q.tobytes(), radius))
            # Verified results equal the flat range search: distance, then seq (insertion) order.
            vl, vd, vs = verify(queries, lims, seqs, codes[seqs - 100], radius)
            for i in range(len(queries)):
                order = np.argsort(dist[i], kind="stable")
                order = order[dist[i][order] < radius]
                np.testing.assert_array_equal(vs[vl[i] : vl[i + 1]], order + 100)
                np.testing.assert_array_equal(vd[vl[i] : vl[i + 1]], dist[i][order])


def test_remove_and_probe_radii():
    t = MultiHashTables(64, 4)
    # Refined pigeonhole: max distance r = 4s + a probes radius s in a + 1 tables, s - 1 elsewhere.
    assert t.probe_radii(0) == [-1] * 4
    assert t.probe_radii(4) == [0, 0, 0, 0]  # r = 3
    assert t.probe_radii(5) == [1, 0, 0, 0]  # r = 4
    assert t.probe_radii(8) == [1, 1, 1, 1]  # r = 7
    assert t.n_probes(5) == 17 + 3
    with pytest.raises(ValueError):
        MultiHashTables(128, 1)  # 128-bit substrings cannot be probed


def test_remove(tables_db):
    env, db = tables_db
    t = MultiHashTables(32, 2)
    code = bytes([1, 2, 3, 4])
    with env.begin(write=True) as txn:
        t.add(txn, db, GEN, 1, code)
        t.add(txn, db, GEN, 2, code)
        t.remove(txn, db, GEN, 1, code)
    with env.begin() as txn:
        assert t.candidates(txn, db, GEN, code, 1).tolist() == [2]


def test_cost_model_prefers_tables_for_small_radius_and_scan_for_large():
    n, bits, m = 1_000_000, 64, 4
    assert choose_radius_strategy(n, bits, m, 2) == "tables"
    assert choose_radius_strategy(n, bits, m, 4) == "tables"
    assert choose_radius_strategy(n, bits, m, 12) == "scan"
    assert choose_radius_strategy(n, bits, m, 64) == "scan"
    assert choose_radius_strategy(n, bits, m, 8) == "tables"  # in-memory tables: up to radius 8 at 1M (refit)
    assert choose_radius_strategy(n, bits, m, 9) == "scan"
    assert choose_radius_strategy(2_000, bits, m, 3) == "scan"  # tiny index: just scan
    # skewed buckets (learned codes) move the break-even radius down
    assert choose_radius_strategy(n, bits, m, 8, skew=4.0) == "scan"
    # A slow scan (numpy backend) moves the break-even radius up, never down.
    for r in range(1, 20):
        if choose_radius_strategy(n, bits, m, r) == "tables":
            assert choose_radius_strategy(n, bits, m, r, backend="numpy") == "tables"


# ---------------------------------------------------------------- tables == codes after crashes
def tables_match_codes(path) -> None:
    """Every (generation, table, substring, seq) entry is implied by a stored code, and vice versa."""
    store = Store(path, readonly=True)
    try:
        with store.env.begin() as txn:
            seq_of = {k: json.loads(v)["seq"] for k, v in txn.cursor(db=store.db["items"])}
            want = set()
            for k, code in txn.cursor(db=store.db["codes"]):
                gen, item = int.from_bytes(k[:8], "big"), k[8:]
                for key in store.tables._keys(gen, code):
                    want.add((key, seq_of[item]))
            got = {(k, int.from_bytes(v, "big")) for k, v in txn.cursor(db=store.db["tables"])}
    finally:
        store.close()
    assert got == want


def items(rng, ids, bits=64):
    codes = np.packbits(rng.random((len(ids), bits)) < 0.5, axis=1)
    return [ItemWrite(id=f"item-{i}", code=c.tobytes(), blob=b"x", content_type="image/png", labels=(1,)) for i, c in
            zip(ids, codes)]


def test_tables_consistent_after_aborted_write(tmp_path):
    rng = np.random.default_rng(0)
    store = Store(tmp_path / "s", bits=64)
    store.write_batch(items(rng, range(50)))
    real_add, calls = store.tables.add, []

    def failing_add(*a, **kw):
        calls.append(1)
        if len(calls) == 25:
            raise RuntimeError("crash in the middle of a batch")
        return real_add(*a, **kw)

    store.tables.add = failing_add
    with pytest.raises(RuntimeError):
        store.write_batch(items(rng, range(30, 90)))  # overwrites 30..49, adds 50..89
    store.tables.add = real_add
    store.close()
    tables_match_codes(tmp_path / "s")
    store = Store(tmp_path / "s", readonly=True)
    assert store.count() == 50
    store.close()


def test_tables_consistent_after_killed_writer(tmp_path):
    path = tmp_path / "s"
    script = textwrap.dedent(f"""
        import os, numpy as np
        from streamhash.index.store import ItemWrite, Store
        rng = np.random.default_rng(1)
        def items(ids):
            codes = np.packbits(rng.random((len(ids), 64)) < 0.5, axis=1)
            return [ItemWrite(id=f"item-{{i}}", code=c.tobytes(), blob=b"x", content_type="image/png", labels=None)
                    for i, c in zip(ids, codes)]
        store = Store({str(path)!r}, bits=64)
        store.write_batch(items(range(40)))
        store.write_batch(items(range(20, 60)))
        real_add, n = store.tables.add, [0]
        def dying_add(*a, **kw):
            n[0] += 1
            if n[0] == 33:
                os._exit(17)  # no cleanup, no abort: the process just dies mid-transaction
            return real_add(*a, **kw)
        store.tables.add = dying_add
        store.write_batch(items(range(50, 120)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 17, proc.stderr
    tables_match_codes(path)
    store = Store(path, readonly=True)
    assert store.count() == 60
    store.close()
