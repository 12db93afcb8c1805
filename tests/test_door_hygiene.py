"""Issue 24: inputs that used to run silently wrong, run code, or fail late now stop at the door
(exit 2, one sentence naming the problem) before Flower starts."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from task.run.launch import main

from .helpers import TINY
from .test_cli_faults import _digits5, _server_run, refused


class _Payload:
    """What an attacker plants: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_digits5_pickle_that_would_run_code_is_refused_and_nothing_runs(capsys, tmp_path):
    marker = tmp_path / "ran"
    args = _digits5(tmp_path, np.zeros((20, 16, 16), np.uint8), np.arange(20) % 10)
    path = tmp_path / "digits5" / "USPS" / "train_stratified.pkl"
    path.write_bytes(pickle.dumps((np.zeros((20, 16, 16), np.uint8), _Payload(marker))))
    err = refused(capsys, *args)
    assert not marker.exists()
    assert str(path) in err and "posix.system" in err and "nothing in the file was run" in err
    # an .npy object array (np.save of the pair) is read the same way
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = np.zeros((20, 16, 16), np.uint8), np.arange(20) % 10
    np.save(path.with_suffix(".npy"), pair, allow_pickle=True)
    path.with_suffix(".npy").rename(path)
    assert main(["--dry-run", *args]) == 0


def test_a_cifar_batch_that_would_run_code_is_refused_and_nothing_runs(capsys, tmp_path):
    marker = tmp_path / "ran"
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"):
        (base / name).write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}))
    err = refused(capsys, "dataset=cifar10", f"dataset.data_root={tmp_path}", "dataset.download=false",
                  "partition=iid")
    assert not marker.exists()
    assert str(base / "data_batch_1") in err and "posix.system" in err


def test_a_corrupted_gz_file_is_named(capsys, tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        whole = bytearray(gzip.compress(bytes(range(256)) * 40, mtime=0))
        whole[20] ^= 0xFF  # a bad distance code in the deflate stream: zlib.error, not BadGzipFile
        (raw / f"{name}.gz").write_bytes(bytes(whole))
    err = refused(capsys, "dataset=mnist", f"dataset.data_root={tmp_path}", "dataset.download=false",
                  "partition=iid")
    assert "-ubyte.gz cannot be unpacked" in err and "corrupted" in err
    assert len(err.strip().splitlines()) == 1


def test_a_read_only_output_folder_is_refused(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    # root writes anywhere: the door's probe is what decides, so it is made to see EACCES
    import task.run.runfolder as runfolder

    real = runfolder._probe_writable
    monkeypatch.setattr(runfolder, "_probe_writable",
                        lambda d: real(d) if os.geteuid() else (_ for _ in ()).throw(PermissionError(13, "")))
    err = refused(capsys, TINY, f"output_dir={folder / 'run'}")
    assert f"cannot write in {folder}" in err and len(err.strip().splitlines()) == 1


def test_a_file_where_the_folder_should_be_is_named_as_such(capsys, tmp_path):
    (tmp_path / "run").write_text("x")
    err = refused(capsys, TINY, f"output_dir={tmp_path / 'run'}")
    assert "is a file, not a folder" in err and "locked" not in err


def test_min_replies_above_the_sampled_clients_is_refused(capsys):
    err = refused(capsys, TINY, "min_replies=5")
    assert "min_replies=5" in err and "4 clients" in err
    err = refused(capsys, TINY, "fraction_train=0.5", "min_replies=3")
    assert "min_replies=3" in err and "samples 2" in err


def test_a_learning_rate_that_cannot_train_is_refused(capsys):
    err = refused(capsys, TINY, "lr=1e308")
    assert "lr=1e+308: expected finite float in (0.0, 10.0]" in err


def test_a_failed_runs_status_holds_one_short_line(tmp_path):
    from task.run.runfolder import read_status

    run = f"{TINY} num_rounds=1 output_dir={tmp_path / 'r'} min_replies=4"
    import server_app

    def boom(*_args, **_kwargs):
        raise RuntimeError("first line\n" + "traceback line\n" * 500)

    mp = pytest.MonkeyPatch()
    mp.setattr(server_app, "run", boom)
    try:
        with pytest.raises(RuntimeError):
            _server_run(run)
    finally:
        mp.undo()
    status = read_status(tmp_path / "r")
    assert status["status"] == "failed" and status["error"] == "RuntimeError: first line"


def test_a_resume_refuses_a_client_whose_saved_state_is_gone(capsys, tmp_path):
    run = f"{TINY} strategy=ditto num_rounds=1 output_dir={tmp_path / 'd'} client_state_dir={tmp_path / 's'}"
    _server_run(run)
    resume = [run, f"resume={tmp_path / 'd'}", "num_rounds=2"]
    assert main(["--dry-run", *resume]) == 0
    gone = tmp_path / "s" / "client-3" / "personal.npz"
    gone.unlink()
    err = refused(capsys, *resume)
    assert f"client 3's saved state {gone} is gone" in err and len(err.strip().splitlines()) == 1


def test_a_resume_refuses_a_client_whose_state_is_older_than_its_last_round(capsys, tmp_path):
    run = f"{TINY} strategy=ditto num_rounds=2 output_dir={tmp_path / 'd'} client_state_dir={tmp_path / 's'}"
    _server_run(run)
    folder = tmp_path / "s" / "client-1"
    # a copy of round 1's state put back in place of round 2's (a restore from an old backup)
    (folder / "personal.prev.npz").replace(folder / "personal.npz")
    err = refused(capsys, run, f"resume={tmp_path / 'd'}", "num_rounds=3")
    assert f"client 1 trained in round 2, but its state in {folder} is of round 1" in err


def test_resuming_a_completed_run_is_answered_at_the_door(capsys, tmp_path):
    run = f"{TINY} strategy=fedavg num_rounds=1 output_dir={tmp_path / 'r'}"
    _server_run(run)
    capsys.readouterr()
    assert main([run, f"resume={tmp_path / 'r'}"]) == 0  # no --dry-run: Flower would start if asked
    out = capsys.readouterr().out
    assert "already completed 1 rounds" in out and "nothing to run" in out and "+ flwr" not in out
