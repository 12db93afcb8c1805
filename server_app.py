"""pflower ServerApp: compose the config, build the strategy, run the rounds, write outputs."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from strategies import lookup
from task.config import compose_config
from task.data import load_federation
from task.models import build_model
from task.outputs import RunOutputs, default_output_dir

app = ServerApp()


def progress_line(row: dict, num_rounds: int) -> str:
    """One line a round: loss, personal accuracy (mean / worst), global accuracy, time."""
    parts = [f"round {row['round']}/{num_rounds}"]
    if row.get("train_loss") is not None:
        parts.append(f"train loss {row['train_loss']:.4f}")
    pers = row.get("personalized_accuracy")
    if pers:
        parts.append(f"personal acc {pers['mean']:.4f} (worst {pers['worst']:.4f})")
    if row.get("global_accuracy") is not None:
        parts.append(f"global acc {row['global_accuracy']:.4f}")
    if row.get("rejected_replies"):
        parts.append(f"rejected {row['rejected_replies']}")
    parts.append(f"{row['seconds']:.2f}s")
    return " | ".join(parts)


@app.main()
def main(grid: Grid, context: Context) -> None:
    started = time.monotonic()
    cfg = compose_config(str(context.run_config.get("overrides", "")))
    outputs = RunOutputs(default_output_dir(cfg))
    log(INFO, "pflower: %s on %s; outputs in %s", cfg.strategy.name, cfg.dataset.name, outputs.dir)
    outputs.write_config(cfg)

    federation = load_federation(cfg, torch.device("cpu"))
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, federation.input_shape, federation.num_classes)
    server_cls, _ = lookup(cfg.strategy.name)
    sizes = [(c.num_train, c.num_test) for c in federation.clients]
    strategy = server_cls.from_model(cfg, model, sizes)

    last: dict = {}

    def on_round(row: dict) -> None:
        outputs.append_round(row)
        if row.get("per_client_accuracy"):
            last.update(row["per_client_accuracy"])
        log(INFO, "%s", progress_line(row, int(cfg.num_rounds)))

    strategy.start(grid, num_rounds=int(cfg.num_rounds), timeout=float(cfg.round_timeout),
                   on_round=on_round)
    results = outputs.write_results(time.monotonic() - started, last)
    outputs.plot_accuracy(f"{cfg.strategy.name} on {cfg.dataset.name}")
    final = results["last_evaluated_round"] or {}
    log(INFO, "pflower: done in %.1fs; final personal accuracy %s; results in %s",
        results["wall_seconds"], (final.get("personalized_accuracy") or {}).get("mean"),
        outputs.dir / "results.json")
