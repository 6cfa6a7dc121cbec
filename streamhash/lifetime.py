"""Child processes that end with their parent, however the parent ends (a crash, a kill -9 included).

On Linux the kernel sends a child a chosen signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``), set
in the child between fork and exec (``subprocess.Popen(preexec_fn=...)``). The parent here is the *thread*
that forked: a child started from a thread that ends is killed then, so :func:`die_with_parent` returns
None off the main thread (no death signal: the caller stops the child itself). Elsewhere than Linux it
returns None too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return prctl


_PRCTL = _load_prctl()  # resolved here, not in the forked child, which should only make the call


def die_with_parent(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send ``sig`` to the child when this process's calling thread
    ends; None where that cannot work (not Linux, or not the main thread)."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl: the signal will never come
            os.kill(os.getpid(), int(sig))

    return preexec


def exit_on_stop_signals(code: int = 0) -> None:
    """Until the process installs its own handlers: SIGTERM, SIGINT or SIGHUP exit at once with ``code``. For a
    process still importing (torch takes seconds), which has nothing to clean up yet: the default action of
    SIGTERM would end it with -15, and SIGINT with a KeyboardInterrupt traceback out of some import."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: os._exit(code))
