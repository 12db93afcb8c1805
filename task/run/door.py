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

from task.core.custom_model import ModelSpecError, check_same_build
from task.core.models import build_model
from task.data.federation import Federation
from task.engine.checkpoint import CHECKPOINT, CHECKPOINT_META
from task.engine.new_clients import training_clients
from task.engine.rounds import draw_clients
from task.run.combinations import check_combination, check_inputs, uploads_per_round
from task.run.config import ConfigError
from task.run.outputs import default_output_dir
from task.run.runfolder import check_free, read_status
from task.run.trackers import check_trackers

# The key under which task/core/state.py stores the round that wrote a client's state file
# (its META; not imported: task.core must not be a dependency of the door's import).
STATE_ROUND = "__round__"
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("resume", "output_dir", "num_rounds", "round_timeout", "node_wait_timeout", "logger")


class DoorError(ValueError):
    """An input that cannot run: the message names the problem (and the file, where there is one)."""


def run_directory(cfg: DictConfig) -> Path:
    """The folder the run writes to: the resumed one, or ``output_dir`` / a fresh default."""
    if cfg.resume:
        return Path(cfg.resume).expanduser().resolve()
    return default_output_dir(cfg)


def model_label(cfg: DictConfig) -> str:
    """The model as a message names it: ``custom (my_pkg.nets:MyNet)`` for the user's own."""
    name = str(cfg.model.name)
    return f"{name} ({cfg.model.get('target')})" if name == "custom" else name


def check_model_fits(cfg: DictConfig, federation: Federation) -> None:
    """Build the model (twice for the user's own: every process must build the same one) and run
    it on two training samples of the federation: a floating (batch, num_classes) output."""
    check_inputs(cfg, federation)  # images or tokens: said before the model is run on a sample
    sample = federation.clients[0].x_train[:2].cpu()
    label = model_label(cfg)
    try:
        model = seeded_model(cfg, federation)
        if cfg.model.name == "custom":
            check_same_build(model, seeded_model(cfg, federation), str(cfg.model.target))
        model.eval()
        with torch.no_grad():
            out = model(sample)
    except ModelSpecError as err:
        raise DoorError(str(err)) from None
    except Exception as err:  # noqa: BLE001 - a model of one's own may raise anything
        raise DoorError(f"model={label} does not fit dataset={cfg.dataset.name}: inputs of shape "
                        f"{tuple(federation.input_shape)} ({type(err).__name__}: {err}); pick a model that "
                        "takes them or change the dataset's image size") from None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point():
        what = out.dtype if isinstance(out, torch.Tensor) else type(out).__name__
        raise DoorError(f"model={label} returns {what}, not a floating tensor of logits (batch, num_classes)")
    if tuple(out.shape) != (len(sample), federation.num_classes):
        raise DoorError(f"model={label} gives outputs of shape {tuple(out.shape)} for a batch of "
                        f"{len(sample)}; dataset={cfg.dataset.name} needs ({len(sample)}, "
                        f"{federation.num_classes}): one logit per class")


def seeded_model(cfg: DictConfig, federation: Federation) -> torch.nn.Module:
    torch.manual_seed(int(cfg.seed))
    return build_model(cfg.model, federation.input_shape, federation.num_classes)


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


def check_min_replies(cfg: DictConfig, num_clients: int) -> None:
    """A ``min_replies`` no round can meet would train nothing and fail after the last round."""
    sampled = uploads_per_round(cfg, num_clients)
    if int(cfg.min_replies) > sampled:
        training = len(training_clients(cfg, num_clients))
        raise ConfigError(f"min_replies={cfg.min_replies} can never be met: each round samples {sampled} of "
                          f"the {training} clients that train (fraction_train={cfg.fraction_train}); set "
                          f"min_replies to at most {sampled}")


def check_run(cfg: DictConfig, federation: Federation, keeps_client_state: bool, handover: str = "") -> Path:
    """Every check but the data's own (done while loading it); returns the run's folder.
    ``handover``: the token of the lock pflower-sim took for this run (not a refusal)."""
    check_trackers(cfg)
    check_model_fits(cfg, federation)
    check_combination(cfg, federation)
    check_min_replies(cfg, len(federation.clients))
    directory = run_directory(cfg)
    check_free(directory, resume=bool(cfg.resume), handover=handover)  # first: a live run has no checkpoint
    if cfg.resume:
        meta = check_resumable(cfg, directory, keeps_client_state)
        if keeps_client_state and cfg.client_state_dir:
            check_client_state(cfg, directory, meta, len(federation.clients))
    return directory


def finished_already(cfg: DictConfig, directory: Path) -> str | None:
    """For a resume of a run that already completed ``num_rounds`` rounds: the answer (Flower
    would start, 90-120 s, to do nothing); None otherwise."""
    if not cfg.resume:
        return None
    status = read_status(directory) or {}
    done = int(read_checkpoint_meta(directory / CHECKPOINT)["round"])
    if status.get("status") != "completed" or done < int(cfg.num_rounds):
        return None
    return (f"{directory} already completed {done} rounds (num_rounds={cfg.num_rounds}): nothing to run; "
            f"results in {directory / 'results.json'} (pass num_rounds={done + 1} or more to go on)")


def _state_round(path: Path) -> int:
    try:
        with np.load(path, allow_pickle=False) as data:
            return int(data[STATE_ROUND])
    except Exception as err:  # noqa: BLE001 - zipfile, numpy each raise their own
        raise ConfigError(f"client state {path} cannot be read ({type(err).__name__}); it is truncated or "
                          "not pflower's: restore it, or start the run afresh") from None


def last_trained_rounds(cfg: DictConfig, meta: dict, rows: list[dict], num_clients: int) -> dict[int, int]:
    """Per client, the last round up to the checkpoint's in which it was sampled and every reply
    was valid (so it saved its state then): the engine's seeded sampling replayed. Empty when the
    replay does not end in the checkpoint's generator state (then nothing is claimed)."""
    rng = np.random.default_rng(int(cfg.seed))
    clean = {int(r["round"]) for r in rows if r.get("train_loss") is not None
             and not r.get("rejected_replies") and not r.get("late_replies") and not r.get("missing_clients")}
    last: dict[int, int] = {}
    pool = training_clients(cfg, num_clients)
    for server_round in range(1, int(meta["round"]) + 1):
        for cid in draw_clients(rng, cfg, num_clients, pool):
            if server_round in clean:
                last[int(cid)] = server_round
    return last if rng.bit_generator.state == meta.get("rng") else {}


def check_client_state(cfg: DictConfig, directory: Path, meta: dict, num_clients: int) -> None:
    """Refuse a resume that would silently restart a client whose state in ``client_state_dir``
    is gone or older than the last round it trained in (``task/core/state.py``: each saved file
    holds the round that wrote it; ``<name>.npz`` the newest, ``<name>.prev.npz`` the one before)."""
    root = Path(str(cfg.client_state_dir)).expanduser()
    rows = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()
            if line.strip().endswith("}")] if (directory / "metrics.jsonl").exists() else []
    last = last_trained_rounds(cfg, meta, rows, num_clients)
    saved = {cid: {p.name.removesuffix(".npz").removesuffix(".prev")
                   for p in (root / f"client-{cid}").glob("*.npz")} for cid in last}
    for cid, trained in sorted(last.items()):
        folder = root / f"client-{cid}"
        # A state others all keep and this client lacks: deleted (a method that keeps a state
        # only for some clients has other clients without it too).
        for name in sorted(set().union(*saved.values()) - saved[cid]):
            if all(name in names for other, names in saved.items() if other != cid):
                gone = folder / f"{name}.npz"
                raise ConfigError(f"resume={directory}: client {cid}'s saved state {gone} "
                                  "is gone (every other client has its own): resuming would restart that "
                                  "client from scratch; restore the file, or start the run afresh")
        versions = [_state_round(p) for p in folder.glob("*.npz")]
        visible = [r for r in versions if r <= int(meta["round"])]
        if not visible or max(visible) < trained:
            found = f"is of round {max(visible)}" if visible else "is gone"
            raise ConfigError(f"resume={directory}: client {cid} trained in round {trained}, but its state "
                              f"in {folder} {found}: resuming would restart or rewind that client; restore "
                              "its files, or start the run afresh")
