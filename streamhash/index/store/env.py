"""The LMDB environment and its writer discipline: opening, the writer lock, transactions, map growth, a full disk.

Concurrency, within a process: one write transaction at a time (``_writer``, our lock, taken before
LMDB's own), and the map is resized only by the thread holding it, after its transaction aborted and
while no reader transaction is open in this process (``_resize``: readers shared, resize exclusive).
LMDB forbids ``set_mapsize`` with any transaction of the process open; two writing threads that grew
the map on their own failed with "Cannot set_mapsize while a write transaction is active" or a
deadlock. Across processes: one writable handle per environment, enforced by an exclusive ``flock`` on
``writer.lock`` beside ``data.mdb``; read-only handles in other processes adopt growth on
``MapResizedError``.

Two kinds of writers: the ingest path's, which someone waits on (a batch's freshness), and a re-encode's
(``background=True``), which may take a while as long as it never stands in front of the other kind. A
background transaction starts only while no other writer waits for the lock, so an ingest commit waits
at most for the one background transaction in progress; a re-encode keeps each of its transactions
short (:mod:`.generations`) so that wait is short too. CPython's lock is not fair: a thread that
releases it and takes it again at once (a build's next chunk) would otherwise overtake a thread
already waiting for it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import lmdb

from streamhash.errors import StoreError, StoreFullError, StoreLockedError
from streamhash.index.store.layout import DB_NAMES, OPTIONAL_DBS
from streamhash.rwlock import RWLock

log = logging.getLogger(__name__)

_MIN_GROWTH = 64 << 10


class Environment:
    """One LMDB environment, its sub-database handles and the only way to run transactions on them."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool, initial_map_size: int, max_map_size: int,
                 map_growth_factor: float):
        self.path = Path(path)
        self.readonly = readonly
        self.max_map_size = max_map_size
        self.map_growth_factor = map_growth_factor
        self._writer = threading.Lock()
        self._turn = threading.Condition()  # background writers wait on it for no other writer to be waiting
        self._writers_waiting = 0  # writers (background ones included) waiting for or holding ``_writer``
        self._resize = RWLock()
        self._lock_file = None
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreError(f"no index at {self.path} (start a worker first, or check STREAMHASH_STORE__PATH)")
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock_file = _lock_exclusively(self.path / "writer.lock")
        self.env = lmdb.open(
            str(self.path), map_size=initial_map_size, max_dbs=len(DB_NAMES) + 2, readonly=readonly,
            subdir=True, lock=True, readahead=False, meminit=False, max_readers=256,
        )
        self.db = {name: self._open_db(name) for name in DB_NAMES}

    def _open_db(self, name: str):
        """A sub-database handle; None for an optional one a read-only opener finds absent (an older shard)."""
        try:
            return self.env.open_db(name.encode(), create=not self.readonly)
        except lmdb.NotFoundError:
            if name in OPTIONAL_DBS and self.readonly:
                return None
            raise

    def read(self, fn):
        """``fn(txn)`` in a read transaction (one MVCC snapshot), adopting growth by another process."""
        for _ in range(3):
            try:
                with self._resize.read(), self.env.begin(buffers=False) as txn:
                    return fn(txn)
            except lmdb.MapResizedError:
                # Another process grew the map; adopt its size (no transaction of ours may be open).
                with self._resize.write():
                    self.env.set_mapsize(0)
        raise StoreError("map kept resizing under a reader")

    def write(self, fn, *, background: bool = False):
        """Run ``fn(txn)`` in one write transaction, growing the map when it is full.

        ``background``: wait until no other writer is waiting, so a foreground writer never waits for
        more than the background transaction already in progress.
        Disk-full conditions are raised as StoreFullError in every form LMDB reports them: MDB_MAP_FULL
        at the ceiling, ENOSPC, and EIO (what tmpfs and some filesystems return from the commit's write).
        """
        if self.readonly:
            raise StoreError("store opened read-only")
        with self._turn:
            if background:
                self._turn.wait_for(lambda: self._writers_waiting == 0)
            self._writers_waiting += 1
        try:
            with self._writer:
                return self._write_locked(fn)
        finally:
            with self._turn:
                self._writers_waiting -= 1
                self._turn.notify_all()

    def _write_locked(self, fn):
        """The transaction itself, retried after growing the map (``_writer`` held)."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                with self._resize.write():
                    self.env.set_mapsize(0)
            except lmdb.Error as exc:
                if _is_disk_full(exc):
                    raise StoreFullError(f"disk full writing {self.path}: {exc}") from exc
                raise

    def _grow(self) -> None:
        """Double the map (called with ``_writer`` held and no write transaction open)."""
        size = self.env.info()["map_size"]
        new = min(max(int(size * self.map_growth_factor), size + _MIN_GROWTH), self.max_map_size)
        if new <= size:
            raise StoreFullError(
                f"store {self.path} reached its map-size ceiling of {size} bytes "
                f"(raise STREAMHASH_STORE__MAX_MAP_SIZE_BYTES)"
            )
        free = shutil.disk_usage(self.path).free
        used = (self.path / "data.mdb").stat().st_size
        if new - used > free:
            new = used + free
            if new <= size:
                raise StoreFullError(f"disk full: {free} bytes free under {self.path}, store needs more than {size}")
        log.info("growing LMDB map of %s from %d to %d bytes", self.path, size, new)
        with self._resize.write():
            self.env.set_mapsize(new)

    def last_txnid(self) -> int:
        """The id of the newest commit whose meta page is written, without a transaction. A reader's snapshot
        may still be one behind it (LMDB publishes the id to readers just after), never ahead."""
        return self.env.info()["last_txnid"]

    def read_meta(self, txn=None) -> dict:
        def read(t):
            return {k.decode(): json.loads(v) for k, v in t.cursor(db=self.db["meta"])}

        return read(txn) if txn is not None else self.read(read)

    def put_meta(self, txn, meta: dict) -> None:
        for k, v in meta.items():
            txn.put(k.encode(), json.dumps(v).encode(), db=self.db["meta"])

    def close(self) -> None:
        self.env.close()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock
            self._lock_file = None


def _lock_exclusively(path: Path):
    """An open file holding an exclusive ``flock`` on ``path``; StoreLockedError if another handle has it.

    flock (not a pid file): the kernel releases it when the holder dies, kill -9 included, so a crash
    never leaves a stale lock behind.
    """
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise StoreLockedError(
            f"store {path.parent} is already open for writing by {holder}; one worker per store "
            f"(give each worker its own STREAMHASH_STORE__PATH)"
        ) from None
    fh.truncate(0)
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EFBIG)


def _is_disk_full(exc: Exception) -> bool:
    """LMDB's errors carry no errno attribute: the message is ``mdb_txn_commit: <strerror>``."""
    if getattr(exc, "errno", None) in _DISK_FULL_ERRNOS:
        return True
    text = str(exc)
    return any(os.strerror(e) in text for e in _DISK_FULL_ERRNOS)
