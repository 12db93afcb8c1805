"""pflower ServerApp: compose the config, build the strategy, run the rounds, write outputs."""

from __future__ import annotations

import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from strategies import lookup
from strategies.base import PFLStrategy
from task.config import ConfigError, compose_config
from task.data import Federation, load_federation
from task.models import build_model
from task.outputs import RunOutputs, default_output_dir
from task.partitions import write_partition_report

app = ServerApp()
CHECKPOINT = "checkpoint.npz"
# Keys that may differ between a run and its resumption.
RESUME_FREE_KEYS = ("resume", "output_dir", "num_rounds", "round_timeout", "node_wait_timeout")


def progress_line(row: dict, num_rounds: int) -> str:
    """One line a round: loss, personal accuracy (mean / worst), global accuracy, time."""
    parts = [f"round {row['round']}/{num_rounds}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    pers = row.get("personalized_accuracy")
    if pers:
        parts.append(f"personal acc {pers['mean']:.4f} (worst {pers['worst']:.4f})")
    if row.get("validation_accuracy"):
        parts.append(f"val acc {row['validation_accuracy']['mean']:.4f}")
    if row.get("global_accuracy") is not None:
        parts.append(f"global acc {row['global_accuracy']:.4f}")
    if row.get("rejected_replies"):
        parts.append(f"rejected {row['rejected_replies']}")
    parts.append(f"{row['seconds']:.2f}s")
    return " | ".join(parts)


def build_strategy(cfg: DictConfig, federation: Federation) -> PFLStrategy:
    """The configured strategy, over the configured federation, with the run's initial model."""
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, federation.input_shape, federation.num_classes)
    server_cls, _ = lookup(cfg.strategy.name)
    sizes = [(c.num_train, c.num_test) for c in federation.clients]
    strategy = server_cls.from_model(cfg, model, sizes)
    strategy.client_groups = [c.domain for c in federation.clients]
    strategy.group_names = list(federation.domain_names)
    return strategy


def check_resumable(cfg: DictConfig, directory: Path) -> None:
    """Refuse to resume a run whose saved config differs from this one (but for free keys)."""
    if not (directory / CHECKPOINT).exists():
        raise ConfigError(f"resume={directory}: no {CHECKPOINT} there")
    saved = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in RESUME_FREE_KEYS and saved.get(k) != now.get(k)]
    if diffs:
        raise ConfigError(f"resume={directory}: the config differs from the saved run's in {diffs}; "
                          "pass the same overrides as the original run, plus resume=<dir>")


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    cfg = compose_config(str(context.run_config.get("overrides", "")))
    federation = load_federation(cfg, torch.device("cpu"))
    strategy = build_strategy(cfg, federation)
    first_round = 1
    if cfg.resume:
        directory = Path(cfg.resume).expanduser().resolve()
        check_resumable(cfg, directory)
        outputs = RunOutputs(directory)
        first_round = strategy.load_checkpoint(directory / CHECKPOINT) + 1
        outputs.truncate_rounds(first_round - 1)
        log(INFO, "pflower: resuming %s after round %s", directory, first_round - 1)
    else:
        outputs = RunOutputs(default_output_dir(cfg))
        outputs.write_config(cfg)
        write_partition_report(federation, outputs.dir)
    log(INFO, "pflower: %s on %s; outputs in %s", cfg.strategy.name, cfg.dataset.name, outputs.dir)

    def on_round(row: dict) -> None:
        outputs.append_round(row)
        log(INFO, "%s", progress_line(row, int(cfg.num_rounds)))

    strategy.start(grid, num_rounds=int(cfg.num_rounds), timeout=float(cfg.round_timeout),
                   first_round=first_round, on_round=on_round, checkpoint=outputs.dir / CHECKPOINT)
    results = outputs.write_results(time.monotonic() - started)
    outputs.plot_accuracy(f"{cfg.strategy.name} on {cfg.dataset.name}")
    strategy.plot(outputs.rounds(), outputs.dir)
    for line in outputs.summary_lines(results):
        log(INFO, "%s", line)
    log(INFO, "pflower: done in %.1fs; results in %s", results["wall_seconds"], outputs.dir / "results.json")
