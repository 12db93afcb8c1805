"""The door: everything a run can check before Flower starts, with messages instead of tracebacks.

``pflower-sim`` runs these checks before it starts ``flwr run`` (a bad input fails in seconds)
and the ServerApp runs them again (``flwr run`` may be started by hand): the config's types
and ranges (``task.run.config``), the data (files present, readable, well-formed), the model
against the data (built once and run on one sample), the output folder (one run per folder,
not locked), and a resume (same config, a readable checkpoint, client state that survived).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from task.core.models import build_model
from task.data.federation import Federation
from task.engine.checkpoint import CHECKPOINT, CHECKPOINT_META
from task.run.combinations import check_combination
from task.run.config import ConfigError
from task.run.outputs import default_output_dir
from task.run.runfolder import check_free

# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("resume", "output_dir", "num_rounds", "round_timeout", "node_wait_timeout")


class DoorError(ValueError):
    """An input that cannot run: the message names the problem (and the file, where there is one)."""


def run_directory(cfg: DictConfig) -> Path:
    """The folder the run writes to: the resumed one, or ``output_dir`` / a fresh default."""
    if cfg.resume:
        return Path(cfg.resume).expanduser().resolve()
    return default_output_dir(cfg)


def check_model_fits(cfg: DictConfig, federation: Federation) -> None:
    """Build the model once and run it on one training sample of the federation."""
    torch.manual_seed(int(cfg.seed))
    sample = federation.clients[0].x_train[:1].cpu()
    try:
        model = build_model(cfg.model, federation.input_shape, federation.num_classes)
        model.eval()
        with torch.no_grad():
            out = model(sample)
    except (RuntimeError, ValueError) as err:
        raise DoorError(f"model={cfg.model.name} does not fit dataset={cfg.dataset.name}: inputs of shape "
                        f"{tuple(federation.input_shape)} ({err}); pick a model that takes them or change "
                        "the dataset's image size") from None
    if tuple(out.shape) != (1, federation.num_classes):
        raise DoorError(f"model={cfg.model.name} gives outputs of shape {tuple(out.shape)[1:]} for "
                        f"dataset={cfg.dataset.name}'s {federation.num_classes} classes")


def read_checkpoint_meta(path: Path) -> dict:
    """The checkpoint's metadata, after reading every array once (a torn file is named)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            for name in data.files:
                data[name]  # noqa: B018 - reading checks the archive's CRCs
            return json.loads(bytes(data[CHECKPOINT_META]).decode())
    except FileNotFoundError:
        raise DoorError(f"no checkpoint at {path}") from None
    except Exception as err:  # noqa: BLE001 - zipfile, numpy and json each raise their own
        raise DoorError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err}); it is "
                        "truncated or not a pflower checkpoint") from None


def check_resumable(cfg: DictConfig, directory: Path, keeps_client_state: bool) -> dict:
    """Refuse a resume that would not continue the saved run; return the checkpoint's metadata.

    The config must equal the saved run's (but for ``RESUME_FREE_KEYS``), the checkpoint must be
    readable, and a method that keeps per-client state must have kept it on disk: otherwise
    every personal model would silently restart from scratch.
    """
    if not directory.is_dir():
        raise ConfigError(f"resume={directory}: no such folder")
    if not (directory / CHECKPOINT).exists():
        raise ConfigError(f"resume={directory}: no {CHECKPOINT} there (the run ended before its first "
                          "round, or this is not a pflower output folder)")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"), resolve=True)
    except Exception as err:  # noqa: BLE001 - missing or unparsable YAML
        raise ConfigError(f"resume={directory}: config.yaml cannot be read ({err})") from None
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"resume={directory}: the config differs from the saved run's in {diffs}; "
                          "pass the same overrides as the original run, plus resume=<dir>")
    meta = read_checkpoint_meta(directory / CHECKPOINT)
    if keeps_client_state and not meta.get("client_state_on_disk", False):
        raise ConfigError(
            f"resume={directory}: strategy={cfg.strategy.name} keeps per-client state (personal models), "
            "and that run kept it in memory only (no client_state_dir, no SuperNode state-dir), so it is "
            "lost: resuming would restart every personal model from scratch. Start the run afresh with "
            "client_state_dir=<dir> (simulation) or SuperNodes with a state-dir to make it resumable")
    return meta


def check_run(cfg: DictConfig, federation: Federation, keeps_client_state: bool) -> Path:
    """Every check but the data's own (done while loading it); returns the run's folder."""
    check_model_fits(cfg, federation)
    check_combination(cfg, federation)
    directory = run_directory(cfg)
    check_free(directory, resume=bool(cfg.resume))  # first: a live run has no checkpoint yet
    if cfg.resume:
        check_resumable(cfg, directory, keeps_client_state)
    return directory
