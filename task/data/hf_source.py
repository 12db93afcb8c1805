"""``dataset=hf``: a Hugging Face ``datasets`` dataset from this machine, never from the network.

``dataset.path`` is one of

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``);
- a folder of data files ``datasets.load_dataset`` reads with a packaged builder: an
  ``imagefolder`` (``train/<class>/*.png``...), parquet, arrow, csv or json files;
- a hub name (``ylecun/mnist``) that this machine's Hugging Face cache already holds.

Offline always: ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` are set before anything is read, so a
name the cache lacks is an error naming what to do, not a download. The splits
``dataset.train_split`` and ``dataset.test_split`` are used; without a test split a fixed
stratified ``dataset.test_fraction`` of the training split is. ``dataset.image_column`` and
``dataset.label_column`` (null: the first ``Image`` and ``ClassLabel`` column, else ``image`` /
``label``) name the columns; ``dataset.domain_column`` (optional) gives every sample a domain,
e.g. its writer, so that ``partition=domains`` makes the natural clients.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from task.data.images import Items, make_source, stratified_test
from task.data.sources import DataFileError, MissingDataError, Source


def go_offline() -> None:
    """No request leaves this process: the environment for libraries imported later, and the
    flags of ``datasets`` and ``huggingface_hub`` where they are imported already."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets.config
    import huggingface_hub.constants

    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def open_dataset(path: str) -> Any:
    """The Dataset or DatasetDict ``dataset.path`` names, read offline."""
    go_offline()
    import datasets

    local = Path(path).expanduser()
    where = f"dataset.path={path}"
    try:
        if local.is_dir() and any((local / f).exists() for f in ("dataset_dict.json", "state.json")):
            return datasets.load_from_disk(str(local))
        if local.is_dir():
            return datasets.load_dataset(str(local))
    except Exception as err:  # noqa: BLE001 - datasets raises many kinds for a bad folder
        raise DataFileError(f"{where} cannot be read as a Hugging Face dataset ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); give a save_to_disk folder or "
                            "a folder of image/parquet/csv/json files") from None
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise MissingDataError(f"{where}: no such folder")
    try:
        return datasets.load_dataset(path)
    except Exception:  # noqa: BLE001 - offline: a cache miss is a ConnectionError or a not-found
        raise MissingDataError(
            f"{where} is not a folder here and the local Hugging Face cache does not hold it (nothing is "
            "downloaded): where there is network, run python -c \"import datasets; "
            f"datasets.load_dataset('{path}').save_to_disk('DIR')\" and pass dataset.path=DIR") from None


def _splits(data: Any, train: str, test: str, where: str) -> tuple[Any, Any | None]:
    import datasets

    if isinstance(data, datasets.Dataset):
        return data, None
    if train not in data:
        raise DataFileError(f"{where}: no split {train!r} (dataset.train_split); it has {sorted(data)}")
    return data[train], data.get(test)


def _column(table: Any, wanted: str | None, kind: str, fallback: str, key: str, where: str) -> str:
    import datasets

    columns = list(table.column_names)
    if wanted is None:
        typed = [c for c, f in table.features.items() if type(f).__name__ == kind]
        wanted = typed[0] if typed else fallback
    if wanted not in columns:
        raise DataFileError(f"{where}: no column {wanted!r} ({key}); its columns: {columns}")
    if kind == "Image" and isinstance(table.features[wanted], datasets.ClassLabel):
        raise DataFileError(f"{where}: column {wanted!r} holds class labels, not images; set {key}")
    return wanted


def _label_ids(values: list[list[Any]], feature: Any, where: str) -> tuple[list[np.ndarray], list[str]]:
    """Integer labels of every split and the class names (a ClassLabel's, else the values')."""
    names = getattr(feature, "names", None)
    flat = [v for vs in values for v in vs]
    if any(v is None for v in flat):
        raise DataFileError(f"{where}: the label column has missing values")
    if names is None and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in flat):
        if min(flat) < 0:
            raise DataFileError(f"{where}: negative label {min(flat)}; labels must be 0, 1, ... or names")
        names = [str(c) for c in range(max(flat) + 1)]
        return [np.asarray(vs, dtype=np.int64) for vs in values], names
    if names is None:
        names = sorted({str(v) for v in flat})
        ids = {n: i for i, n in enumerate(names)}
        return [np.asarray([ids[str(v)] for v in vs], dtype=np.int64) for vs in values], names
    ids = [np.asarray(vs, dtype=np.int64) for vs in values]
    bad = [int(v) for a in ids for v in a[(a < 0) | (a >= len(names))][:1]]
    if bad:  # a ClassLabel's -1 is "no label" (some hubs' test splits are unlabelled)
        raise DataFileError(f"{where}: label {bad[0]} is not one of the {len(names)} classes (-1: no label); "
                            "use splits whose every row is labelled (dataset.train_split / test_split)")
    return ids, list(names)


def hf_items(dataset: DictConfig) -> tuple[Items, Items, list[str], list[str]]:
    """(train, test, class names, domain names) of the configured Hugging Face dataset."""
    path = str(dataset.get("path") or "")
    if not path:
        raise MissingDataError("dataset=hf needs dataset.path=<a save_to_disk folder, a data folder, or a "
                               "cached hub name>")
    where = f"dataset.path={path}"
    train, test = _splits(open_dataset(path), str(dataset.train_split), str(dataset.test_split), where)
    image = _column(train, dataset.get("image_column"), "Image", "image", "dataset.image_column", where)
    label = _column(train, dataset.get("label_column"), "ClassLabel", "label", "dataset.label_column", where)
    domain = dataset.get("domain_column")
    if domain is not None:
        _column(train, str(domain), "", str(domain), "dataset.domain_column", where)
    tables = [train] if test is None else [train, test]
    for t in tables[1:]:
        for c in (image, label, domain):
            if c is not None and c not in t.column_names:
                raise DataFileError(f"{where}: the test split has no column {c!r}")
    labels, classes = _label_ids([t[label] for t in tables], train.features[label], where)
    domains, domain_names = None, []
    if domain is not None:
        domain_names = sorted({str(v) for t in tables for v in t[domain]})
        ids = {n: i for i, n in enumerate(domain_names)}
        domains = [np.asarray([ids[str(v)] for v in t[domain]], dtype=np.int64) for t in tables]
    items = [Items([lambda t=t, i=i: t[i][image] for i in range(len(t))],
                   [f"{where} row {i} of its {'train' if k == 0 else 'test'} split" for i in range(len(t))],
                   labels[k], None if domains is None else domains[k]) for k, t in enumerate(tables)]
    if test is None:
        mask = stratified_test(items[0].labels, items[0].domains, float(dataset.test_fraction))
        items = [items[0].take(np.flatnonzero(~mask)), items[0].take(np.flatnonzero(mask))]
    return items[0], items[1], classes, domain_names


def load_hf(dataset: DictConfig) -> Source:
    train, test, classes, domains = hf_items(dataset)
    size, channels = dataset.get("image_size"), dataset.get("channels")
    return make_source("hf", train, test, None, classes, domains, None if size is None else int(size),
                       None if channels is None else int(channels), f"dataset.path={dataset.path}")
