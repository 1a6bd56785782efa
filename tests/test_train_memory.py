"""Freed training buffers go back to the OS (glibc): a buffer pattern that glibc's default keeps
resident is returned once ``release_freed_memory`` has run. Each case runs in a fresh process."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PATTERN = textwrap.dedent('''
    import ctypes, sys
    from tenslora.train.memory import release_freed_memory
    if sys.argv[1] == "fixed":
        assert release_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
    def touched(n):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        return p
    libc.free(touched(8 << 20))  # a freed 8 MiB mmap block: glibc's threshold rises above 5 MiB
    before = rss_mb()
    blocks, keep = [], []
    for _ in range(40):  # 200 MiB of 5 MiB "activations", each followed by a small live object
        blocks.append(touched(5 << 20))
        keep.append(touched(1024))
    for p in blocks:
        libc.free(p)
    print(round(rss_mb() - before))
''')


def retained_mb(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, env=env,
                         check=True, timeout=300)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"),
                    reason="glibc malloc on Linux")
def test_freed_buffers_are_returned_to_the_os():
    assert retained_mb("default") > 150  # glibc's default keeps the freed 200 MiB resident
    assert retained_mb("fixed") < 20  # with the fixed threshold they are unmapped at once


def test_user_setting_wins(monkeypatch):
    from tenslora.train.memory import release_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert release_freed_memory() is False
