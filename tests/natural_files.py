"""Tiny files in the real on-disk formats of FEMNIST and Shakespeare (LEAF's JSON, a saved
Hugging Face copy) and Tiny-ImageNet (its folder layout), for the tests of task/data/leaf.py
and task/data/tiny_imagenet.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from task.data.leaf import ALPHABET

RNG = np.random.default_rng(0)


def leaf_file(path: Path, users: dict[str, tuple[list, list]]) -> Path:
    """One LEAF JSON file: users in the given order, with their x and y lists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"users": list(users), "num_samples": [len(y) for _, y in users.values()],
            "user_data": {u: {"x": x, "y": y} for u, (x, y) in users.items()}}
    path.write_text(json.dumps(data))
    return path


def femnist_samples(n: int, label_shift: int = 0) -> tuple[list, list]:
    """n FEMNIST samples: 784 floats in [0, 1] each (LEAF's), labels 0..61."""
    x = RNG.random((n, 784)).round(3)
    x[:, 0] = 1.0
    return x.tolist(), [int((i + label_shift) % 62) for i in range(n)]


def write_femnist_leaf(root: Path, sizes: dict[str, tuple[int, int]], files: int = 1) -> Path:
    """LEAF's layout under root/femnist/data/{train,test}: writer -> (train, test) sample counts,
    the writers spread in order over ``files`` train files (and as many test files)."""
    base = root / "femnist" / "data"
    names = list(sizes)
    for f in range(files):
        chunk = names[f::files] if files > 1 else names
        leaf_file(base / "train" / f"all_data_{f}_niid_0_keep_0_train_9.json",
                  {u: femnist_samples(sizes[u][0], i) for i, u in enumerate(chunk)})
        leaf_file(base / "test" / f"all_data_{f}_niid_0_keep_0_test_9.json",
                  {u: femnist_samples(sizes[u][1], i) for i, u in enumerate(chunk)})
    return base


def lines(n: int, length: int = 80) -> tuple[list, list]:
    """n Shakespeare samples: ``length``-character strings of LEAF's alphabet and the next one."""
    text = "".join(RNG.choice(list(ALPHABET[:60]), size=n + length))
    return [text[i:i + length] for i in range(n)], [text[i + length] for i in range(n)]


def write_shakespeare_leaf(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    base = root / "shakespeare" / "data"
    leaf_file(base / "train" / "all_data_0_train_9.json", {u: lines(n) for u, (n, _) in sizes.items()})
    leaf_file(base / "test" / "all_data_0_test_9.json", {u: lines(n) for u, (_, n) in sizes.items()})
    return base


def write_femnist_hf(root: Path, sizes: dict[str, int]) -> Path:
    """flwrlabs/femnist's columns (writer_id, image, hsf_id, character), save_to_disk'd in
    root/femnist_hf, one train split; the writers' rows interleaved as the Hub's are not."""
    from datasets import ClassLabel, Dataset, Features, Image, Value
    from PIL import Image as PILImage

    writers = [w for w, n in sizes.items() for _ in range(n)]
    order = RNG.permutation(len(writers))
    features = Features({"image": Image(), "writer_id": Value("string"), "hsf_id": Value("int64"),
                         "character": ClassLabel(num_classes=62)})
    images = [PILImage.fromarray(RNG.integers(0, 256, (28, 28), dtype=np.uint8), mode="L") for _ in writers]
    data = Dataset.from_dict({"image": [images[i] for i in order], "writer_id": [writers[i] for i in order],
                              "hsf_id": [0] * len(writers), "character": [int(i % 62) for i in order]},
                             features=features)
    data.save_to_disk(str(root / "femnist_hf"))
    return root / "femnist_hf"


def write_tiny_imagenet(root: Path, wnids: list[str], train: int, val: int, size: int = 64) -> Path:
    """tiny-imagenet-200's layout: wnids.txt, train/<wnid>/images/*.JPEG (with the boxes file
    the real set has), val/images/*.JPEG and val/val_annotations.txt; one JPEG is grey."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    annotations = []
    for k, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for i in range(train):
            pixels = np.full((size, size, 3), 40 * k, dtype=np.uint8) + RNG.integers(0, 30, (size, size, 3),
                                                                                    dtype=np.uint8)
            image = Image.fromarray(pixels)
            (image.convert("L") if (k, i) == (0, 0) else image).save(folder / f"{wnid}_{i}.JPEG")
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(val):
            name = f"val_{k * val + i}.JPEG"
            grey = np.full((size, size, 3), 40 * k, dtype=np.uint8)
            Image.fromarray(grey).save(base / "val" / "images" / name)
            annotations.append(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return base
