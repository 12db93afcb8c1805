"""FEMNIST and Shakespeare split by owner, and Tiny-ImageNet, from tiny files in their real
formats (tests/natural_files.py), through the real loaders, the door and one in-process round."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from task.core.models import build_model
from task.data.leaf import ALPHABET
from task.data.load import build_federation
from task.data.sources import DataFileError, MissingDataError
from task.run.config import ConfigError, compose_config
from task.run.launch import main

from .natural_files import (
    femnist_samples,
    leaf_file,
    lines,
    write_femnist_hf,
    write_femnist_leaf,
    write_shakespeare_leaf,
    write_tiny_imagenet,
)

WRITERS = {"f0003_11": (6, 2), "f0001_40": (4, 1), "f0002_07": (5, 2)}
LSTM = "model=char_lstm model.embedding=4 model.hidden=8 model.layers=1"


def fed(overrides: str):
    return build_federation(compose_config(overrides))


def test_femnist_leaf_one_client_per_writer_in_file_order(tmp_path):
    write_femnist_leaf(tmp_path, WRITERS)
    f = fed(f"dataset=femnist dataset.data_root={tmp_path} partition=natural model=cnn")
    assert f.num_classes == 62 and f.input_shape == (1, 28, 28) and len(f.clients) == 3
    assert [(c.num_train, c.num_test) for c in f.clients] == list(WRITERS.values())
    first = f.clients[0]
    assert first.x_train.dtype == torch.float32 and float(first.x_train[:, 0, 0, 0].min()) == 1.0
    assert float(first.x_train.min()) >= -1.0 and first.y_train.tolist() == [0, 1, 2, 3, 4, 5]
    assert f.clients[1].y_train.tolist() == [1, 2, 3, 4]  # the second writer's own labels


def test_femnist_max_users_stops_reading_the_train_files(tmp_path):
    base = write_femnist_leaf(tmp_path, WRITERS, files=3)
    (base / "train" / "all_data_2_niid_0_keep_0_train_9.json").write_text("{not json")
    f = fed(f"dataset=femnist dataset.data_root={tmp_path} dataset.max_users=2 partition=natural")
    assert [c.num_train for c in f.clients] == [6, 4]  # the third file is never opened
    with pytest.raises(DataFileError, match="train_9.json cannot be read as LEAF JSON"):
        fed(f"dataset=femnist dataset.data_root={tmp_path} partition=natural")


def test_femnist_hf_copy_split_per_writer(tmp_path):
    write_femnist_hf(tmp_path, {"w_b": 10, "w_a": 20, "lonely": 1})
    f = fed(f"dataset=femnist dataset.layout=hf dataset.data_root={tmp_path} partition=natural")
    # a writer with one sample has no test sample: left out; the others in first-appearance order
    assert sorted((c.num_train, c.num_test) for c in f.clients) == [(9, 1), (18, 2)]
    x = torch.cat([c.x_train for c in f.clients])
    assert x.shape[1:] == (1, 28, 28) and float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    again = fed(f"dataset=femnist dataset.layout=hf dataset.data_root={tmp_path} partition=natural seed=5")
    assert torch.equal(again.clients[0].x_test, f.clients[0].x_test)  # the split ignores the run's seed


def test_shakespeare_tokens_and_the_char_lstm(tmp_path):
    write_shakespeare_leaf(tmp_path, {"HAMLET": (7, 2), "OPHELIA": (3, 1)})
    f = fed(f"dataset=shakespeare dataset.data_root={tmp_path} partition=natural {LSTM}")
    assert f.num_classes == len(ALPHABET) == 80 and f.input_shape == (80,)
    c = f.clients[0]
    assert c.x_train.dtype == torch.int64 and c.x_train.shape == (7, 80) and c.y_train.shape == (7,)
    assert int(c.x_train.max()) < 80 and int(c.x_train.min()) >= 0
    model = build_model(OmegaConf.create({"name": "char_lstm", "embedding": 8, "hidden": 256, "layers": 2}),
                        f.input_shape, f.num_classes)
    assert model(c.x_train[:2]).shape == (2, 80)
    assert sum(p.numel() for p in model.parameters()) == 80 * 8 + 4 * 256 * (8 + 256 + 2) \
        + 4 * 256 * (256 + 256 + 2) + 257 * 80  # LEAF's: embedding 8, LSTM 256 x 2, fc


@pytest.mark.parametrize(("extra", "message"), [
    ("model=cnn", "model=cnn takes images and the dataset gives token sequences of length 80: "
                  "use model=char_lstm"),
    (f"partition=rotation partition.num_clients=2 partition.num_clusters=2 {LSTM}",
     "partition=rotation turns images"),
    ("partition=domains " + LSTM, "use natural"),
])
def test_the_door_refuses_what_cannot_work_on_text(tmp_path, capsys, extra, message):
    write_shakespeare_leaf(tmp_path, {"HAMLET": (7, 2), "OPHELIA": (3, 1)})
    base = f"dataset=shakespeare dataset.data_root={tmp_path} partition=natural"
    assert main(["--dry-run", *f"{base} {extra}".split()]) == 2
    assert message in capsys.readouterr().err


def test_a_token_model_on_images_is_refused(tmp_path, capsys):
    write_femnist_leaf(tmp_path, WRITERS)
    assert main(["--dry-run", f"dataset.data_root={tmp_path}", "dataset=femnist", "partition=natural",
                 "model=char_lstm"]) == 2
    assert "model=char_lstm takes token sequences and the dataset gives images" in capsys.readouterr().err


def test_tiny_imagenet_folder_layout(tmp_path):
    write_tiny_imagenet(tmp_path, ["n02", "n01", "n03"], train=4, val=2)
    base = f"dataset=tiny_imagenet dataset.data_root={tmp_path} partition=iid partition.num_clients=2"
    f = fed(base)
    assert f.num_classes == 3 and f.input_shape == (3, 64, 64)
    y = torch.cat([c.y_train for c in f.clients])
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4 and sum(c.num_test for c in f.clients) == 6
    small = fed(f"{base} dataset.image_size=16 dataset.train_per_class=2")
    x = torch.cat([c.x_train for c in small.clients])
    assert x.shape == (6, 3, 16, 16)
    # class k's images are grey level 40k (+ noise): labels follow wnids.txt's order, not the names'
    means = {int(k): float(x[torch.cat([c.y_train for c in small.clients]) == k].mean()) for k in range(3)}
    assert means[0] < means[1] < means[2]


# --------------------------------------------------------------------------- hostile files


def _femnist_file(tmp_path, users) -> str:
    base = tmp_path / "femnist" / "data"
    leaf_file(base / "train" / "t.json", users)
    leaf_file(base / "test" / "t.json", {u: femnist_samples(1) for u in users})
    return f"dataset=femnist dataset.data_root={tmp_path} partition=natural"


def test_hostile_leaf_files_are_named(tmp_path):
    x, y = femnist_samples(3)
    cases = {
        "ragged x": ({"w": ([*x[:2], x[2][:783]], y)}, "user 'w': a FEMNIST x is 784 numbers"),
        "short rows": ({"w": ([r[:700] for r in x], y)}, "each x must be 784 numbers"),
        "x and y differ": ({"w": (x, y[:2])}, "user 'w' has 3 x, 2 y"),
        "pixels": ({"w": ([[v * 255 for v in r] for r in x], y)}, r"pixels must be in \[0, 1\]"),
        "labels": ({"w": (x, [0, 1, 62])}, "labels must be integers 0..61"),
        "every user empty": ({"w": ([], []), "v": ([], [])}, "no owner in .* has both training and test"),
    }
    for name, (users, message) in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        with pytest.raises(DataFileError, match=message):
            fed(_femnist_file(folder, users))


def test_an_empty_user_is_left_out_and_missing_keys_are_named(tmp_path, caplog):
    f = fed(_femnist_file(tmp_path / "a", {"w": femnist_samples(2), "empty": ([], [])}))
    assert len(f.clients) == 1
    base = tmp_path / "b" / "femnist" / "data"
    for split in ("train", "test"):
        (base / split).mkdir(parents=True)
        (base / split / "t.json").write_text(json.dumps({"users": ["w"], "num_samples": [1]}))
    with pytest.raises(DataFileError, match="a list \"users\" and an object \"user_data\""):
        fed(f"dataset=femnist dataset.data_root={tmp_path / 'b'} partition=natural")
    wrong_user = {"users": ["w"], "user_data": {"v": {"x": [], "y": []}}}
    (base / "train" / "t.json").write_text(json.dumps(wrong_user))
    with pytest.raises(DataFileError, match="user 'w' has no \"x\" and \"y\" lists"):
        fed(f"dataset=femnist dataset.data_root={tmp_path / 'b'} partition=natural")


def test_hostile_shakespeare_lines_are_named(tmp_path):
    x, y = lines(3)
    for name, users, message in [
        ("ragged", {"R": ([x[0], x[1][:79], x[2]], y)}, r"lines of lengths \[79, 80\]"),
        ("unknown", {"R": ([x[0], x[1][:79] + "é", x[2]], y)}, "'é' is not in LEAF's Shakespeare alphabet"),
        ("two", {"R": (x, [y[0], "ab", y[2]])}, "its y one character"),
    ]:
        base = tmp_path / name / "shakespeare" / "data"
        leaf_file(base / "train" / "t.json", users)
        leaf_file(base / "test" / "t.json", {"R": lines(1)})
        with pytest.raises(DataFileError, match=f"user 'R': .*{message}"):
            fed(f"dataset=shakespeare dataset.data_root={tmp_path / name} partition=natural {LSTM}")


def test_hostile_tiny_imagenet_files_are_named(tmp_path):
    base = write_tiny_imagenet(tmp_path, ["n01", "n02"], train=2, val=1, size=8)
    overrides = f"dataset=tiny_imagenet dataset.data_root={tmp_path} partition=iid partition.num_clients=2"
    (base / "train" / "n01" / "images" / "n01_1.JPEG").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataFileError, match="n01_1.JPEG cannot be decoded"):
        fed(overrides)
    (base / "train" / "n01" / "images" / "n01_1.JPEG").unlink()
    (base / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\t0\t0\t7\t7\n")
    with pytest.raises(DataFileError, match=r"val_annotations.txt:1: class 'n09' is not in wnids.txt"):
        fed(overrides)
    (base / "wnids.txt").write_text("n01\nn02\nn03\n")
    with pytest.raises(MissingDataError, match="no folder .*n03/images for class n03"):
        fed(overrides)


@pytest.mark.parametrize(("dataset", "where"), [
    ("femnist", "femnist/data/train"),
    ("femnist dataset.layout=hf", "femnist_hf"),
    ("shakespeare model=char_lstm", "shakespeare/data/train"),
    ("tiny_imagenet partition=iid", "tiny-imagenet-200/wnids.txt"),
])
def test_a_missing_folder_is_a_door_error_saying_where_to_put_what(tmp_path, capsys, dataset, where):
    partition = "" if "partition=" in dataset else "partition=natural"
    overrides = f"dataset={dataset} dataset.data_root={tmp_path / 'none'} {partition}"
    assert main(["--dry-run", *overrides.split()]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "none" / where) in err and ("Put" in err or "Unpack" in err or "Run LEAF" in err
                                                      or "Save a copy" in err)


def test_bad_keys_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"dataset.layout='zip': expected one of \['leaf', 'hf'\]"):
        compose_config("dataset=femnist dataset.layout=zip")
    with pytest.raises(ConfigError, match="dataset.max_users=0"):
        compose_config("dataset=shakespeare dataset.max_users=0")


def test_natural_on_a_dataset_without_owners_is_refused():
    with pytest.raises(ValueError, match="partition=natural needs a dataset whose samples have owners"):
        fed("dataset=mnist5k partition=natural model=mlp")


# --------------------------------------------------------------------------- one round each


@pytest.mark.slow
@pytest.mark.parametrize(("name", "overrides"), [
    ("femnist", "dataset=femnist partition=natural model=mlp model.hidden=16 strategy=fedavg"),
    ("shakespeare", f"dataset=shakespeare partition=natural {LSTM} strategy=fedper"),
    ("tiny", "dataset=tiny_imagenet dataset.image_size=16 partition=iid partition.num_clients=3 model=cnn "
             "strategy=fedavg"),
])
def test_one_round_in_process(tmp_path, name, overrides):
    from .fake_grid import InProcessRunner

    write_femnist_leaf(tmp_path, WRITERS)
    write_shakespeare_leaf(tmp_path, {"HAMLET": (12, 3), "OPHELIA": (8, 2), "HORATIO": (6, 2)})
    write_tiny_imagenet(tmp_path, ["n01", "n02", "n03"], train=4, val=2, size=16)
    runner = InProcessRunner(tmp_path / "runs")
    out = runner.run(name, f"{overrides} dataset.data_root={tmp_path} num_rounds=1", num_supernodes=3)
    results = runner.results(out)
    accuracy = results["last_evaluated_round"]["personalized_accuracy"]
    assert 0.0 <= accuracy["mean"] <= 1.0 and np.isfinite(accuracy["mean"])
    assert json.loads((out / "partition.json").read_text())["num_clients"] == 3


def test_apfl_mixes_in_the_weights_dtype_on_token_inputs():
    """APFL's mixing weight took the inputs' dtype: on int64 tokens it became an integer (and
    every ClientApp failed). Every other method ran two rounds on Shakespeare as they are."""
    from strategies.apfl import apfl_step

    torch.manual_seed(0)
    cfg = OmegaConf.create({"name": "char_lstm", "embedding": 4, "hidden": 8, "layers": 1})
    w, v = (build_model(cfg, (80,), 80) for _ in range(2))
    x, y = torch.randint(0, 80, (4, 80)), torch.randint(0, 80, (4,))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (w, v)]
    _, loss_v, alpha = apfl_step(w, v, 0.5, x, y, *opts, alpha_lr=0.1)
    assert np.isfinite(loss_v) and 0.0 <= alpha <= 1.0 and alpha != 0.5


def test_shakespeare_from_the_hubs_data_files_and_hostile_copies(tmp_path):
    """The Hub's copy as files (flwrlabs/shakespeare is one csv: character_id, x, y), read
    offline; a copy with other columns, and an empty folder, are named."""
    import pandas as pd

    x, y = lines(9)
    folder = tmp_path / "shakespeare_hf"
    folder.mkdir()
    pd.DataFrame({"character_id": ["ROMEO"] * 6 + ["JULIET"] * 3, "x": x, "y": y}).to_csv(
        folder / "shakespeare.csv", index=False)
    f = fed(f"dataset=shakespeare dataset.layout=hf dataset.data_root={tmp_path} partition=natural {LSTM}")
    assert [(c.num_train, c.num_test) for c in f.clients] == [(5, 1), (2, 1)]
    assert f.clients[0].x_train.shape == (5, 80)
    renamed = pd.DataFrame({"speaker": ["ROMEO"], "x": x[:1], "y": y[:1]})
    renamed.to_csv(folder / "shakespeare.csv", index=False)
    with pytest.raises(DataFileError, match=r"not \['character_id'\]"):
        fed(f"dataset=shakespeare dataset.layout=hf dataset.data_root={tmp_path} partition=natural {LSTM}")
    (folder / "shakespeare.csv").unlink()
    with pytest.raises(MissingDataError, match="holds neither a save_to_disk copy nor data files"):
        fed(f"dataset=shakespeare dataset.layout=hf dataset.data_root={tmp_path} partition=natural {LSTM}")
