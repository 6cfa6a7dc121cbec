"""Commit notification for the query server's follower: the kernel's inotify on the store directory.

An LMDB commit (``writemap`` off, as :class:`~streamhash.index.store.env.Environment` opens it) writes
its dirty pages and then the meta page into ``data.mdb`` with ``pwrite``: each write raises
``IN_MODIFY`` on the file, so a watch on the store directory learns of every commit from every
writer process on the machine, with no configuration and nothing the worker has to send. (The
commit never closes the file, so ``IN_CLOSE_WRITE`` is not the event to wait for; readers touch only
the ``lock.mdb`` map, which raises nothing.)

The watch is a wake-up hint, never a source of data: the follower still reads the change log from
the last seq it applied, so a wake-up during a commit (before its meta page is written) only
costs one empty refresh, and the meta page's own write wakes it again. Polling remains the fallback:
:meth:`Waiter.wait` returns after ``timeout`` whatever happens, which covers what inotify does not
see (other OSes, network filesystems, a ``writemap`` writer whose stores go through the map) and an
inotify that could not be set up (``fs.inotify.max_user_instances`` / ``max_user_watches`` spent).

Linux's inotify through ctypes on libc (``inotify_init1``, ``inotify_add_watch``): three calls, so
no dependency is added for them; elsewhere :func:`make_waiter` returns the polling waiter.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import select
import struct
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
WATCH_MASK = IN_MODIFY | IN_CLOSE_WRITE | IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF | IN_MOVE_SELF

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of NUL-padded name)


class Waiter:
    """Polling only: :meth:`wait` sleeps ``timeout`` unless :meth:`interrupt` is called."""

    notifying = False

    def __init__(self) -> None:
        self._interrupted = threading.Event()

    def wait(self, timeout: float) -> bool:
        """Block until notified, interrupted, or ``timeout`` seconds; True when woken early."""
        return self._interrupted.wait(timeout)

    def interrupt(self) -> None:
        """Wake :meth:`wait` now and every later call (used by ``stop``)."""
        self._interrupted.set()

    def close(self) -> None:
        pass


class InotifyWaiter(Waiter):
    """Wakes :meth:`wait` on any write in the store directory; all pending events are drained per wake
    (a burst of commits, and the several page writes of one commit, become one refresh)."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        libc = _libc()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        if libc.inotify_add_watch(fd, os.fsencode(Path(path)), WATCH_MASK) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch({path}): {os.strerror(err)}")
        self._pipe_r, self._pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._poll.register(self._pipe_r, select.POLLIN)
        self.notifying = True
        self._closed = False
        self._lock = threading.Lock()

    def wait(self, timeout: float) -> bool:
        if self._interrupted.is_set():
            return True
        if not self.notifying:  # the watch went away: plain polling from here on
            return super().wait(timeout)
        try:
            ready = self._poll.poll(max(0, int(timeout * 1000)))
        except InterruptedError:
            ready = []
        if self._interrupted.is_set():
            return True
        if not ready:
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        """Read every pending event; a removed watch (directory deleted or moved) or an error ends the
        notification and leaves the polling fallback."""
        while True:
            try:
                buf = os.read(self._fd, 64 * 1024)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                log.warning("store notification failed (%s); polling from now on", exc)
                self.notifying = False
                return
            off = 0
            while off + _EVENT.size <= len(buf):
                _, mask, _, n = _EVENT.unpack_from(buf, off)
                off += _EVENT.size + n
                if mask & (IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF):
                    log.warning("store directory watch removed (mask %#x); polling from now on", mask)
                    self.notifying = False

    def interrupt(self) -> None:
        super().interrupt()
        with self._lock:
            if not self._closed:
                try:
                    os.write(self._pipe_w, b"x")
                except BlockingIOError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self._fd, self._pipe_r, self._pipe_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        lib.inotify_init1.argtypes, lib.inotify_init1.restype = [ctypes.c_int], ctypes.c_int
        lib.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        lib.inotify_add_watch.restype = ctypes.c_int
        _LIBC = lib
    return _LIBC


def make_waiter(path: str | os.PathLike, *, notify: bool = True) -> Waiter:
    """An inotify waiter on ``path`` when asked for and available, else the polling one (logged)."""
    if not notify:
        return Waiter()
    if not sys.platform.startswith("linux"):
        log.info("no store commit notification on %s; polling", sys.platform)
        return Waiter()
    try:
        return InotifyWaiter(path)
    except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify
        log.warning("store commit notification unavailable (%s); polling", exc)
        return Waiter()
