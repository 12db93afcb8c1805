"""``reuse_freed_memory_mb``: large message buffers come from malloc's heap, not fresh mmaps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from task.core.device import _glibc
from task.run.config import ConfigError, compose_config

ROOT = Path(__file__).resolve().parents[1]
LIBC = _glibc()
pytestmark = pytest.mark.skipif(LIBC is None or not hasattr(LIBC, "mallinfo2"),
                                reason="needs glibc >= 2.33 (mallopt, mallinfo2)")

# Bytes held in mmapped blocks, as glibc's mallinfo2 reports them, around a live 40 MiB bytes.
PROBE = """
import ctypes, sys
from task.core.device import _glibc, reuse_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = _glibc(); libc.mallinfo2.restype = Info
applied = reuse_freed_memory(int(sys.argv[1]))
before = libc.mallinfo2().hblkhd
buffer = b"".join((b"header", bytes(40 << 20)))
print(int(applied), libc.mallinfo2().hblkhd - before)
"""


def mmapped_growth(limit_mb: int) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, str(limit_mb)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    applied, growth = out.stdout.split()
    return bool(int(applied)), int(growth)


def test_large_buffers_come_from_the_heap_only_with_the_setting():
    applied, growth = mmapped_growth(0)  # glibc's defaults: a 40 MiB block is a fresh mmap
    assert not applied and growth >= 40 << 20
    applied, growth = mmapped_growth(1024)
    assert applied and growth == 0


def test_the_key_is_validated():
    assert int(compose_config("").reuse_freed_memory_mb) == 1024
    with pytest.raises(ConfigError, match="reuse_freed_memory_mb"):
        compose_config("reuse_freed_memory_mb=-1")
