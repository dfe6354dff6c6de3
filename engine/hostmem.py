"""Host memory: hand freed frame buffers back to the operating system.

A 1080p RGB frame is 6 MB and a batch of them 200 MB; they are allocated and freed all the time,
from several threads. glibc serves such blocks with ``mmap`` at first, but after the first one
is freed it raises its ``mmap`` threshold to that size (up to 32 MB), so later frames come from
its per-thread heaps, which keep the memory after ``free``: the process's resident size then
grows far beyond the frames actually alive (seen: 12–16 GB on a 16-core machine decoding four
1080p inputs at once, for about 4 GB of frames in flight). A fixed threshold stops that
adjustment: every block of at least :data:`LARGE_BLOCK_BYTES` gets its own mapping and goes
back to the OS when freed. Process-wide; other C libraries are unaffected but for the same rule.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

#: ``mallopt`` parameter number of ``M_MMAP_THRESHOLD`` (glibc ``malloc.h``).
M_MMAP_THRESHOLD = -3
#: Blocks of at least this many bytes are mapped on their own (a 512² RGB frame is 0.75 MB).
LARGE_BLOCK_BYTES = 1 << 20


@functools.cache
def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's ``mmap`` threshold at ``threshold`` bytes (once per process); False where the C
    library has no ``mallopt`` (not glibc: nothing to do)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, ok)
    return ok
