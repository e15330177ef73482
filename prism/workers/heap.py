"""glibc's malloc, set for a worker that handles large messages.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` (128 KiB at
first, raised as such blocks are freed, up to 32 MiB) with a fresh ``mmap``
and unmaps it on ``free``; and it gives the top of its heap back to the
kernel whenever more than ``M_TRIM_THRESHOLD`` of it is free. Either way the
next large allocation is fresh pages, each faulted in and zeroed by the
kernel on first touch: about 256 page faults per 1 MiB ``bytes``. A 1 MiB
GetItems or PutItems makes several such objects (the read, the request or
answer message, its serialization), so those faults were a large share of
what a big call cost the worker (measured: running the worker with
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=134217728`` cut a
1 MiB GetItems from ~1,805 to ~1,326 us of CPU).

So ``tune`` sets both thresholds at worker start (``MMAP_THRESHOLD_BYTES``,
``TRIM_THRESHOLD_BYTES``): blocks up to 32 MiB come from the heap and are
reused there. The price is memory the worker keeps after a burst, which
``trim_when_quiet`` gives back: once less than ``IDLE_TRIM_BYTES`` went
through the worker's connections in a check interval (``IDLE_CHECK_S``),
and both its RSS (since the last trim) and malloc's free memory have grown
past it, ``malloc_trim(0)`` returns every free page (not only the heap's
top) to the kernel, so RSS comes back to about what the live objects need.

Anything other than glibc (musl, another platform) is left as it is: ``tune``
and ``trim_when_quiet`` do nothing there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable
from typing import Final

import trio

log = logging.getLogger("prism.worker")

# mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3

# Blocks below this come from the heap: above the 4 MiB default message
# limit with its copies in flight, and glibc's own ceiling for the dynamic
# threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit).
MMAP_THRESHOLD_BYTES: Final = 32 * 1024 * 1024
# The heap's free top is given back at free() time only beyond this: a burst
# of large calls reuses its memory instead of faulting it in again.
TRIM_THRESHOLD_BYTES: Final = 128 * 1024 * 1024
# Idle (no call in flight) for a whole check interval, with more than this
# free in malloc's arenas: malloc_trim(0).
IDLE_CHECK_S: Final = 1.0
IDLE_TRIM_BYTES: Final = 8 * 1024 * 1024


_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
    ] + [(name, ctypes.c_size_t) for name in ("fordblks", "keepcost")]


def _glibc() -> ctypes.CDLL | None:
    """This process's C library if it is glibc with ``mallopt``, ``malloc_trim`` and ``mallinfo2`` (2.33+)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "mallinfo2")):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


_LIBC: Final = _glibc()


def tune() -> bool:
    """Set glibc's thresholds (see the module docstring); False if this is not glibc."""
    if _LIBC is None:
        return False
    ok: bool = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok &= _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not ok:
        log.warning("mallopt refused the worker's thresholds; large calls will cost more CPU")
    return ok


def free_bytes() -> int:
    """Bytes malloc holds free in its arenas (``mallinfo2().fordblks``); 0 without glibc."""
    return 0 if _LIBC is None else int(_LIBC.mallinfo2().fordblks)


def trim() -> None:
    """Give every free page malloc holds back to the kernel."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident set size (``/proc/self/statm``); 0 if unreadable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


async def trim_when_quiet(traffic_bytes: Callable[[], int]) -> None:
    """Forever, every ``IDLE_CHECK_S``: ``trim`` once RSS has grown by more
    than ``IDLE_TRIM_BYTES`` since the last trim, malloc holds more than that
    free, and less than that went through the worker's connections
    (``traffic_bytes``: a running total) since the check before: large
    messages have stopped, whether or not small calls go on (waiting for no
    call at all in flight, a neighbour's calls kept a flood's memory from ever
    coming back). While large messages keep coming, the memory is kept for
    them. (A trim leaves malloc's free lists as they were, pages released, so
    RSS growth, or free memory beyond what the last trim left, is what tells
    that a burst has come and gone since.)"""
    if _LIBC is None:
        return
    baseline = rss_bytes()
    freed = 0  # malloc's free bytes right after the last trim (pages released, chunks still free)
    moved_before = traffic_bytes()
    while True:
        await trio.sleep(IDLE_CHECK_S)
        moved = traffic_bytes()
        quiet = moved - moved_before < IDLE_TRIM_BYTES
        moved_before = moved
        free = free_bytes()
        # New free memory since the last trim: RSS grew, or memory that was
        # live at the last trim (a stalled client's answers) has been freed.
        grown = rss_bytes() - baseline > IDLE_TRIM_BYTES or free - freed > IDLE_TRIM_BYTES
        if quiet and grown and free > IDLE_TRIM_BYTES:
            trim()
            baseline = rss_bytes()
            freed = free_bytes()
