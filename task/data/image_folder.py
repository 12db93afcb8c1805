"""``dataset=folder``: a folder of images, one subfolder per class (and optionally per domain).

Layouts of ``dataset.path`` (docs/own_data.md), told apart by depth:

    classes:  <path>/<class>/*.png                  the configured partition splits it into clients
    domains:  <path>/<domain>/<class>/*.png         one domain per top folder (a hospital, a camera,
                                                    a writer): partition=domains makes
                                                    partition.clients_per_domain clients of each,
                                                    1 (the default) one client per folder

Either may sit under ``<path>/train/`` and ``<path>/test/`` (and ``<path>/val/``, validation
images of the training side) to give the split; without them a fixed stratified
``dataset.test_fraction`` of every (domain, class) goes to test. Class ids are the sorted class
folder names (all splits, all domains together), domain ids the sorted domain names. Sample
``i`` of the training (test) set is the ``i``-th image in the order (domain, class, path
below the class folder), each sorted by name; ``python -m task.data.image_folder <path>``
prints that table, for writing a ``partition=file`` split by index. Files whose suffix is not
one of a format PIL opens, and names starting with ``.``, are skipped.
"""

from __future__ import annotations

import argparse
import csv
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from task.data.images import Items, make_source, stratified_test
from task.data.sources import DataFileError, MissingDataError, Source

SPLITS = ("train", "test")
VAL_NAMES = ("val", "validation", "valid")
# A split folder: {domain or "": {class: [image paths]}}
Tree = dict[str, dict[str, list[Path]]]


@lru_cache(maxsize=1)
def _image_suffixes() -> tuple[str, ...]:
    """The suffixes of every format PIL can open (.png, .jpg, .bmp, .gif, .tif, .webp, ...)."""
    from PIL import Image

    Image.init()
    common = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")  # named first in messages
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return tuple(e for e in common if e in readable) + tuple(sorted(readable - set(common)))


def _visible(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def _images_below(folder: Path) -> list[Path]:
    suffixes = _image_suffixes()
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.relative_to(folder).as_posix())


def _classes(folder: Path, where: str) -> dict[str, list[Path]]:
    """{class: images} of a folder of class folders, every class folder holding an image."""
    stray = [p.name for p in _visible(folder) if p.is_file() and p.suffix.lower() in _image_suffixes()]
    if stray:
        raise DataFileError(f"{where}: images {stray[:3]} lie directly in {folder}; put each image in a "
                            "folder named by its class")
    classes = {p.name: _images_below(p) for p in _visible(folder) if p.is_dir()}
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataFileError(f"{where}: class folder {folder / empty[0]} holds no image "
                            f"({', '.join(_image_suffixes()[:5])}, ...); add images or remove it")
    return classes


def read_tree(folder: Path, where: str) -> Tree:
    """A split folder as {domain: {class: images}}; the classes layout has the one domain ""."""
    subdirs = [p for p in _visible(folder) if p.is_dir()]
    if not subdirs:
        raise DataFileError(f"{where}: {folder} has no class folders; expected {folder}/<class>/*.png "
                            f"or {folder}/<domain>/<class>/*.png")
    deep = [p for p in subdirs if any(q.is_dir() for q in _visible(p))]
    flat = [p for p in subdirs if p not in deep]
    if deep and flat:
        raise DataFileError(f"{where}: {folder} mixes class folders of images ({flat[0].name}) with "
                            f"folders of folders ({deep[0].name}); use <class>/*.png or "
                            "<domain>/<class>/*.png throughout")
    if not deep:
        return {"": _classes(folder, where)}
    return {p.name: _classes(p, where) for p in deep}


def read_layout(root: Path) -> tuple[Tree, Tree | None, Tree | None]:
    """(train, test or None, val or None) trees of ``dataset.path``."""
    where = f"dataset.path={root}"
    if not root.is_dir():
        raise MissingDataError(f"{where}: {'not a folder' if root.exists() else 'no such folder'}")
    names = {p.name for p in _visible(root) if p.is_dir()}
    if "train" not in names and "test" not in names:
        return read_tree(root, where), None, None
    missing = [s for s in SPLITS if s not in names]
    if missing:
        raise DataFileError(f"{where} has {'train' if missing == ['test'] else 'test'}/ but no "
                            f"{missing[0]}/; add it, or put the class folders directly in {root}")
    val = [v for v in VAL_NAMES if v in names]
    extra = sorted(names - set(SPLITS) - set(val[:1]))
    if extra:
        raise DataFileError(f"{where}: beside train/ and test/ it holds {extra}; move them into a split "
                            "folder or out of the dataset")
    trees = [read_tree(root / s, f"{where} ({s}/)") for s in (*SPLITS, *val[:1])]
    return trees[0], trees[1], trees[2] if val else None


def _items(tree: Tree, domain_ids: dict[str, int], class_ids: dict[str, int], root: Path) -> Items:
    paths, labels, domains = [], [], []
    for domain in sorted(tree):
        for name in sorted(tree[domain]):
            for path in tree[domain][name]:
                paths.append(path)
                labels.append(class_ids[name])
                domains.append(domain_ids.get(domain, 0))
    return Items([lambda p=p: p for p in paths], [str(p) for p in paths], np.asarray(labels, dtype=np.int64),
                 np.asarray(domains, dtype=np.int64))


def _check_domains(train: Tree, others: list[Tree], root: Path) -> None:
    layouts = {"" in t for t in (train, *others)}
    if len(layouts) > 1:
        raise DataFileError(f"dataset.path={root}: train/ and test/ differ in layout (one holds class "
                            "folders, the other domain folders of class folders); use the same in both")
    for tree in others:
        unknown = sorted(set(tree) - set(train))
        if unknown:
            raise DataFileError(f"dataset.path={root}: domain(s) {unknown} have test or validation images "
                                "but no train/ folder of their own")


def folder_items(root: Path, test_fraction: float) -> tuple[Items, Items, Items | None, list[str], list[str]]:
    """(train, test, val or None, class names, domain names) of the folder, in the documented order."""
    train, test, val = read_layout(root)
    others = [t for t in (test, val) if t is not None]
    _check_domains(train, others, root)
    classes = sorted({c for t in (train, *others) for d in t.values() for c in d})
    domain_names = [] if "" in train else sorted(train)
    class_ids = {c: i for i, c in enumerate(classes)}
    domain_ids = {d: i for i, d in enumerate(domain_names)}
    train_items = _items(train, domain_ids, class_ids, root)
    if test is None:
        mask = stratified_test(train_items.labels, train_items.domains if domain_names else None,
                               test_fraction)
        test_items = train_items.take(np.flatnonzero(mask))
        train_items = train_items.take(np.flatnonzero(~mask))
    else:
        test_items = _items(test, domain_ids, class_ids, root)
    val_items = None if val is None else _items(val, domain_ids, class_ids, root)
    return train_items, test_items, val_items, classes, domain_names


def load_folder(dataset: DictConfig) -> Source:
    """The image folder ``dataset.path`` as a Source (domains where it has domain folders)."""
    if not str(dataset.get("path") or ""):
        raise MissingDataError("dataset=folder needs dataset.path=<a folder of class folders of images>")
    root = Path(str(dataset.path)).expanduser()
    train, test, val, classes, domains = folder_items(root, float(dataset.test_fraction))
    if not domains:
        for split in (train, test, val):
            if split is not None:
                split.domains = None
    size = dataset.get("image_size")
    channels = dataset.get("channels")
    return make_source("folder", train, test, val, classes, domains, None if size is None else int(size),
                       None if channels is None else int(channels), f"dataset.path={root}")


def main(argv: list[str] | None = None) -> int:
    """Print every image's split, index, domain, class and file as CSV (for partition=file)."""
    parser = argparse.ArgumentParser(prog="python -m task.data.image_folder", description=main.__doc__)
    parser.add_argument("path")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="as dataset.test_fraction")
    args = parser.parse_args(argv)
    try:
        train, test, val, classes, domains = folder_items(Path(args.path).expanduser(), args.test_fraction)
    except (DataFileError, MissingDataError) as err:
        print(err, file=sys.stderr)
        return 2
    out = csv.writer(sys.stdout)
    out.writerow(["split", "index", "domain", "class", "label", "file"])
    # validation images follow the training images in the training set's indices
    for split, items, start in (("train", train, 0), ("val", val, len(train)), ("test", test, 0)):
        for i in range(len(items) if items is not None else 0):
            domain = domains[int(items.domains[i])] if domains else ""
            label = int(items.labels[i])
            out.writerow([split, start + i, domain, classes[label], label, items.names[i]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
