"""Per-process settings: the compute device, reproducible arithmetic, and malloc's reuse of
freed memory for message buffers."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Any

import torch

# cuBLAS' workspace setting for reproducible matrix products (NVIDIA's cuBLAS docs, "Results
# reproducibility"): 8 buffers of 4 MiB. cuBLAS reads it when torch creates its first handle.
CUBLAS_WORKSPACE = ":4096:8"


def resolve_device(name: str) -> torch.device:
    """Map the config's ``device`` (auto|cpu|cuda) to a torch device.

    ``auto`` takes CUDA when present; ``cuda`` without a GPU is an error, not a silent fallback.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    return torch.device(name)


def apply_determinism(deterministic: bool) -> None:
    """Set this process's torch to the config's ``deterministic`` (docs/gpu.md).

    True: deterministic algorithms (``torch.use_deterministic_algorithms``), cuDNN's
    deterministic kernels without benchmark autotuning, and ``CUBLAS_WORKSPACE_CONFIG`` (kept
    if the environment already sets it). The same seed then gives the same numbers on every
    run on the same device, so a resumed run equals an uninterrupted one on a GPU too.
    ``warn_only``: an operation with no deterministic CUDA kernel (e.g. the backward of
    ``AdaptiveAvgPool2d`` in ``resnet18_gn``) warns once, naming itself, instead of ending the
    run. New tensors are not filled (``fill_uninitialized_memory``, below). False: torch's
    own defaults (non-deterministic kernels allowed, no autotuning).

    Called by every process that trains or aggregates, before anything touches CUDA: the
    environment variable only counts if set before cuBLAS starts. On the CPU every setting is
    a no-op for the operations pflower uses: CPU runs are reproducible either way.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    # What torch.use_deterministic_algorithms does, without its import of torch._inductor (and
    # with it torch._dynamo: ~2 s of CPU, paid by every message of a deployment in Flower's
    # default isolation, where each message is a fresh process); pflower never compiles, so
    # inductor's own flag is set only where something loaded inductor already, and only where it
    # has one: torch 2.9's inductor has none (setting it raises AttributeError), nor does its
    # use_deterministic_algorithms set it.
    torch._C._set_deterministic_algorithms(deterministic, warn_only=deterministic)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None and hasattr(inductor, "deterministic"):
        inductor.deterministic = deterministic
    # With deterministic algorithms on, torch by default also fills every new tensor's memory
    # (NaN) in case a program reads it before writing it; pflower's code never does, and the
    # fill costs a write over every allocation (a 50 MB torch.empty: 0.2 s instead of 2 ms).
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def configure_process(cfg: Any) -> None:
    """The config's per-process settings: ``deterministic`` and ``reuse_freed_memory_mb``.
    Every process that trains or aggregates calls it first, before anything touches CUDA."""
    apply_determinism(bool(cfg.deterministic))
    reuse_freed_memory(int(cfg.get("reuse_freed_memory_mb", 0)))


def determinism_enabled() -> bool:
    """Whether this process runs with deterministic algorithms and cuDNN kernels."""
    return torch.are_deterministic_algorithms_enabled() and bool(torch.backends.cudnn.deterministic)


# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest automatic threshold on 64-bit Linux
_REUSE_APPLIED: int | None = None


def reuse_freed_memory(limit_mb: int) -> bool:
    """Let glibc's malloc serve blocks up to ``limit_mb`` MiB from memory freed before, and
    keep up to that much freed memory instead of returning it to the OS (docs/gpu.md).

    Why: every message holds its arrays in a fresh ``bytes`` (Flower's ``Array.data``), one
    per model layer and message. glibc maps any block above its threshold (at most 32 MiB)
    freshly from the kernel and unmaps it on free, so each large layer's buffer pays for the
    kernel to map and zero new pages: 16.9 ms of CPU for a 51 MiB layer of ``digit_cnn``,
    5.8 ms when the freed memory of the previous message is reused (``bench/buffers.py``).
    The cost: the process's resident memory stays near its peak rather than falling back
    after a round (glibc returns the top of its heap to the OS only past ``limit_mb`` free).
    0, or a platform without glibc, keeps malloc's defaults (a setting made earlier in the
    process stays). Returns whether the setting is in effect.
    """
    global _REUSE_APPLIED
    if limit_mb <= 0:
        return False
    if limit_mb == _REUSE_APPLIED:
        return True
    libc = _glibc()
    if libc is None:
        return False
    limit = int(limit_mb) << 20
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, max(limit, GLIBC_MMAP_THRESHOLD_MAX))
              and libc.mallopt(M_TRIM_THRESHOLD, limit))
    _REUSE_APPLIED = limit_mb if ok else None
    return ok


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (``mallopt`` and its parameters are glibc's)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):  # musl (Alpine) has neither
        return None
    return libc
