"""Experiment trackers (``logger=tensorboard|wandb|mlflow``, several at once): every round's
scalars and the run's config as hyper-parameters, written beside metrics.jsonl.

Each tracker's package is optional (``pip install 'pflower[tensorboard]'`` etc.); the door
(``check_trackers``) refuses a run whose chosen tracker is not installed, before Flower starts.
A resumed run goes on in the same W&B and MLflow runs (their ids are kept in trackers.json).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from task.run.config import LOGGER, ConfigError

# tracker -> (the modules it imports, the extra that installs them)
PACKAGES = {"tensorboard": (("tensorboard",), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow", "sqlalchemy", "alembic"), "mlflow")}
IDS_FILE = "trackers.json"
# Row keys that are not a round's scalars: identifiers, client lists, per-client tables
# (those go to clients.csv).
NOT_SCALARS = ("round", "missing_clients", "byzantine_clients", "excluded_clients", "hosts")
RENAMED = {"personalized_accuracy": "personal", "validation_accuracy": "validation",
           "global_accuracy": "global/accuracy", "train_loss": "train/loss", "group_accuracy": "group",
           "bytes_up": "comm/bytes_up", "bytes_down": "comm/bytes_down",
           "eval_bytes_down": "comm/eval_bytes_down",
           **{key: f"round/{key}" for key in ("sampled_clients", "evaluated_clients", "rejected_replies",
                                              "discarded_uploads", "late_replies", "seconds")}}
HPARAM_METRICS = ("personal/mean", "personal/worst", "validation/mean", "global/accuracy")


def chosen(cfg: DictConfig) -> list[str]:
    """The selected trackers, in a fixed order."""
    section = cfg.get(LOGGER) or {}
    return [name for name in PACKAGES if name in section]


MLFLOW_SCHEMES = ("http://", "https://", "sqlite:///", "file:", "databricks")


def check_trackers(cfg: DictConfig) -> None:
    """Refuse a chosen tracker whose package is missing (naming the pip command), and an MLflow
    tracking_uri of no kind MLflow stores to."""
    uri = str(cfg.logger.mlflow.tracking_uri) if "mlflow" in chosen(cfg) else ""
    if uri and not uri.startswith(MLFLOW_SCHEMES):
        raise ConfigError(f"logger.mlflow.tracking_uri={uri!r} is no MLflow store: give a server "
                          f"(http://host:5000), a database (sqlite:////abs/path/mlflow.db), or leave it "
                          "empty for <run folder>/mlflow.db")
    if "tensorboard" in chosen(cfg):
        _check_folder(Path(str(cfg.logger.tensorboard.dir)).expanduser(), "logger.tensorboard.dir")
    for name in chosen(cfg):
        modules, extra = PACKAGES[name]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if name == "mlflow" and cfg.logger.mlflow.tracking_uri:
            missing = [m for m in missing if m == "mlflow"]  # a server needs no local database
        if missing:
            raise ConfigError(f"logger={name} needs the package(s) {', '.join(missing)}, not installed: "
                              f"pip install 'pflower[{extra}]' (or leave {name} out of logger=)")


def _check_folder(path: Path, key: str) -> None:
    """An absolute folder must be one this user can make (a relative one is in the run folder)."""
    if not path.is_absolute():
        return
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: {existing} is not a folder this user can write in; give a "
                          "writable folder, or a path relative to the run folder (the default: tensorboard)")


def round_scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row as flat scalars: ``personal/mean``, ``train/loss``, ``group/<name>``,
    and the method's own values (``lgmix_cbar_mean``, ``fedslr/rank/<layer>``, ``cluster_ari``).
    Values keyed by client id are left out: they are clients.csv's."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key in NOT_SCALARS or key.startswith("per_client"):
            continue
        _flatten(RENAMED.get(key, key), value, out)
    return out


def _flatten(tag: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, int | float):  # bool too
        out[tag] = float(value)
    elif isinstance(value, dict):
        for key, inner in value.items():
            if not str(key).isdigit():
                _flatten(f"{tag}/{key}", inner, out)
    elif isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        for i, inner in enumerate(value):
            out[f"{tag}/{i}"] = float(inner)


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as flat ``dotted.key: value`` pairs (lists as text)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, inner in node.items():
                walk(f"{prefix}{key}." if isinstance(inner, dict) else f"{prefix}{key}", inner)
        else:
            flat[prefix.rstrip(".")] = node if isinstance(node, bool | int | float | str) else str(node)

    walk("", OmegaConf.to_container(cfg, resolve=True))
    return flat


class TensorBoardTracker:
    """Event files in ``<run>/<dir>`` (torch.utils.tensorboard); the config as HPARAMS and text."""

    def __init__(self, cfg: DictConfig, directory: Path, ids: dict):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(directory / str(cfg.logger.tensorboard.dir)))
        params = {k: ("" if v is None else v) for k, v in hyperparameters(cfg).items()}
        for summary in hparams(params, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run, offline unless ``logger.wandb.mode=online``: files in ``<run>/wandb``."""

    def __init__(self, cfg: DictConfig, directory: Path, ids: dict):
        import wandb

        mode = str(cfg.logger.wandb.mode)
        os.environ["WANDB_MODE"] = mode  # the service process reads it too: offline means offline
        settings = wandb.Settings(silent=True, console="off", disable_git=True, x_disable_stats=True,
                                  save_code=False)
        self.run = wandb.init(project=str(cfg.logger.wandb.project), dir=str(directory), mode=mode,
                              name=directory.name, config=hyperparameters(cfg), settings=settings,
                              id=ids.get("wandb"), resume="allow" if ids.get("wandb") else None)
        ids["wandb"] = self.run.id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, "round": step}, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowTracker:
    """An MLflow run in ``<run>/mlflow.db`` (or ``logger.mlflow.tracking_uri``'s server)."""

    PARAM_BATCH = 100  # MLflow's limit of params per log_batch call

    def __init__(self, cfg: DictConfig, directory: Path, ids: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = str(cfg.logger.mlflow.tracking_uri) or f"sqlite:///{directory / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        if ids.get("mlflow"):
            self.run_id = ids["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        name = str(cfg.logger.mlflow.experiment)
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(
            name, artifact_location=(directory / "mlartifacts").as_uri())
        self.run_id = self.client.create_run(experiment, run_name=directory.name).info.run_id
        ids["mlflow"] = self.run_id
        params = [Param(k, str(v)[:6000]) for k, v in hyperparameters(cfg).items()]
        for start in range(0, len(params), self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + self.PARAM_BATCH])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _mlflow_key(tag: str) -> str:
    # MLflow keys allow letters, digits, _ - . / and spaces; a group or layer name may hold more.
    return re.sub(r"[^\w\-./ ]", "_", tag)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's chosen trackers: ``log_round`` each row, closed on leaving the ``with`` block
    (FINISHED, KILLED for one of ``stops``, FAILED for any other exception)."""

    def __init__(self, cfg: DictConfig, directory: Path, stops: tuple[type[BaseException], ...] = ()):
        self.stops = (KeyboardInterrupt, *stops)
        self.trackers: list[Any] = []
        self._ids_path = directory / IDS_FILE
        names = chosen(cfg)
        if not names:
            return
        ids = json.loads(self._ids_path.read_text()) if cfg.resume and self._ids_path.exists() else {}
        try:
            for name in names:
                self.trackers.append(TRACKERS[name](cfg, directory, ids))
        except BaseException:
            self.close("FAILED")
            raise
        self._ids_path.write_text(json.dumps(ids))

    def log_round(self, row: dict) -> None:
        if self.trackers:
            scalars = round_scalars(row)
            for tracker in self.trackers:
                tracker.log(int(row["round"]), scalars)

    def close(self, status: str) -> None:
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(kind, self.stops) else "FAILED")
