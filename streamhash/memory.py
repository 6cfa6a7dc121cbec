"""Process-wide memory settings the long-running processes apply at start-up.

glibc serves allocations above its mmap threshold (128 KiB at start) with mmap and returns them to
the OS when freed, but raises the threshold after each such free, up to 32 MiB. A process that
grows numpy arrays by doubling (the learner's bookkeeping, the live index) then gets its later big
arrays from the heap, and the freed ones stay resident: measured ~70 B/item for the learner instead
of ~45 (benchmarks/bench_memory.py). Pinning the threshold keeps big arrays on mmap.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
