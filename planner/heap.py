"""Allocator settings for the `plan` command: keep the search's large numpy temporaries on the heap.

A search chunk's arrays are about 1 MiB each and live for one operation. Above glibc's mmap
threshold (128 KiB at start, raised only as mmapped blocks are freed) every one of them is a fresh
mmap whose pages fault in and are unmapped again on free: about a third of `plan`'s time on
llama-3.1-405b/16384 went to the kernel. Raising the mmap threshold and the trim threshold
(mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, glibc malloc(3); the environment's
MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ do the same) keeps freed blocks for reuse. Only
the command sets it (a library caller's process is its own); elsewhere than glibc it does nothing.
"""
from __future__ import annotations

M_TRIM_THRESHOLD = -1            # glibc malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20        # above any chunk's array (131,072 candidates x 8 bytes = 1 MiB)
TRIM_THRESHOLD = 256 << 20       # free heap kept before it is returned to the system


def keep_temporaries_on_heap(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Set the two thresholds where the C library is glibc; True where it did. validate's CPU
    ranks call it too (validate/worker.py init_rank), with thresholds above their largest buffer."""
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("MALLOC_MMAP_THRESHOLD_") \
            or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False              # not glibc's malloc, or the user's own setting stands
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt      # glibc's soname (musl has no mallopt thresholds)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
