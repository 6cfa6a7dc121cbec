"""A readers-writer lock: many readers or one writer; a waiting writer blocks new readers so it is not starved.

>>> lock = RWLock()
>>> with lock.read(), lock.read():  # readers share it
...     pass
>>> with lock.write():
...     pass
"""

from __future__ import annotations

import threading


class _Side:
    """``with lock.read():`` / ``with lock.write():``: one object per side, reused (no generator per use: the
    query server takes an index's read lock several times a search)."""

    __slots__ = ("_acquire", "_release")

    def __init__(self, acquire, release):
        self._acquire, self._release = acquire, release

    def __enter__(self) -> None:
        self._acquire()

    def __exit__(self, *exc) -> None:
        self._release()


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._read = _Side(self._acquire_read, self._release_read)
        self._write = _Side(self._acquire_write, self._release_write)

    def read(self) -> _Side:
        return self._read

    def write(self) -> _Side:
        return self._write

    def _acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:  # nobody else can be waiting on a reader
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()
