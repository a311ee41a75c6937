"""glibc malloc settings for the two long-running servers (mallopt(3)). Elsewhere than
glibc these do nothing.

glibc serves an allocation above its mmap threshold (128 KiB at start) with mmap, and when
such a block is freed it raises the threshold to that block's size and the trim threshold to
twice that: sizes seen once then come from the heap, and free memory at the heap's top beyond
the trim threshold goes back to the OS. A threshold set here is fixed: glibc never moves it."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3


def set_thresholds(mmap_threshold: int, trim_threshold: int | None = None) -> bool:
    """Fix the mmap threshold (and the trim threshold, if given); False where not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
        if trim_threshold is not None:
            ok = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False
