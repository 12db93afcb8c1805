"""State-dict arithmetic and conversion to and from Flower's ArrayRecord.

The data path moves every byte the fewest times it can (docs/gpu.md):

- ``to_record``: each tensor is copied once, into its message buffer (on CUDA: all of a state
  dict's tensors to pinned host memory in one batch, then into the buffers); an upload made
  by ``message_state`` is already there and is not copied again;
- ``from_record``: arrays are read in place from the message's bytes (no copy on the CPU; on
  CUDA one host-to-device copy, made once per process for a record several clients receive);
- ``weighted_mean``: one pass over every upload, in slices that keep the float64 sums in cache.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from torch import nn

StateDict = dict[str, torch.Tensor]


def to_record(state: StateDict) -> ArrayRecord:
    """A state dict as an ArrayRecord (numpy-serialised, never pickled), one copy per tensor;
    none for a tensor of ``message_state``, which already lives in its message buffer."""
    arrays = {k: a for k, a in ((k, _own_array(v)) for k, v in state.items()) if a is not None}
    tensors = {k: v.detach() for k, v in state.items() if k not in arrays}
    if any(v.device.type == "cuda" for v in tensors.values()):
        tensors = _to_pinned_host(tensors)
    # .cpu() returns a CPU tensor itself (no copy); another device's tensor makes its one copy.
    arrays.update((k, encode(v.cpu().numpy())) for k, v in tensors.items())
    return ArrayRecord({k: arrays[k] for k in state})


# A tensor of ``message_state`` carries its message Array and where its values start.
_MESSAGE_ARRAY = "_pflower_message_array"


def message_state(state: StateDict) -> StateDict:
    """A copy of ``state`` made straight into message buffers: each tensor is a read-only view
    of the ``Array`` that ``to_record`` then puts in a message as it is (no second copy).

    For what a client uploads: a model's weights need a copy of their own (the model trains
    again), and a message needs one; this is both. The tensors are on the CPU and read-only
    by contract, as those of ``from_record``.
    """
    out = {}
    for key, array in to_record(state).items():
        values = view(array)
        out[key] = tensor = as_tensor(values)
        if not values.flags.writeable:  # a view of the message's bytes, not a copy of them
            setattr(tensor, _MESSAGE_ARRAY, (array, tensor.data_ptr()))
    return out


def _own_array(tensor: torch.Tensor) -> Array | None:
    """The message Array a ``message_state`` tensor views, if it still views all of it."""
    tag = getattr(tensor, _MESSAGE_ARRAY, None)
    if tag is None:
        return None
    array, start = tag
    same = (tensor.data_ptr() == start and tuple(tensor.shape) == tuple(array.shape)
            and tensor.is_contiguous() and str(tensor.numpy().dtype) == array.dtype)
    return array if same else None


def _to_pinned_host(tensors: StateDict) -> StateDict:
    """Device tensors copied to pinned host memory, all queued before one synchronisation."""
    host = {}
    for k, v in tensors.items():
        if v.device.type == "cuda":
            host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            host[k].copy_(v, non_blocking=True)
        else:
            host[k] = v
    torch.cuda.synchronize()
    return host


# The last records moved to a device: (the record's data objects, device) -> tensors there.
# Several clients served by one process get the same record in a round (the global model);
# it crosses to the device once. Keeping the data objects keeps their ids unique.
_ON_DEVICE: OrderedDict[tuple, tuple[list[bytes], StateDict]] = OrderedDict()
_ON_DEVICE_LIMIT = 2


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> StateDict:
    """An ArrayRecord as a state dict of tensors on ``device``.

    On the CPU the tensors are views of the record's bytes, not copies: read them, or copy
    them (``load_partial``), but never write to them. On another device they are one copy
    there, shared by every call with the same record (same contract: read-only).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return {k: view_tensor(a) for k, a in record.items()}
    data = [a.data for a in record.values()]
    key = (tuple(id(d) for d in data), str(device))
    if key in _ON_DEVICE:
        _ON_DEVICE.move_to_end(key)
        return dict(_ON_DEVICE[key][1])
    state = {k: view_tensor(a).to(device, non_blocking=True) for k, a in record.items()}
    _ON_DEVICE[key] = (data, state)
    while len(_ON_DEVICE) > _ON_DEVICE_LIMIT:
        _ON_DEVICE.popitem(last=False)
    return dict(state)


def view_tensor(array: Array) -> torch.Tensor:
    """``array`` as a CPU tensor reading the message's bytes in place (see ``view``)."""
    return as_tensor(view(array))


def as_tensor(values: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy``, also for a read-only array (a view of a message's bytes): the
    tensor shares its memory and is read-only by contract (torch cannot mark it so)."""
    if values.flags.writeable:
        return torch.from_numpy(values)
    with warnings.catch_warnings():  # torch's warning that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values)


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
    """``array.numpy()`` (np.load, never unpickling) as a writable array of its own."""
    values = view(array)
    return values if values.flags.writeable else values.copy(order="K")


def view(array: Array) -> np.ndarray:
    """``array.numpy()``'s values read in place from the message's bytes (read-only, no copy),
    the .npy header's parse cached.

    Anything but a plain .npy of version 1 or 2 with all its data goes to ``array.numpy()``
    (a writable copy), which raises numpy's own errors.
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
    return flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)


def all_finite(values: torch.Tensor) -> bool:
    """Whether every value is finite, reading the values once.

    A sum with a NaN or an infinity in it is not finite, so a finite sum proves them all
    finite; only a sum that is not (a bad value, or finite values overflowing) is checked
    value by value.
    """
    if not values.is_floating_point() or values.numel() == 0:
        return True
    return math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())


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


# Values per slice of ``weighted_mean``'s float64 sum: the sum and its addend (2 x 256 KiB)
# stay in a core's L2 cache while every upload's slice is added.
_SLICE = 1 << 15
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def weighted_mean(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """sum_j p_j w_j with p_j = weights_j / sum(weights); integer entries take the maximum.

    Floating entries are summed in float64, in the order given (p_j w_j added to 0.0 one
    upload after another), then rounded to their dtype. On the CPU this runs slice by slice
    (``_sliced_mean``), reading each upload once, with the same numbers to the last bit.
    """
    total = float(sum(weights))
    if not states or total <= 0:
        raise ValueError("weighted_mean needs at least one state with positive weight")
    coefs = [w / total for w in weights]
    out = {}
    for key, first in states[0].items():
        values = [s[key] for s in states]
        if not first.is_floating_point():
            out[key] = torch.stack(values).max(0).values
        elif all(v.device.type == "cpu" and v.dtype == first.dtype for v in values) \
                and first.dtype in _NUMPY_FLOATS:
            out[key] = _sliced_mean(values, coefs)
        else:
            acc = torch.zeros_like(first, dtype=torch.float64)
            for v, c in zip(values, coefs, strict=True):
                acc += v.to(torch.float64) * c
            out[key] = acc.to(first.dtype)
    return out


def _sliced_mean(values: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """sum_j coefs_j values_j in float64, rounded to the values' dtype, one cache-sized slice
    at a time: per element exactly ``acc = 0.0; acc += float64(v_j) * c_j`` in order."""
    first = values[0]
    flat = [v.reshape(-1).numpy() for v in values]  # views where contiguous
    out = torch.empty(first.shape, dtype=first.dtype)
    dest = out.view(-1)
    n = dest.numel()
    acc = np.empty(min(n, _SLICE), np.float64)
    addend = np.empty_like(acc)
    for start in range(0, n, _SLICE):
        stop = min(start + _SLICE, n)
        a, t = acc[:stop - start], addend[:stop - start]
        a.fill(0.0)
        for v, c in zip(flat, coefs, strict=True):
            np.multiply(v[start:stop], c, out=t, dtype=np.float64)
            np.add(a, t, out=a)
        dest[start:stop].copy_(torch.from_numpy(a))  # torch's float64 -> dtype rounding, as .to()
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
