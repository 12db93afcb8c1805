"""State-dict arithmetic and conversion to and from Flower's ArrayRecord."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from flwr.app import ArrayRecord
from torch import nn

StateDict = dict[str, torch.Tensor]


def to_record(state: StateDict) -> ArrayRecord:
    """A state dict as an ArrayRecord (numpy-serialised, never pickled)."""
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> StateDict:
    """An ArrayRecord as a state dict of tensors on ``device``."""
    return {k: v.to(device) for k, v in record.to_torch_state_dict().items()}


def model_state(model: nn.Module, keys: Iterable[str] | None = None) -> StateDict:
    """A detached copy of the model's state (optionally only ``keys``)."""
    state = model.state_dict()
    names = state.keys() if keys is None else keys
    return {k: state[k].detach().clone() for k in names}


def load_partial(model: nn.Module, state: StateDict) -> None:
    """Copy ``state`` into the model's matching entries; the others stay as they are."""
    own = model.state_dict()
    unknown = set(state) - set(own)
    if unknown:
        raise KeyError(f"keys not in the model: {sorted(unknown)[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_j p_j w_j with p_j = weights_j / sum(weights); integer entries take the maximum."""
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state with positive weight")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for s, w in zip(states, weights, strict=True):
                acc += s[key].to(torch.float64) * (w / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([s[key] for s in states]).max(0).values
    return out


def subtract(a: StateDict, b: StateDict) -> StateDict:
    """a - b entry-wise (floating entries; integer entries are kept from a)."""
    return {k: (a[k] - b[k]) if a[k].is_floating_point() else a[k].clone() for k in a}


def num_bytes(state: StateDict) -> int:
    """Bytes of the raw tensor data in a state dict."""
    return sum(v.numel() * v.element_size() for v in state.values())
