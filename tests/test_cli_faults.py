"""The launcher as a user runs it: every bad input is refused at the door with a message that
names the problem (exit 2), before Flower starts; one output folder never holds two runs."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import server_app
from task.run.launch import join_overrides, main
from task.run.outputs import RunOutputs
from task.run.runfolder import LOCK, RunFolder, RunFolderError, check_free, read_status, release_dead_lock

from .fake_grid import FakeGrid
from .helpers import TINY


def refused(capsys, *args: str) -> str:
    """Run ``pflower-sim --dry-run args`` in-process; assert exit 2; return its message."""
    assert main(["--dry-run", *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused(capsys, value):
    err = refused(capsys, TINY, f"lr={value}")
    assert f"lr={value}" in err and "expected finite float" in err


def test_a_model_that_does_not_fit_the_data_is_refused_before_start_up(capsys):
    err = refused(capsys, "model=lenet5", "dataset.image_size=8", "dataset.domains=[plain]")
    assert "model=lenet5 does not fit dataset=digits" in err and "(3, 8, 8)" in err


def test_a_strategy_key_typo_lists_that_strategys_keys(capsys):
    err = refused(capsys, "strategy=ditto", "strategy.lamb=0.5")
    assert "unknown key strategy.lamb for strategy=ditto; its keys: lam, personal_epochs" in err


def test_quoted_overrides_are_split_and_a_value_with_spaces_stays_whole(capsys, tmp_path):
    assert join_overrides(["num_rounds=3 lr=0.1", "seed=1"]) == "num_rounds=3 lr=0.1 seed=1"
    assert join_overrides([f"output_dir={tmp_path}/my runs"]) == f"'output_dir={tmp_path}/my runs'"
    assert main(["--dry-run", f"{TINY} num_rounds=3 lr=0.1"]) == 0
    assert "num_rounds=3 lr=0.1" in capsys.readouterr().out


def _pickle(path: Path, images, labels) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((images, labels), f)


def _digits5(root: Path, images, labels) -> list[str]:
    _pickle(root / "digits5" / "USPS" / "train_stratified.pkl", images, labels)
    _pickle(root / "digits5" / "USPS" / "test_stratified.pkl", np.zeros((4, 16, 16), np.uint8), np.arange(4))
    return ["dataset=digits5", f"dataset.data_root={root}", "dataset.domains=[USPS]"]


@pytest.mark.parametrize(("images", "labels", "expected"), [
    (np.zeros((200, 16, 16), np.uint8), np.arange(150) % 10, "200 images but 150 labels"),
    (np.zeros((20, 16, 16), np.uint8), np.arange(20) % 10 + 5, "labels must be integers 0..9"),
    (np.zeros((20, 16), np.uint8), np.arange(20) % 10, "images of shape (20, 16)"),
])
def test_malformed_digits5_pickles_are_named(capsys, tmp_path, images, labels, expected):
    err = refused(capsys, *_digits5(tmp_path, images, labels))
    assert expected in err and "train_stratified.pkl" in err


def test_a_truncated_pickle_is_named(capsys, tmp_path):
    args = _digits5(tmp_path, np.zeros((20, 16, 16), np.uint8), np.arange(20) % 10)
    path = tmp_path / "digits5" / "USPS" / "train_stratified.pkl"
    path.write_bytes(path.read_bytes()[:100])
    assert str(path) in refused(capsys, *args)


def test_a_truncated_gz_file_is_named(capsys, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(gzip.compress(b"\x00" * 4000)[:30])
    err = refused(capsys, "dataset=mnist", f"dataset.data_root={tmp_path}", "dataset.download=false",
                  "partition=iid")
    assert "-idx3-ubyte.gz cannot be unpacked" in err and "truncated" in err


def test_a_missing_dataset_is_a_message_naming_the_files(capsys, tmp_path):
    err = refused(capsys, "dataset=cifar10", f"dataset.data_root={tmp_path}", "dataset.download=false",
                  "partition=iid")
    assert "cifar-10-batches-py" in err and "data_batch_1" in err


def test_a_folder_holding_a_run_is_refused_unless_resumed(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    err = refused(capsys, TINY, f"output_dir={tmp_path}")
    assert "already holds files (metrics.jsonl)" in err and f"resume={tmp_path}" in err


def test_a_locked_folder_names_its_holder_and_a_dead_holders_lock_is_stale(capsys, tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.claim(resume=False)
    assert read_status(folder.dir)["status"] == "running"
    with pytest.raises(RunFolderError, match=f"locked by a run in progress: process {os.getpid()}"):
        check_free(folder.dir, resume=True)
    assert f"process {os.getpid()}" in refused(capsys, TINY, f"resume={folder.dir}")
    folder.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (folder.dir / LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead), "since": "x"}))
    assert release_dead_lock(folder.dir) and not (folder.dir / LOCK).exists()
    assert read_status(folder.dir)["status"] == "stopped"


def _server_run(overrides: str) -> None:
    server_app.main(FakeGrid(4, overrides), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                    run_config={"overrides": overrides}))


def test_resume_faults_are_refused_with_their_reason(capsys, tmp_path):
    assert "no such folder" in refused(capsys, TINY, f"resume={tmp_path / 'nowhere'}")
    run = f"{TINY} strategy=fedavg num_rounds=1 output_dir={tmp_path / 'r'}"
    _server_run(run)
    assert read_status(tmp_path / "r")["status"] == "completed" and not (tmp_path / "r" / LOCK).exists()
    assert main(["--dry-run", run, f"resume={tmp_path / 'r'}", "num_rounds=2"]) == 0
    err = refused(capsys, run, "lr=0.5", f"resume={tmp_path / 'r'}")
    assert "differs from the saved run's in ['lr']" in err
    checkpoint = tmp_path / "r" / "checkpoint.npz"
    checkpoint.write_bytes(checkpoint.read_bytes()[:-200])
    assert f"checkpoint {checkpoint} cannot be read" in refused(capsys, run, f"resume={tmp_path / 'r'}")


def test_resuming_per_client_state_kept_only_in_memory_is_refused(capsys, tmp_path):
    memory = f"{TINY} strategy=ditto num_rounds=1 output_dir={tmp_path / 'm'}"
    _server_run(memory)
    assert "keeps per-client state" in refused(capsys, memory, f"resume={tmp_path / 'm'}")
    disk = f"{TINY} strategy=ditto num_rounds=1 output_dir={tmp_path / 'd'} client_state_dir={tmp_path / 's'}"
    _server_run(disk)
    assert main(["--dry-run", disk, f"resume={tmp_path / 'd'}", "num_rounds=2"]) == 0


def test_a_new_run_into_a_used_folder_fails_without_touching_it(tmp_path):
    run = f"{TINY} strategy=fedavg num_rounds=1 output_dir={tmp_path / 'r'}"
    _server_run(run)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").iterdir()}
    with pytest.raises(RunFolderError, match="one run per folder"):
        _server_run(run)  # as `flwr run` started by hand would: the ServerApp checks too
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "r").iterdir()} == before


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_torn_middle_line_named(tmp_path):
    outputs = RunOutputs(tmp_path)
    outputs.metrics_path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    outputs.truncate_rounds(2)
    assert outputs.rounds() == [{"round": 1}, {"round": 2}]
    outputs.metrics_path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not a JSON row"):
        outputs.rounds()


def test_the_launcher_as_a_user_runs_it_exits_2_with_the_message_last(tmp_path):
    proc = subprocess.run(["pflower-sim", "strategy=ditto", "strategy.lamb=0.5"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("pflower-sim: unknown key strategy.lamb")
    assert "Traceback" not in proc.stderr
