"""Give freed memory back to the OS during training (glibc only; a no-op elsewhere).

glibc serves a large allocation from its heap once a freed ``mmap`` chunk has raised its dynamic
threshold (up to 32 MiB), and a heap rarely shrinks: a CPU training run's activations and evaluation
batches then stay resident after they are freed, and the peak RSS grows with every new batch shape
(1.3 GB after one step and one validation of the default run, see docs/benchmarks.md). A fixed
threshold serves every block of at least 4 MiB (the big activation and evaluation buffers) with its
own ``mmap``, which ``free`` unmaps at once. 4 MiB, not lower: at 64 KiB the peak falls further but
re-faulting the pages costs ~39% more CPU per training step; at 4 MiB no extra CPU was measured.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def release_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 4 MiB for this process; False where that is not possible or the
    user set ``MALLOC_MMAP_THRESHOLD_`` (theirs wins)."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
