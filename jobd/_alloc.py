"""Tune glibc's allocator for a process that moves output in 256-512 KiB buffers.

jobd allocates and frees a buffer of up to 256 KiB per pipe read, and about
twice that per output frame and per encrypted chunk. glibc serves blocks
above its mmap threshold (128 KiB at start, raised on the fly) with a fresh
``mmap``, and gives the top of its heap back to the kernel beyond its trim
threshold (twice the mmap threshold): either way, every such buffer costs
page faults and zeroed pages again, and on a virtual machine a fault is
dear. Fixed thresholds keep these buffers in the heap and the heap's top in
place (bench/README.md has the measurements). The heap never grows beyond
what is alive at once, so memory use stays bounded; at most TRIM_THRESHOLD of
free memory stays mapped.

Fixed thresholds have a price: memory freed in the middle of the heap stays
resident. After an attack of 60 connections at a time, each buffering a
1 MiB frame, RSS stayed at 140-170 MB, and after 100 stalled streams closed at
their peak. So :func:`trim` (``malloc_trim(0)``, which hands every free page
of every arena back to the kernel) runs once connections have closed and a
few seconds passed (jobd._server, TRIM_DELAY): a cost of milliseconds, at
most once per TRIM_DELAY, and RSS comes back to what is in use.

Anything but glibc (musl, a static build without ``mallopt``): nothing done.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Buffers up to this size come from the heap (an output frame is ~513 KiB).
MMAP_THRESHOLD = 1 << 20
#: Free memory at the heap's top kept mapped rather than handed back.
TRIM_THRESHOLD = 16 << 20


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: its mallopt means nothing here
        return None
    return libc


def tune_allocator() -> bool:
    """Set fixed mmap and trim thresholds; True if glibc took them."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def trim() -> bool:
    """Give the kernel back every free page of the heap (glibc's ``malloc_trim(0)``);
    True if glibc released any. Blocks for milliseconds: call it from a thread."""
    libc = _glibc()
    if libc is None:
        return False
    malloc_trim = libc.malloc_trim
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))
