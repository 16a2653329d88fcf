"""Keep freed memory in the heap so large receive buffers are not page-faulted in every round.

Every fetch of a large model allocates a buffer of its size. glibc serves allocations above its
mmap threshold (128 KiB, adapting up to 32 MiB) with fresh mmap()ed pages and unmaps them on free,
so each round the kernel hands out and zero-fills the pages again: on this class of machine that
runs at ~0.5 GB/s and, with the checksum, was the largest cost of a fetch after gRPC itself
(benchmarks/bench_fetch.py, docs/performance.md). Raising the mmap and trim thresholds makes glibc
take such buffers from the heap and keep them there when freed, so the next round reuses warm
pages (measured ~2.7 GB/s for the same copy). The price: a daemon's RSS stays at its peak instead of
shrinking between rounds, which is what a long-running agent wants anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def keep_freed_memory(threshold_bytes: int = 1 << 30) -> bool:
    """Ask glibc to serve allocations up to ``threshold_bytes`` from the heap and not trim it.

    Idempotent; a no-op (returning False) where the C library is not glibc.
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2 * threshold_bytes)
    )
    log.debug("malloc thresholds raised to %d bytes: %s", threshold_bytes, ok)
    _done = ok
    return ok
