"""Tiny-ImageNet (200 classes of 64x64 RGB images) from its own folder layout; never downloaded.

``<data_root>/tiny-imagenet-200/``, as ``tiny-imagenet-200.zip`` unpacks::

    wnids.txt                       the classes' WordNet ids, one a line (class k: line k)
    train/<wnid>/images/*.JPEG      the training images of each class (500 each)
    val/images/*.JPEG               the validation images (10,000)
    val/val_annotations.txt         one line per validation image: file, wnid, box (tab-separated)

The labelled validation set is the test set (``test/`` has no labels); the configured
partition splits both among the clients like any other source's. Keys: ``image_size`` (every
image resized to it; 64 keeps them as they are) and ``train_per_class`` (null: every training
image; N: the first N of each class in file-name order, for a smaller run). Grey JPEGs (a few
hundred in the set) are read as RGB.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
import torch
from flwr.common import log
from omegaconf import DictConfig

from task.data.sources import DataFileError, MissingDataError, Source, to_float_images

FOLDER = "tiny-imagenet-200"
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def load_tiny_imagenet(dataset: DictConfig) -> Source:
    """Train and validation (as test) images of Tiny-ImageNet, labels by ``wnids.txt``'s order."""
    base = Path(str(dataset.get("data_root", "data"))).expanduser() / FOLDER
    wnids = read_wnids(base)
    per_class = dataset.get("train_per_class")
    train = [(p, k) for k, w in enumerate(wnids) for p in _class_images(base, w)[:per_class]]
    test = read_val_annotations(base, {w: k for k, w in enumerate(wnids)})
    size = int(dataset.get("image_size", 64))
    x_tr, x_te = _decode([p for p, _ in train], size), _decode([p for p, _ in test], size)
    log(INFO, "tiny_imagenet: %d classes, %d train / %d test images at %dx%d", len(wnids), len(train),
        len(test), size, size)
    return Source("tiny_imagenet", to_float_images(x_tr), torch.tensor([k for _, k in train]),
                  to_float_images(x_te), torch.tensor([k for _, k in test]), len(wnids))


def _missing(base: Path, what: str) -> MissingDataError:
    return MissingDataError(
        f"dataset=tiny_imagenet: {what}.\nUnpack tiny-imagenet-200.zip (cs231n.stanford.edu/"
        f"tiny-imagenet-200.zip) in {base.parent} so that {base} holds wnids.txt, "
        "train/<wnid>/images/*.JPEG, val/images/*.JPEG and val/val_annotations.txt (or set "
        "dataset.data_root to the folder that holds tiny-imagenet-200/)")


def read_wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    if not path.is_file():
        raise _missing(base, f"no {path}")
    wnids = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DataFileError(f"{path}: one distinct class id a line; found {len(wnids)} lines, "
                            f"{len(set(wnids))} distinct")
    return wnids


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _class_images(base: Path, wnid: str) -> list[Path]:
    folder = base / "train" / wnid / "images"
    if not folder.is_dir():
        raise _missing(base, f"no folder {folder} for class {wnid} of wnids.txt")
    images = _images_in(folder)
    if not images:
        raise DataFileError(f"{folder}: no images (.JPEG, .jpg, .png) for class {wnid}")
    return images


def read_val_annotations(base: Path, classes: dict[str, int]) -> list[tuple[Path, int]]:
    """The validation images and their classes, in val_annotations.txt's order."""
    path = base / "val" / "val_annotations.txt"
    if not path.is_file():
        raise _missing(base, f"no {path}")
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DataFileError(f"{path}:{number}: expected <file>\\t<wnid>\\t<box>, got {line[:80]!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in classes:
            raise DataFileError(f"{path}:{number}: class {wnid!r} is not in wnids.txt")
        image = base / "val" / "images" / name
        if not image.is_file():
            raise DataFileError(f"{path}:{number}: the image {image} is missing")
        out.append((image, classes[wnid]))
    if not out:
        raise DataFileError(f"{path}: no annotated validation image")
    return out


def _decode(paths: list[Path], size: int) -> np.ndarray:
    """uint8 (N, 3, size, size): each file decoded as RGB by Pillow, resized (antialiased) where
    it is not size x size."""
    from PIL import Image, UnidentifiedImageError

    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise DataFileError(f"{path} cannot be decoded as an image ({type(err).__name__}: "
                                f"{str(err).strip()[:120]}); replace it") from None
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(rgb).transpose(2, 0, 1)
    return out
