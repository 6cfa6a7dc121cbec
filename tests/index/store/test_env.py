"""The environment: map growth and its ceiling, a full disk, crashes mid-transaction, one writer per store."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from streamhash.errors import StoreError, StoreFullError
from streamhash.index.store import Store
from tests.index.store.support import items


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


def test_an_ingest_commit_waits_for_one_background_transaction_not_for_the_next_ones(tmp_path):
    """A re-encode writes chunk after chunk; an ingest commit arriving meanwhile is next once the chunk in
    progress commits. CPython's lock is not fair: before, the re-encoder released it and took it again
    at once, and the commit waited behind chunk after chunk."""
    import threading
    import time

    env = Store(tmp_path, bits=32)._env
    order, inside, release = [], threading.Event(), threading.Event()

    def chunk(n):
        def fn(txn):
            order.append(f"chunk {n}")
            if n == 0:
                inside.set()
                release.wait(10)
        return fn

    build = threading.Thread(target=lambda: [env.write(chunk(n), background=True) for n in range(3)])
    build.start()
    assert inside.wait(10)
    ingest = threading.Thread(target=lambda: env.write(lambda txn: order.append("ingest")))
    ingest.start()
    deadline = time.monotonic() + 10
    while env._writers_waiting < 2 and time.monotonic() < deadline:  # the commit waits for the writer lock
        time.sleep(0.001)
    release.set()
    build.join(10)
    ingest.join(10)
    assert order == ["chunk 0", "ingest", "chunk 1", "chunk 2"]
