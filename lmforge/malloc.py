"""glibc's malloc settings (Linux); a no-op elsewhere.

Two users with opposite needs: ``prepare``'s workers fix a low mmap threshold so their peak memory
stays flat, and training processes raise it so that a step's large tensors are not unmapped and
page-faulted in again every step (``lmforge.runtime.keep_freed_memory``).
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def mallopt(option: int, value: int) -> bool:
    """glibc's ``mallopt(option, value)``; False where there is none (not glibc) or it refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(fn(ctypes.c_int(option), ctypes.c_int(value)))
