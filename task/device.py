"""Choosing the compute device once per process, and making its arithmetic reproducible."""

from __future__ import annotations

import os
import sys

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
    # with it torch._dynamo: ~2 s of CPU, paid by every message of a deployment, where each
    # message is a fresh process); pflower never compiles, so inductor's own flag is set only
    # where something loaded inductor already.
    torch._C._set_deterministic_algorithms(deterministic, warn_only=deterministic)
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = deterministic
    # With deterministic algorithms on, torch by default also fills every new tensor's memory
    # (NaN) in case a program reads it before writing it; pflower's code never does, and the
    # fill costs a write over every allocation (a 50 MB torch.empty: 0.2 s instead of 2 ms).
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = False


def determinism_enabled() -> bool:
    """Whether this process runs with deterministic algorithms and cuDNN kernels."""
    return torch.are_deterministic_algorithms_enabled() and bool(torch.backends.cudnn.deterministic)
