"""Give the heap's free pages back to the operating system after every forward batch.

Forward batches allocate and free tensors whose sizes change with every batch's width. After a large
block is freed, glibc's malloc raises its mmap threshold, so later blocks of that size come from the
heap, and the heap's free pages stay resident: a long compress run's resident memory creeps up with
the number of items it has scored although it holds nothing more. `malloc_trim(0)` returns every
whole free page (RESULTS.md, "Catalogues the size of the paper's", measures both). Elsewhere (musl,
macOS, Windows) there is no such call and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Return the heap's free pages to the OS; False where the C library has no malloc_trim."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
