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


ALLOCATOR_ENV = "TENSLORA_ALLOCATOR"
ALLOCATORS = ("system", "tcmalloc")
# the sub-commands that load a model and run batches through it (what fragments glibc's heap)
MODEL_COMMANDS = frozenset({"train", "evaluate", "predict", "zero-shot", "allocate"})
TCMALLOC_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")  # gperftools (Debian: libtcmalloc-minimal4)
# tcmalloc prints a line for every allocation above 1 GiB by default (an LLM's embedding matrix)
QUIET_LARGE_ALLOCS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 50)}


def find_tcmalloc() -> str | None:
    """The system's tcmalloc shared library (``libtcmalloc_minimal.so.4``), or None."""
    import ctypes.util

    for name in TCMALLOC_LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def tcmalloc_relaunch(argv: list[str], env: dict[str, str], find=find_tcmalloc) -> tuple[list[str], dict] | None:
    """``(argv, env)`` to run this command again with tcmalloc preloaded, or None to run it as it is.

    Opt-in (``TENSLORA_ALLOCATOR=tcmalloc``; the default ``system`` keeps the C library's malloc): on the
    default MiniLM run tcmalloc lowered the peak RSS from 2.1 to 1.6 GB at no extra CPU, but the SmolLM2
    runs peaked 25-30% higher on it (docs/benchmarks.md). Only ``MODEL_COMMANDS`` on Linux, and not when
    a malloc is preloaded already (``LD_PRELOAD`` names tcmalloc or jemalloc: ours after the relaunch, or
    the user's). A missing library is an error."""
    choice = env.get(ALLOCATOR_ENV, "system")
    if choice not in ALLOCATORS:
        raise ValueError(f"{ALLOCATOR_ENV}={choice!r} is not one of {', '.join(ALLOCATORS)}")
    command = next((a for a in argv[1:] if not a.startswith("-")), None)
    preloaded = env.get("LD_PRELOAD", "")
    if (choice == "system" or command not in MODEL_COMMANDS or not sys.platform.startswith("linux")
            or "tcmalloc" in preloaded or "jemalloc" in preloaded):
        return None
    library = find()
    if library is None:
        raise ValueError(f"{ALLOCATOR_ENV}=tcmalloc, but no tcmalloc library is installed (Debian/Ubuntu: "
                         "apt-get install libtcmalloc-minimal4); unset it to use the C library's malloc")
    new_env = {**QUIET_LARGE_ALLOCS, **env, "LD_PRELOAD": " ".join(p for p in (library, preloaded) if p)}
    program = argv[0]  # the console script again (its name shows in --help), else ``python -m tenslora``
    start = [program] if os.path.isfile(program) and os.path.basename(program) != "__main__.py" else ["-m", "tenslora"]
    return [sys.executable, *start, *argv[1:]], new_env


def active_allocator() -> str:
    """``tcmalloc``, ``jemalloc`` or ``system``: the malloc this process runs on (from its memory maps)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"
