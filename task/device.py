"""Choosing the compute device once per process."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """Map the config's ``device`` (auto|cpu|cuda) to a torch device.

    ``auto`` takes CUDA when present; ``cuda`` without a GPU is an error, not a silent fallback.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA device")
    return torch.device(name)
