"""State-dict arithmetic and conversion to and from Flower's ArrayRecord."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

StateDict = dict[str, torch.Tensor]


def to_record(state: StateDict) -> ArrayRecord:
    """A state dict as an ArrayRecord (numpy-serialised, never pickled)."""
    return ArrayRecord({k: encode(v.detach().cpu().numpy()) for k, v in state.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> StateDict:
    """An ArrayRecord as a state dict of tensors on ``device``."""
    return {k: torch.from_numpy(decode(a)).to(device) for k, a in record.items()}


# .npy headers seen before: (dtype str, shape) -> header bytes, and header bytes -> parsed form.
# A model's arrays have the same few headers every round; numpy builds and parses each one
# with Python code (``repr``, ``ast.literal_eval``) that costs more than copying the data.
_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}
_PARSED: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}
_CACHE_LIMIT = 4096


def encode(array: np.ndarray) -> Array:
    """``Array.from_numpy_ndarray(array)``, byte for byte, with the .npy header cached."""
    plain = (array.flags.c_contiguous and not array.dtype.hasobject
             and array.dtype.fields is None and array.dtype.subdtype is None)
    key = (array.dtype.str, tuple(array.shape))
    header = _HEADERS.get(key) if plain else None
    if header is None:
        out = Array.from_numpy_ndarray(array)  # np.save
        if plain and len(_HEADERS) < _CACHE_LIMIT:
            _HEADERS[key] = out.data[:len(out.data) - array.nbytes]
        return out
    return Array(dtype=str(array.dtype), shape=tuple(array.shape), stype=SType.NUMPY,
                 data=b"".join((header, array.data)))


def decode(array: Array) -> np.ndarray:
    """``array.numpy()`` (np.load, never unpickling) as a writable array, header parse cached.

    Anything but a plain .npy of version 1 or 2 with all its data goes to ``array.numpy()``,
    which raises numpy's own errors.
    """
    data = array.data
    if array.stype != SType.NUMPY or data[:6] != b"\x93NUMPY" or data[6] not in (1, 2):
        return array.numpy()
    start = 10 if data[6] == 1 else 12
    end = start + int.from_bytes(data[8:start], "little")
    key = bytes(data[6:end])
    parsed = _PARSED.get(key)
    if parsed is None:
        fp = BytesIO(data[:end])
        version = np.lib.format.read_magic(fp)
        read = np.lib.format.read_array_header_1_0 if version[0] == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fp)
        if dtype.hasobject:
            return array.numpy()  # refuses: no pickles
        parsed = (dtype, tuple(shape), bool(fortran))
        if len(_PARSED) < _CACHE_LIMIT:
            _PARSED[key] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if len(data) - end < count * dtype.itemsize:
        return array.numpy()  # truncated: numpy's error
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=end) if count else np.empty(0, dtype)
    values = flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)
    return values.copy(order="K")


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


def damped_step(start: StateDict, target: StateDict, rate: float) -> StateDict:
    """(1 - rate) start + rate target on floating entries (rate > 1 extrapolates); integer
    entries take ``target``'s. PFML's beta step and FedCLUP's lam * eta_g step."""
    out = {}
    for k, s in start.items():
        t = target[k].to(s.device)
        out[k] = ((1.0 - rate) * s + rate * t.to(s.dtype)) if s.is_floating_point() else t.clone()
    return out


def subtract(a: StateDict, b: StateDict) -> StateDict:
    """a - b entry-wise (floating entries; integer entries are kept from a)."""
    return {k: (a[k] - b[k]) if a[k].is_floating_point() else a[k].clone() for k in a}


def num_bytes(state: StateDict) -> int:
    """Bytes of the raw tensor data in a state dict."""
    return sum(v.numel() * v.element_size() for v in state.values())
