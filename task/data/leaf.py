"""FEMNIST and Shakespeare (LEAF, Caldas et al. 2018) from local files, one owner per sample.

Two layouts (``dataset.layout``), neither downloaded:

- ``leaf``: LEAF's own JSON files, ``<data_root>/<name>/data/train/*.json`` and
  ``<data_root>/<name>/data/test/*.json`` as LEAF's ``preprocess.sh ... -t sample`` writes them
  (so ``data_root`` may be a LEAF checkout's ``data/`` folder). Each file is
  ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}``;
  FEMNIST's x is 784 floats in [0, 1] per sample (a 28x28 image), y a class 0..61;
  Shakespeare's x an 80-character string, y the next character.
- ``hf``: a Hugging Face copy in ``<data_root>/<name>_hf/``: a ``datasets`` Dataset or
  DatasetDict written by ``save_to_disk``, or the Hub's data files (``flwrlabs/femnist``'s
  parquet, ``flwrlabs/shakespeare``'s csv) as ``huggingface-cli download`` leaves them.
  Columns: ``writer_id``, ``image``, ``character`` (FEMNIST); ``character_id``, ``x``, ``y``
  (Shakespeare). Without a ``test`` split, each owner's samples are split into train and test
  (``dataset.test_fraction``, a fixed seed whatever the run's seed, as LEAF's ``-t sample``).

``dataset.max_users`` keeps the first N owners in the order the files list them (null: all);
the train files are read only until N owners are found. Owners without a training or a test
sample are left out (logged). Shakespeare's characters are LEAF's 80-letter alphabet
(``ALPHABET``); a character outside it is refused, naming the owner.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common import log
from omegaconf import DictConfig

from task.data.natural import OwnedSource
from task.data.sources import DataFileError, MissingDataError

# LEAF's Shakespeare alphabet (leaf/models/utils/language_utils.py), in its order.
ALPHABET = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
FEMNIST_CLASSES = 62
FEMNIST_PIXELS = 28 * 28
HF_EXTENSIONS = {"parquet": "parquet", "arrow": "arrow", "csv": "csv", "json": "json", "jsonl": "json"}


@dataclass(frozen=True)
class Spec:
    """A LEAF dataset: its Hugging Face copy's columns and its class count."""

    owner: str
    x: str
    y: str
    classes: int


SPECS = {"femnist": Spec("writer_id", "image", "character", FEMNIST_CLASSES),
         "shakespeare": Spec("character_id", "x", "y", len(ALPHABET))}


@dataclass
class UserData:
    """One owner's raw samples and where they were read."""

    name: str
    origin: str
    xs: list = field(default_factory=list)
    ys: list = field(default_factory=list)


Users = dict[str, UserData]


def load_leaf(dataset: DictConfig) -> OwnedSource:
    """FEMNIST or Shakespeare as an OwnedSource, from the layout ``dataset.layout`` names."""
    name = str(dataset.name)
    root = Path(str(dataset.get("data_root", "data"))).expanduser()
    cap = dataset.get("max_users")
    cap = None if cap is None else int(cap)
    if str(dataset.get("layout", "leaf")) == "hf":
        train, test = read_hf_copy(name, root / f"{name}_hf", cap, float(dataset.get("test_fraction", 0.1)))
    else:
        train, test = read_leaf_json(name, root / name / "data", cap)
    owners = _common_owners(name, train, test, cap)
    encode = encode_femnist if name == "femnist" else encode_shakespeare
    x_tr, y_tr, o_tr = _stack([train[u] for u in owners], encode)
    x_te, y_te, o_te = _stack([test[u] for u in owners], encode)
    log(INFO, "%s: %d owners, %d train / %d test samples", name, len(owners), len(y_tr), len(y_te))
    return OwnedSource(name, x_tr, y_tr, x_te, y_te, SPECS[name].classes,
                       owner_train=o_tr, owner_test=o_te, owner_names=tuple(owners))


def _common_owners(name: str, train: Users, test: Users, cap: int | None) -> list[str]:
    owners = [u for u, d in train.items() if d.ys and u in test and test[u].ys]
    left_out = len(train) - len(owners)
    if left_out:
        log(INFO, "%s: %d of %d owners left out (no training or no test sample)", name, left_out, len(train))
    if not owners:
        where = next(iter(train.values())).origin if train else "the train files"
        raise DataFileError(f"dataset={name}: no owner in {where} has both training and test samples (a LEAF "
                            "split by user, -t user, has disjoint train and test users: use -t sample)")
    return owners[:cap] if cap is not None else owners


def _stack(users: list[UserData], encode) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, owners = [], [], []
    for code, user in enumerate(users):
        x, y = encode(user)
        if xs and x.shape[1:] != xs[0].shape[1:]:
            raise _user_error(user, f"samples of shape {tuple(x.shape[1:])}, where the first user's are "
                                    f"{tuple(xs[0].shape[1:])}")
        xs.append(x)
        ys.append(y)
        owners.append(torch.full((len(y),), code, dtype=torch.int64))
    return torch.cat(xs), torch.cat(ys), torch.cat(owners)


# --------------------------------------------------------------------------- LEAF's JSON


def read_leaf_json(name: str, base: Path, cap: int | None) -> tuple[Users, Users]:
    """The train and test users of LEAF's JSON files in ``base/train`` and ``base/test``."""
    files = {split: sorted((base / split).glob("*.json")) for split in ("train", "test")}
    if not files["train"] or not files["test"]:
        raise MissingDataError(
            f"dataset={name} (dataset.layout=leaf): no LEAF JSON files in "
            f"{' or '.join(str(base / s) for s, f in files.items() if not f)}.\nRun LEAF's "
            f"data/{name}/preprocess.sh with -t sample (github.com/TalwalkarLab/leaf) and copy its "
            f"data/{name}/data/train/*.json to {base / 'train'}/ and test/*.json to {base / 'test'}/ "
            f"(or set dataset.data_root to LEAF's data/ folder), or use dataset.layout=hf with a saved "
            f"Hugging Face copy in {base.parent.parent / (name + '_hf')}/")
    train = _read_users(files["train"], cap, None)
    return train, _read_users(files["test"], None, set(train))


def _read_users(paths: list[Path], cap: int | None, only: set[str] | None) -> Users:
    """Users in file order; stop after the file in which ``cap`` users with samples were found."""
    users: Users = {}
    for path in paths:
        for user, xs, ys in _file_users(path):
            if only is not None and user not in only:
                continue
            entry = users.setdefault(user, UserData(user, str(path)))
            entry.xs.extend(xs)
            entry.ys.extend(ys)
        if cap is not None and sum(bool(d.ys) for d in users.values()) >= cap:
            break
    return users


def _file_users(path: Path) -> list[tuple[str, list, list]]:
    """(user, x, y) of every user of one LEAF file, checked: keys, types, equal lengths."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataFileError(f"{path} cannot be read as LEAF JSON ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("users"), list) \
            or not isinstance(data.get("user_data"), dict):
        raise DataFileError(f"{path}: a LEAF file is an object with a list \"users\" and an object "
                            "\"user_data\" (and \"num_samples\")")
    counts = data.get("num_samples")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(data["users"])):
        raise DataFileError(f"{path}: \"num_samples\" must list one count per user")
    out = []
    for i, user in enumerate(data["users"]):
        entry = data["user_data"].get(str(user))
        if not isinstance(entry, dict) or not isinstance(entry.get("x"), list) \
                or not isinstance(entry.get("y"), list):
            raise DataFileError(f"{path}: user {user!r} has no \"x\" and \"y\" lists in \"user_data\"")
        xs, ys = entry["x"], entry["y"]
        if len(xs) != len(ys) or (counts is not None and counts[i] != len(ys)):
            raise DataFileError(f"{path}: user {user!r} has {len(xs)} x, {len(ys)} y"
                                + (f" and num_samples {counts[i]}" if counts is not None else ""))
        out.append((str(user), xs, ys))
    return out


# --------------------------------------------------------------------------- Hugging Face copy


def read_hf_copy(name: str, folder: Path, cap: int | None, test_fraction: float) -> tuple[Users, Users]:
    """Train and test users of a local Hugging Face copy (``save_to_disk`` or the Hub's files)."""
    spec = SPECS[name]
    splits = _hf_splits(name, folder)
    train = splits["train"] if "train" in splits else next(iter(splits.values()))
    missing = [c for c in (spec.owner, spec.x, spec.y) if c not in train.column_names]
    if missing:
        raise DataFileError(f"{folder}: the {name} copy has columns {train.column_names}, not {missing} "
                            f"(flwrlabs/{name}'s columns: {spec.owner}, {spec.x}, {spec.y})")
    users = _hf_users(train, spec, str(folder), cap)
    if "test" in splits:
        return users, _hf_users(splits["test"], spec, str(folder), None, only=set(users))
    return _split_users(users, test_fraction)


def _hf_splits(name: str, folder: Path) -> dict[str, Any]:
    import datasets

    if not folder.is_dir():
        raise MissingDataError(
            f"dataset={name} (dataset.layout=hf): no folder {folder}.\nSave a copy there with "
            f"datasets' save_to_disk (load_dataset('flwrlabs/{name}').save_to_disk('{folder}') on a "
            f"machine with a network), or put the Hub's data files there (huggingface-cli download "
            f"flwrlabs/{name} --repo-type dataset --local-dir {folder})")
    try:
        if any((folder / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            loaded = datasets.load_from_disk(str(folder))
        else:
            found = {e: sorted(str(p) for p in folder.rglob(f"*.{e}")) for e in HF_EXTENSIONS}
            ext = next((e for e, files in found.items() if files), None)
            if ext is None:
                raise MissingDataError(f"dataset={name} (dataset.layout=hf): {folder} holds neither a "
                                       f"save_to_disk copy nor data files ({', '.join(HF_EXTENSIONS)})")
            loaded = datasets.load_dataset(HF_EXTENSIONS[ext], data_files=found[ext])
    except MissingDataError:
        raise
    except Exception as err:  # noqa: BLE001 - arrow, json, csv and datasets each raise their own
        raise DataFileError(f"{folder} cannot be read as a Hugging Face dataset "
                            f"({type(err).__name__}: {err})") from None
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _hf_users(data: Any, spec: Spec, origin: str, cap: int | None, only: set[str] | None = None) -> Users:
    import pandas as pd

    owners = [str(o) for o in data[spec.owner]]
    codes, names = pd.factorize(pd.Series(owners))  # codes in order of first appearance
    keep = [i for i, n in enumerate(names) if only is None or n in only][:cap]
    columns = data.select_columns([spec.x, spec.y]).with_format("numpy")
    xs, ys = columns[spec.x], columns[spec.y]
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    users: Users = {}
    for code in keep:
        rows = order[bounds[code]:bounds[code + 1]]
        labels = [v.item() if hasattr(v, "item") else v for v in ys[rows]]
        users[str(names[code])] = UserData(str(names[code]), origin, list(xs[rows]), labels)
    return users


def _split_users(users: Users, test_fraction: float) -> tuple[Users, Users]:
    """Each owner's samples in train and test (at least one test sample from two samples on)."""
    rng = np.random.default_rng(0)
    train, test = {}, {}
    for user, d in users.items():
        n = len(d.ys)
        n_test = min(max(1, round(n * test_fraction)), n - 1) if n >= 2 else 0
        is_test = np.zeros(n, dtype=bool)
        is_test[rng.permutation(n)[:n_test]] = True
        train[user] = UserData(user, d.origin, [x for x, t in zip(d.xs, is_test, strict=True) if not t],
                               [y for y, t in zip(d.ys, is_test, strict=True) if not t])
        test[user] = UserData(user, d.origin, [x for x, t in zip(d.xs, is_test, strict=True) if t],
                              [y for y, t in zip(d.ys, is_test, strict=True) if t])
    return train, test


# --------------------------------------------------------------------------- encoding


def _user_error(user: UserData, message: str) -> DataFileError:
    return DataFileError(f"{user.origin}: user {user.name!r}: {message}")


def encode_femnist(user: UserData) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1, 28, 28) float images in [-1, 1] (x / 255 or LEAF's [0, 1] floats) and labels 0..61."""
    try:
        raw = np.asarray(user.xs)
        labels = np.asarray(user.ys, dtype=np.float64)
    except (ValueError, TypeError):
        raise _user_error(user, "a FEMNIST x is 784 numbers (a 28x28 image) and a y one class; found ragged "
                                "or non-numeric samples") from None
    if raw.size != len(user.ys) * FEMNIST_PIXELS or not np.issubdtype(raw.dtype, np.number):
        raise _user_error(user, f"FEMNIST samples of shape {raw.shape[1:]}; each x must be 784 numbers "
                                "(a 28x28 image)")
    x = raw.astype(np.float32) / 255.0 if raw.dtype == np.uint8 else raw.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise _user_error(user, "FEMNIST pixels must be in [0, 1] (LEAF's floats) or uint8")
    if not np.all(labels == np.round(labels)) or labels.min() < 0 or labels.max() >= FEMNIST_CLASSES:
        raise _user_error(user, f"FEMNIST labels must be integers 0..{FEMNIST_CLASSES - 1}")
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28))
    return ((images - 0.5) / 0.5).contiguous(), torch.from_numpy(labels.astype(np.int64))


def _codepoint_table() -> np.ndarray:
    table = np.full(max(map(ord, ALPHABET)) + 1, -1, dtype=np.int64)
    table[[ord(c) for c in ALPHABET]] = np.arange(len(ALPHABET))
    return table


TABLE = _codepoint_table()


def _encode_text(text: str, user: UserData) -> np.ndarray:
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    tokens = np.where(points < len(TABLE), TABLE[np.minimum(points, len(TABLE) - 1)], -1)
    if (tokens < 0).any():
        bad = chr(int(points[np.flatnonzero(tokens < 0)[0]]))
        raise _user_error(user, f"the character {bad!r} is not in LEAF's Shakespeare alphabet "
                                f"({len(ALPHABET)} letters, task/data/leaf.py ALPHABET)")
    return tokens


def encode_shakespeare(user: UserData) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, L) int64 character indices (L: the first line's length, 80 in LEAF) and the next one."""
    if not all(isinstance(s, str) for s in user.xs) or not all(isinstance(c, str) and len(c) == 1
                                                               for c in user.ys):
        raise _user_error(user, "a Shakespeare x is a string and its y one character")
    lengths = {len(s) for s in user.xs}
    if len(lengths) != 1 or 0 in lengths:
        raise _user_error(user, f"Shakespeare lines of lengths {sorted(lengths)[:5]}; every x of a user "
                                "must have the same (non-zero) length, 80 in LEAF")
    x = _encode_text("".join(user.xs), user).reshape(len(user.xs), -1)
    return torch.from_numpy(x), torch.from_numpy(_encode_text("".join(user.ys), user))
