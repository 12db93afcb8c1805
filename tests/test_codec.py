"""task.core.params' cached .npy codec: byte for byte what Flower's Array does, and safe on bad data."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from task.core.params import decode, encode


def _arrays():
    rng = np.random.default_rng(0)
    for dtype in (np.float32, np.float64, np.float16, np.int64, np.uint8, np.bool_, np.complex64, ">f4"):
        for shape in ((), (0,), (1,), (5,), (3, 4), (2, 3, 4), (0, 3)):
            a = np.asarray(rng.standard_normal(shape) * 10).astype(dtype)
            yield a
            if a.ndim > 1:
                yield np.asfortranarray(a)
                yield a[..., ::2]


@pytest.mark.parametrize("repeat", [0, 1])  # the second pass goes through the header caches
def test_encode_and_decode_match_numpy_save_and_load(repeat):
    for a in _arrays():
        ref, ours = Array.from_numpy_ndarray(a), encode(a)
        assert (ours.data, ours.dtype, list(ours.shape), ours.stype) == \
            (ref.data, ref.dtype, list(ref.shape), ref.stype)
        got, want = decode(ref), ref.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.writeable
        assert np.array_equal(got, want, equal_nan=True)


def test_decode_refuses_truncated_or_foreign_data():
    ref = Array.from_numpy_ndarray(np.arange(10, dtype=np.float32))
    for bad in (ref.data[:-4], b"xx" + ref.data[2:], ref.data[:8]):
        with pytest.raises(ValueError):
            decode(Array(dtype=ref.dtype, shape=ref.shape, stype=ref.stype, data=bad))
