"""The input normalisation of a source's images, selectable per dataset (``dataset.normalize``).

Sources load images mapped from [0, 255] to [-1, 1] (``symmetric``: mean 0.5, std 0.5 per
channel, as FedBN's digits code). The authors' scripts of the seed papers differ:

- ``symmetric``: (x / 255 - 0.5) / 0.5, in [-1, 1] (the default);
- ``unit``: x / 255, in [0, 1] (``transforms.ToTensor()`` alone);
- ``standard``: (x / 255 - mean_c) / std_c with the per-channel mean and standard deviation of
  the source's training images, computed (on MNIST's 60,000 training images they are the
  0.1307 and 0.3081 that the usual ``transforms.Normalize`` carries; every dataset gets its own).
"""

from __future__ import annotations

import dataclasses

import torch

from task.data.sources import Source

MODES = ("symmetric", "unit", "standard")


def normalized(source: Source, mode: str) -> Source:
    """``source`` with its images in the ``mode`` normalisation (the same object for ``symmetric``)."""
    if mode == "symmetric":
        return source
    if mode not in MODES:
        raise ValueError(f"dataset.normalize={mode!r} is not one of {list(MODES)}")
    train, test = (source.x_train + 1) / 2, (source.x_test + 1) / 2  # back to x / 255
    if mode == "standard":
        mean, std = channel_stats(train)
        train, test = (train - mean) / std, (test - mean) / std
    return dataclasses.replace(source, x_train=train.contiguous(), x_test=test.contiguous())


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of (N, C, H, W) images, shaped to
    broadcast over them; a constant channel gets std 1."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).to(torch.float64)
    mean, std = flat.mean(1), flat.std(1, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    shape = (1, -1, 1, 1)
    return mean.view(shape).to(images.dtype), std.view(shape).to(images.dtype)
