"""Read a dataset's pickle without executing anything it names.

``pickle.load`` imports and calls whatever a file names (``__reduce__``): a planted
``digits5`` pickle, or a CIFAR batch swapped in the data root, would run its command in the
door and in every ClientApp. ``load`` admits only what a data file needs: plain containers
(tuple, list, dict, str, bytes, numbers: built by the pickle machine itself, no import) and
numpy arrays, dtypes and scalars (the handful of numpy functions that rebuild them). Any
other name in the file is refused before it is imported, with a ``pickle.UnpicklingError``
that names it; the caller names the file.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

# (module, name) pairs a numpy array, dtype or scalar pickles through, in numpy 1.x
# (``numpy.core``) and 2.x (``numpy._core``). None of them runs code of the file's choosing:
# they rebuild an array or a dtype from bytes.
_NUMPY = {"multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer"}
ALLOWED = {(f"numpy.{core}.{m}", n) for core in ("core", "_core") for m, n in
           (name.rsplit(".", 1) for name in _NUMPY)} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                          # protocol 2 spells bytes as str + encode
                                                          ("_codecs", "encode")}


class _Restricted(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, which a data file has no need of (only numpy arrays and plain "
            "containers are read; nothing in the file was run)")


def loads(data: bytes, encoding: str = "ASCII") -> Any:
    """``pickle.loads`` restricted to numpy arrays and plain containers (see the module docstring)."""
    return _Restricted(io.BytesIO(data), encoding=encoding).load()


def load(path: Path, encoding: str = "ASCII") -> Any:
    """A pickle file, or a ``.npy`` file holding an object array (what ``np.save`` of a tuple of
    arrays writes), read with the restricted unpickler."""
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            f.seek(0)
            version = np.lib.format.read_magic(f)
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            _, _, dtype = read_header(f)
            if dtype.hasobject:  # the rest of the file is a pickle of the array
                return _Restricted(f, encoding=encoding).load()
            f.seek(0)
            return np.load(f, allow_pickle=False)
        f.seek(0)
        return _Restricted(f, encoding=encoding).load()
