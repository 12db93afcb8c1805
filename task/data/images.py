"""Images of one's own as a :class:`~task.data.sources.Source`: decoded by PIL, one size, one mode.

Shared by ``dataset=folder`` (task/data/image_folder.py) and ``dataset=hf``
(task/data/hf_source.py). Every image is converted to grey (``L``) or RGB and, where
``dataset.image_size`` is set, resized to ``image_size`` x ``image_size`` (bilinear, as
torchvision's ``Resize``); with ``image_size=null`` the images must all have one size, kept.
``dataset.channels=null`` picks RGB when any image is in colour, else grey.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.common import log

from task.data.sources import DataFileError, Source, to_float_images, to_labels

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
# One image: a way to open it (a file path or a value of a dataset column) and what to call it.
Opener = Callable[[], Any]


@dataclass
class Items:
    """One split's images (openers and names), int labels and optional domain ids."""

    openers: list[Opener]
    names: list[str]
    labels: np.ndarray
    domains: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.openers)

    def take(self, idx: np.ndarray) -> Items:
        pick = idx.tolist()
        return Items([self.openers[i] for i in pick], [self.names[i] for i in pick], self.labels[idx],
                     None if self.domains is None else self.domains[idx])


def as_pil(value: Any, name: str, load: bool = True) -> Any:
    """A PIL image from a PIL image, an array (H, W[, C]) or a path; ``load=False`` reads only
    the header of a file (its mode and size)."""
    from PIL import Image, UnidentifiedImageError

    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, np.ndarray | list):
            array = np.asarray(value)
            if array.dtype != np.uint8:  # floats in [0, 1] are scaled, anything else clipped
                array = array * 255.0 if array.dtype.kind == "f" and array.max(initial=0) <= 1.0 else array
                array = np.clip(array, 0, 255).astype(np.uint8)
            image = Image.fromarray(array)
        else:
            image = Image.open(value)
        if load:
            image.load()
        return image
    except (OSError, ValueError, TypeError, UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise DataFileError(f"{name} is not a readable image ({type(err).__name__}: {err}); remove or "
                            "replace it") from None


def probe(value: Any, name: str) -> tuple[str, tuple[int, int]]:
    """An image's mode and (height, width), from a file's header only (the file closed again:
    a folder of 10,000 images must not hold 10,000 open files)."""
    image = as_pil(value, name, load=False)
    mode, size = image.mode, (image.height, image.width)
    if image is not value:
        image.close()
    return mode, size


def split_sizes(sizes: set[tuple[int, int]], image_size: int | None, where: str) -> tuple[int, int]:
    """The (height, width) every image gets."""
    if image_size is not None:
        if len(sizes) > 1:
            log(INFO, "%s: images of %d sizes, each resized to %dx%d", where, len(sizes), image_size,
                image_size)
        return image_size, image_size
    if len(sizes) > 1:
        shown = sorted(sizes)[:4]
        raise DataFileError(f"{where}: images of {len(sizes)} sizes (height, width), e.g. {shown}: set "
                            "dataset.image_size=<pixels> to resize every image to one square size")
    return next(iter(sizes))


def decode(splits: Sequence[Items], image_size: int | None, channels: int | None, where: str
           ) -> list[torch.Tensor]:
    """Every split's images as float (N, C, H, W) in [-1, 1], one mode and one size for all."""
    from PIL import Image

    headers = [probe(o(), n) for s in splits for o, n in zip(s.openers, s.names, strict=True)]
    if channels is None:
        channels = 1 if all(m in GREY_MODES for m, _ in headers) else 3
    if channels not in (1, 3):
        raise DataFileError(f"dataset.channels={channels}: use 1 (grey), 3 (RGB) or null (RGB if any "
                            "image is)")
    height, width = split_sizes({size for _, size in headers}, image_size, where)
    mode = "L" if channels == 1 else "RGB"
    out = []
    for split in splits:
        arrays = np.zeros((len(split), height, width, channels), dtype=np.uint8)
        for i, (opener, name) in enumerate(zip(split.openers, split.names, strict=True)):
            img = as_pil(opener(), name).convert(mode)
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            arrays[i] = np.asarray(img).reshape(height, width, channels)
        out.append(to_float_images(arrays, channels_last=True))
    return out


def stratified_test(labels: np.ndarray, domains: np.ndarray | None, fraction: float) -> np.ndarray:
    """A fixed (seed 0, whatever the run's seed) test mask: ``fraction`` of every (domain, class)
    group of two or more images, at least one each, so every run scores on the same images."""
    keys = labels if domains is None else domains * (int(labels.max(initial=0)) + 1) + labels
    rng = np.random.default_rng(0)
    test = np.zeros(len(labels), dtype=bool)
    for key in np.unique(keys):
        idx = np.flatnonzero(keys == key)
        if len(idx) > 1:
            test[rng.permutation(idx)[: min(len(idx) - 1, max(1, round(len(idx) * fraction)))]] = True
    return test


def make_source(name: str, train: Items, test: Items, val: Items | None, classes: Sequence[str],
                domain_names: Sequence[str], image_size: int | None, channels: int | None, where: str
                ) -> Source:
    """The Source of decoded splits; ``val`` (the data's own validation images) joins the training
    set behind a ``val_train`` mask, as digits5's validation share does."""
    if len(classes) < 2:
        raise DataFileError(f"{where}: {len(classes)} class(es) {list(classes)}; a classifier needs at "
                            "least 2")
    if len(train) == 0:
        raise DataFileError(f"{where}: no training images")
    if len(test) == 0:
        raise DataFileError(f"{where}: no test images (dataset.test_fraction takes them only from a class "
                            "with 2 or more images; give more, or train/ and test/ folders)")
    splits = [train, test] + ([val] if val is not None and len(val) else [])
    x = decode(splits, image_size, channels, where)
    x_train, y_train, d_train = x[0], train.labels, train.domains
    val_mask = None
    if len(splits) == 3:
        x_train = torch.cat([x[0], x[2]])
        y_train = np.concatenate([train.labels, val.labels])
        if d_train is not None:
            d_train = np.concatenate([train.domains, val.domains])
        val_mask = torch.cat([torch.zeros(len(train), dtype=torch.bool),
                              torch.ones(len(val), dtype=torch.bool)])
    domains = None if d_train is None else (torch.as_tensor(d_train), torch.as_tensor(test.domains))
    log(INFO, "%s: %d training (%d for validation), %d test images, %d classes, %s", where, len(y_train),
        0 if val_mask is None else int(val_mask.sum()), len(test), len(classes), tuple(x_train.shape[1:]))
    return Source(name, x_train, to_labels(y_train), x[1], to_labels(test.labels), len(classes),
                  domains[0] if domains else None, domains[1] if domains else None,
                  tuple(domain_names) if domains else (), val_train=val_mask)
