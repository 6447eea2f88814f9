"""glibc's heap on CPU: large blocks on their own mappings, and freed pages handed back to the OS.

With glibc's defaults, the RSS of a training process keeps what it once freed: the mmap threshold
rises as big blocks are freed (up to 32 MiB) and freed memory then stays in the heap. Measured: an
FSDP rank at the ~1B shape 0.5-0.7 GiB higher, an NF4 base's 3-step peak 1.49-1.77 GiB instead of
1.38-1.41 (docs/guides/scale.md). Both functions are no-ops off glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache

M_MMAP_THRESHOLD = -3  # mallopt's parameter number


@cache
def _libc():
    """The C library, looked up once (`find_library` runs `ldconfig`; `trim_heap` runs every step)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


def return_freed_memory(threshold: int = 4 * 1024**2) -> None:
    """Serve every allocation of `threshold` bytes or more with its own mmap, given back when freed
    (fixed from now on: glibc no longer raises it). FSDP gathers and frees a whole unit per use, and
    a training step frees its activations and dequantized weights."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, threshold)


def trim_heap() -> None:
    """glibc's `malloc_trim`: give the free pages of its heap back to the OS (a few ms)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
