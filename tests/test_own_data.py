"""dataset=folder and dataset=hf: one's own images (a few 8x8 PNGs written here), their layouts and
splits, and every bad folder or dataset refused with a message naming it (exit 2 at the door)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from task.data.image_folder import main as list_images
from task.data.load import build_federation
from task.data.sources import DataFileError, MissingDataError
from task.run.config import compose_config
from task.run.launch import main

CLASSES = ("cat", "dog", "owl")


def write_images(folder: Path, per_class: int = 4, size: int = 8, mode: str = "L",
                 classes: tuple[str, ...] = CLASSES) -> None:
    """``folder/<class>/<i>.png``: class k's pixels near 80 k, so the label is learnable."""
    rng = np.random.default_rng(len(str(folder)))
    for k, name in enumerate(classes):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (rng.integers(0, 40, (size, size)) + 80 * k).astype(np.uint8)
            Image.fromarray(pixels).convert(mode).save(folder / name / f"{i}.png")


def folder_cfg(path: Path, extra: str = "partition=iid partition.num_clients=2"):
    return compose_config(f"dataset=folder dataset.path={path} {extra}")


def test_a_class_folder_is_split_into_clients_and_a_fixed_stratified_test_set(tmp_path):
    write_images(tmp_path, per_class=5)
    (tmp_path / "README.txt").write_text("not an image, skipped")
    fed = build_federation(folder_cfg(tmp_path))
    assert fed.num_classes == 3 and fed.input_shape == (1, 8, 8) and len(fed.clients) == 2
    assert sum(c.num_train for c in fed.clients) == 12 and sum(c.num_test for c in fed.clients) == 3
    test_labels = torch.cat([c.y_test for c in fed.clients]).sort().values
    assert test_labels.tolist() == [0, 1, 2]  # one of each class's five (20%)
    again = build_federation(folder_cfg(tmp_path, "partition=iid partition.num_clients=2 seed=7"))
    assert torch.equal(torch.cat([c.y_test for c in again.clients]).sort().values, test_labels)


def test_domain_folders_with_train_test_val_make_one_client_per_folder(tmp_path):
    for domain, n in (("hospital_a", 3), ("hospital_b", 2)):
        write_images(tmp_path / "train" / domain, per_class=n)
        write_images(tmp_path / "test" / domain, per_class=1)
        write_images(tmp_path / "val" / domain, per_class=1, classes=CLASSES[:1])
    fed = build_federation(folder_cfg(tmp_path, "partition=domains"))
    assert fed.domain_names == ("hospital_a", "hospital_b")
    a, b = fed.clients
    assert (a.num_train, a.num_val, a.num_test) == (9, 1, 3)
    assert (b.num_train, b.num_val, b.num_test) == (6, 1, 3)
    assert a.domain_name == "hospital_a" and a.y_val.tolist() == [0]


def test_mixed_sizes_and_modes_are_resized_to_image_size_and_made_rgb(tmp_path):
    write_images(tmp_path, size=8)
    write_images(tmp_path, size=12, mode="RGB", classes=("owl",))  # the owls: larger, in colour
    with pytest.raises(DataFileError, match="images of 2 sizes .* set dataset.image_size"):
        build_federation(folder_cfg(tmp_path))
    fed = build_federation(folder_cfg(tmp_path, "partition=iid partition.num_clients=2 dataset.image_size=6"))
    assert fed.input_shape == (3, 6, 6)
    grey = build_federation(folder_cfg(tmp_path, "partition=iid partition.num_clients=1 dataset.image_size=6 "
                                                 "dataset.channels=1"))
    assert grey.input_shape == (1, 6, 6)


def _bad_png(root: Path) -> None:
    write_images(root)
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG not really")


@pytest.mark.parametrize("make,words", [
    (lambda root: None, "no such folder"),
    (lambda root: root.mkdir(), "has no class folders"),
    (lambda root: (write_images(root), (root / "empty").mkdir()), "empty holds no image"),
    (_bad_png, "broken.png is not a readable image"),
    (lambda root: (write_images(root), Image.new("L", (8, 8)).save(root / "stray.png")), "lie directly in"),
    (lambda root: write_images(root / "train"), "has train/ but no test/"),
    (lambda root: write_images(root, classes=("cat",)), "a classifier needs at least 2"),
    (lambda root: (write_images(root), write_images(root / "site" / "x", classes=("cat",))),
     "mixes class folders"),
    (lambda root: (write_images(root / "train"), write_images(root / "test" / "d")), "differ in layout"),
])
def test_a_bad_folder_is_named_with_what_is_wrong(tmp_path, make, words):
    root = tmp_path / "data"
    make(root)
    with pytest.raises((DataFileError, MissingDataError), match=words) as err:
        build_federation(folder_cfg(root))
    assert "\n" not in str(err.value)


def test_pflower_sim_refuses_a_bad_folder_with_exit_2(tmp_path, capsys):
    write_images(tmp_path / "data", classes=("cat",))
    assert main(["--dry-run", f"dataset=folder dataset.path={tmp_path / 'data'} partition=iid"]) == 2
    err = capsys.readouterr().err
    assert "1 class(es) ['cat']; a classifier needs at least 2" in err and "Traceback" not in err


def test_the_index_table_is_the_order_a_partition_file_indexes(tmp_path, capsys):
    write_images(tmp_path / "train", per_class=2)
    write_images(tmp_path / "test", per_class=1)
    assert list_images([str(tmp_path)]) == 0
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines()[1:]]
    train = [r for r in rows if r[0] == "train"]
    assert [r[3] for r in train] == ["cat", "cat", "dog", "dog", "owl", "owl"] and train[2][1] == "2"
    split = tmp_path / "split.json"  # client 0 gets exactly the two dogs and the test owl
    clients = [{"train": [2, 3], "test": [2]}, {"train": [0, 4], "test": [0]}]
    split.write_text(json.dumps({"clients": clients}))
    fed = build_federation(folder_cfg(tmp_path, f"partition=file partition.path={split}"))
    assert fed.clients[0].y_train.tolist() == [1, 1] and fed.clients[0].y_test.tolist() == [2]


# ------------------------------------------------------------------------------------ dataset=hf


def _hf_dataset(rows: int = 12):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    labels = [i % 3 for i in range(rows)]
    images = [Image.fromarray((rng.integers(0, 40, (8, 8)) + 80 * y).astype(np.uint8)) for y in labels]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=list(CLASSES)),
                                  "writer": datasets.Value("string")})
    writers = [f"w{i % 2}" for i in range(rows)]
    return datasets.Dataset.from_dict({"img": images, "fine": labels, "writer": writers}, features=features)


def hf_cfg(path, extra: str = "partition=iid partition.num_clients=2"):
    return compose_config(f"dataset=hf dataset.path={path} {extra}")


def test_a_saved_dataset_dict_loads_offline_with_its_columns_found(tmp_path, monkeypatch):
    import datasets

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    datasets.DatasetDict({"train": _hf_dataset(12), "test": _hf_dataset(6)}).save_to_disk(tmp_path / "saved")
    fed = build_federation(hf_cfg(tmp_path / "saved"))
    assert fed.num_classes == 3 and fed.input_shape == (1, 8, 8)
    assert sum(c.num_train for c in fed.clients) == 12 and sum(c.num_test for c in fed.clients) == 6
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and datasets.config.HF_HUB_OFFLINE


def test_one_split_is_split_here_and_a_domain_column_makes_natural_clients(tmp_path):
    _hf_dataset(12).save_to_disk(tmp_path / "one")
    fed = build_federation(hf_cfg(tmp_path / "one", "partition=domains dataset.domain_column=writer"))
    assert fed.domain_names == ("w0", "w1") and [c.num_train + c.num_test for c in fed.clients] == [6, 6]


def test_a_local_imagefolder_is_read_by_load_dataset(tmp_path):
    write_images(tmp_path / "train", per_class=3)
    write_images(tmp_path / "test", per_class=1)
    fed = build_federation(hf_cfg(tmp_path, "partition=iid partition.num_clients=1"))
    assert fed.num_classes == 3 and fed.clients[0].num_train == 9 and fed.clients[0].num_test == 3


def test_an_unlabelled_test_split_is_refused(tmp_path):
    import datasets

    test = _hf_dataset(3).cast_column("fine", datasets.Value("int64")).map(lambda row: {"fine": -1})
    test = test.cast_column("fine", datasets.ClassLabel(names=list(CLASSES)))
    datasets.DatasetDict({"train": _hf_dataset(6), "test": test}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataFileError, match="label -1 is not one of the 3 classes"):
        build_federation(hf_cfg(tmp_path / "saved"))


@pytest.mark.parametrize("extra,words", [
    ("dataset.label_column=label", "no column 'label' (dataset.label_column); its columns: ['img', 'fine'"),
    ("dataset.image_column=fine", "holds class labels, not images"),
    ("dataset.train_split=training", "no split 'training' (dataset.train_split)"),
])
def test_a_bad_column_or_split_is_named(tmp_path, extra, words):
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(6)}).save_to_disk(tmp_path / "saved")
    with pytest.raises(DataFileError, match=re.escape(words)):
        build_federation(hf_cfg(tmp_path / "saved", f"partition=iid {extra}"))


def test_a_hub_name_not_in_the_cache_says_how_to_save_it_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingDataError, match="local Hugging Face cache does not hold it.*save_to_disk"):
        build_federation(hf_cfg("someone/not-cached-anywhere"))
    with pytest.raises(MissingDataError, match="no such folder"):
        build_federation(hf_cfg("./absent"))


# ------------------------------------------------------------------------- a round, in process


@pytest.mark.slow
def test_a_custom_model_trains_a_round_on_an_image_folder_and_a_saved_dataset(tmp_path):
    from .fake_grid import InProcessRunner
    from .test_own_model import NETS

    (tmp_path / "nets.py").write_text(NETS)
    write_images(tmp_path / "images", per_class=6)
    import datasets

    datasets.DatasetDict({"train": _hf_dataset(12), "test": _hf_dataset(6)}).save_to_disk(tmp_path / "saved")
    runner = InProcessRunner(tmp_path / "runs")
    model = f"model=custom model.target={tmp_path}/nets.py:TinyNet 'model.kwargs={{hidden:8}}'"
    for name, data in (("folder", f"dataset=folder dataset.path={tmp_path / 'images'}"),
                       ("hf", f"dataset=hf dataset.path={tmp_path / 'saved'} dataset.image_size=8")):
        out = runner.run(name, f"{data} {model} partition=iid partition.num_clients=2 strategy=fedper "
                               "num_rounds=1 batch_size=4", num_supernodes=2)
        results = runner.results(out)
        assert results["num_rounds"] == 1, results
        assert sorted(results["per_client_accuracy"]) == ["0", "1"]
        assert 0.0 <= results["final_accuracy"]["mean"] <= 1.0


def test_the_federation_key_follows_the_images_on_disk(tmp_path):
    from task.data.load import federation_key, tree_digest

    write_images(tmp_path)
    before = federation_key(folder_cfg(tmp_path))
    Image.new("L", (8, 8)).save(tmp_path / "cat" / "new.png")
    tree_digest.cache_clear()  # a new process (a node's next run) sees the folder afresh
    assert federation_key(folder_cfg(tmp_path)) != before


def test_pflower_sim_makes_relative_paths_absolute_for_flowers_processes(tmp_path, monkeypatch):
    from task.run.launch import pin_paths

    write_images(tmp_path / "images")
    (tmp_path / "nets.py").write_text("")
    (tmp_path / "split.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    pinned = pin_paths("dataset=folder dataset.path=images model=custom model.target=nets.py:Net "
                       "partition=file partition.path=split.json")
    cfg = compose_config(pinned)
    assert cfg.dataset.path == str(tmp_path / "images") and cfg.partition.path == str(tmp_path / "split.json")
    assert cfg.model.target == f"{tmp_path / 'nets.py'}:Net"
    module = "model=custom model.target=my_pkg.nets:Net"  # a module is imported, not a path
    assert pin_paths(module) == module
