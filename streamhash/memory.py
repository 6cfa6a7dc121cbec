"""Process-wide memory settings the long-running processes apply at start-up.

Python's cyclic garbage collector walks every tracked object on a full collection: after importing torch
and FastAPI and loading a network that is a few hundred thousand objects, ~60-80 ms during which a
server answers nothing (the query server's p99 under 8 connections was 78 ms with it, 7 ms with the
collector off). :func:`freeze_startup_objects` moves what start-up built out of the collector's reach;
what requests allocate later is still collected.

glibc serves allocations above its mmap threshold (128 KiB at start) with mmap and returns them to
the OS when freed, but raises the threshold after each such free, up to 32 MiB. A process that
grows numpy arrays by doubling (the learner's bookkeeping, the live index) then gets its later big
arrays from the heap, and the freed ones stay resident: measured ~70 B/item for the learner instead
of ~45 (benchmarks/bench_memory.py). Pinning the threshold keeps big arrays on mmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
DEFAULT_MMAP_THRESHOLD = 128 << 10


def pin_malloc_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``nbytes``; False (and nothing changed) on another C library."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False


def freeze_startup_objects() -> int:
    """Collect once, then exempt every object alive now from later collections (``gc.freeze``); returns how many."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
