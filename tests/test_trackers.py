"""Experiment trackers (task/run/trackers.py): a run with TensorBoard, offline W&B and MLflow
at once, each one's files read back; the config group's errors; the door's missing package."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from task.run.config import ConfigError
from task.run.trackers import check_trackers, round_scalars

from .fake_grid import InProcessRunner
from .helpers import TINY, tiny_cfg

ALL = "logger=[tensorboard,wandb,mlflow]"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two rounds of LG-Mix (its own metric: cbar) logged to all three trackers."""
    out = InProcessRunner(tmp_path_factory.mktemp("trackers")).run("run", f"{TINY} num_rounds=2 {ALL}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows


EXPECTED = ("personal/mean", "personal/worst", "personal/weighted", "global/accuracy", "train/loss",
            "comm/bytes_up", "comm/bytes_down", "group/plain", "lgmix_cbar_mean")


def test_round_scalars_flatten_a_row_and_leave_per_client_values_out():
    row = {"round": 3, "train_loss": 0.5, "personalized_accuracy": {"mean": 0.7, "worst": 0.2},
           "per_client_accuracy": {"0": 0.9}, "lgmix": {"0": {"cbar": 0.1}}, "lgmix_cbar_mean": 0.1,
           "fedslr": {"rank": {"conv.weight": 4}}, "cluster_sizes": [2, 3], "missing_clients": [1],
           "global_accuracy": None}
    assert round_scalars(row) == {"train/loss": 0.5, "personal/mean": 0.7, "personal/worst": 0.2,
                                  "lgmix_cbar_mean": 0.1, "fedslr/rank/conv.weight": 4.0,
                                  "cluster_sizes/0": 2.0, "cluster_sizes/1": 3.0}


def test_tensorboard_event_file_holds_every_round_and_the_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out, rows = tracked_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    for tag in EXPECTED:
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    means = [e.value for e in events.Scalars("personal/mean")]
    assert means == pytest.approx([r["personalized_accuracy"]["mean"] for r in rows], abs=1e-6)
    assert [e.value for e in events.Scalars("comm/bytes_up")] == [r["bytes_up"] for r in rows]
    start = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert hparams["lr"].number_value == pytest.approx(0.05)
    assert hparams["strategy.name"].string_value == "lgmix"


def read_wandb_records(path: Path) -> list[bytes]:
    """The records of a .wandb file: LevelDB's log format (32 KiB blocks of records with a
    7-byte header: CRC, little-endian length, type FULL=1 / FIRST / MIDDLE / LAST=4) after W&B's
    7-byte file header (wandb 0.31 ships no Python reader for it)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pending)
            pending = b""
    return records


def test_wandb_offline_run_holds_every_round_and_the_config(tracked_run):
    from wandb.proto import wandb_internal_pb2

    out, rows = tracked_run
    (path,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = [], {}
    for data in read_wandb_records(path):
        record = wandb_internal_pb2.Record.FromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif record.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    assert [h["_step"] for h in history] == [1, 2]
    assert all(tag in history[0] for tag in EXPECTED)
    assert [h["personal/mean"] for h in history] == [r["personalized_accuracy"]["mean"] for r in rows]
    assert config["lr"] == 0.05 and config["strategy.name"] == "lgmix"


def test_mlflow_store_holds_every_round_and_the_config(tracked_run):
    from mlflow.tracking import MlflowClient

    out, rows = tracked_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(json.loads((out / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FINISHED" and run.data.params["strategy.name"] == "lgmix"
    history = client.get_metric_history(run.info.run_id, "personal/mean")
    assert [(m.step, m.value) for m in history] == [(r["round"], r["personalized_accuracy"]["mean"])
                                                    for r in rows]
    assert {"lgmix_cbar_mean", "train/loss", "comm/bytes_down"} <= set(run.data.metrics)


def test_logger_choices_and_keys_are_named():
    with pytest.raises(ConfigError, match="Valid choices for 'logger': mlflow, none, tensorboard, wandb"):
        tiny_cfg("logger=[tensorboard,tensorbord]")
    with pytest.raises(ConfigError, match=r"add logger=wandb"):
        tiny_cfg("logger=tensorboard logger.wandb.project=x")
    with pytest.raises(ConfigError, match="its keys: experiment, tracking_uri"):
        tiny_cfg("logger=mlflow logger.mlflow.uri=x")
    with pytest.raises(ConfigError, match=r"mode='cloud': expected one of \['offline', 'online'\]"):
        tiny_cfg("logger=wandb logger.wandb.mode=cloud")
    assert set(tiny_cfg("logger=[wandb,mlflow]").logger) == {"wandb", "mlflow"}
    assert not tiny_cfg("logger=none").logger


def test_a_missing_tracker_package_is_a_door_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name))
    check_trackers(tiny_cfg("logger=[tensorboard,mlflow]"))
    with pytest.raises(ConfigError, match=r"is not a folder this user can write in"):
        check_trackers(tiny_cfg(f"logger=tensorboard logger.tensorboard.dir={__file__}/tb"))
    with pytest.raises(ConfigError, match=r"tracking_uri='mlruns' is no MLflow store"):
        check_trackers(tiny_cfg("logger=mlflow logger.mlflow.tracking_uri=mlruns"))
    with pytest.raises(ConfigError, match=r"needs the package\(s\) wandb.*pip install 'pflower\[wandb\]'"):
        check_trackers(tiny_cfg("logger=[tensorboard,wandb]"))


def test_an_mlflow_run_ends_failed_goes_on_when_resumed_and_ends_killed_by_a_stop(tmp_path, tracked_run):
    import shutil

    from mlflow.tracking import MlflowClient

    from task.run.trackers import Trackers

    # a copy of the run's store: MLflow creates a new one in ~3 s (20 s on a loaded machine)
    shutil.copy(tracked_run[0] / "mlflow.db", tmp_path / "mlflow.db")
    with pytest.raises(RuntimeError), Trackers(tiny_cfg("logger=mlflow"), tmp_path) as trackers:
        trackers.log_round({"round": 1, "train_loss": 0.9})
        raise RuntimeError("a client crashed")
    run_id = json.loads((tmp_path / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "FAILED"
    with Trackers(tiny_cfg(f"logger=mlflow resume={tmp_path}"), tmp_path) as trackers:
        trackers.log_round({"round": 2, "train_loss": 0.5})
    assert client.get_run(run_id).info.status == "FINISHED"
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.5)]

    class StopError(Exception):
        pass

    resumed = tiny_cfg(f"logger=mlflow resume={tmp_path}")
    with pytest.raises(StopError), Trackers(resumed, tmp_path, stops=(StopError,)):
        raise StopError  # the ServerApp's StopRequestError: pflower-sim or flwr stop asked
    assert client.get_run(run_id).info.status == "KILLED"
