"""Keep freed memory inside the process during training loops (glibc malloc settings, set from code).

A training step frees gigabytes of activations after its backward pass and allocates them again in the next
step. glibc returns the freed top of its heap to the kernel as soon as more than M_TRIM_THRESHOLD is free
(dynamically 2 x the mmap threshold, at most 64 MB), and serves any block above the mmap threshold (at most
32 MB) with a fresh mmap that munmap returns on free. Either way the next step touches new pages: one
zero-filled minor page fault per 4 KiB, which is system time (on some virtual machines more than half of a
LoRA step's CPU time, see issue #12). Raising the trim threshold and fixing the mmap threshold at glibc's
maximum keeps those pages mapped for reuse during the loop; RSS stays near the loop's peak until it ends.

Set with mallopt through ctypes (Python exposes no binding), so it holds on every glibc Linux whatever the
environment (MALLOC_TRIM_THRESHOLD_ etc. would have to be set before the process starts). Elsewhere (macOS,
musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager

# <malloc.h> parameter numbers (glibc)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's ceiling on 64-bit (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB free at the heap top
TRIM_AFTER = 64 * 1024 * 1024


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


@contextmanager
def retained_freed_memory():
    """Inside the block, glibc keeps freed heap memory mapped (no trimming) and serves blocks up to 32 MB from
    the heap rather than from a fresh mmap each time. On exit the trim threshold drops to 64 MB (about glibc's
    own dynamic value) and the free heap is handed back at once (malloc_trim), so later stages of the same
    process do not pay for the training loop's retained memory. Yields True when glibc accepted the settings."""
    libc = _libc()
    # Setting any threshold turns off glibc's dynamic adjustment, so set both; mallopt returns 1 on success.
    ok = (
        libc is not None
        and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
        and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
    try:
        yield ok
    finally:
        if ok:
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_AFTER)
            libc.malloc_trim(0)
