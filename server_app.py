"""pflower ServerApp: compose the config, build the strategy, run the rounds, write outputs."""

from __future__ import annotations

import time
from logging import ERROR, INFO
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from strategies import lookup
from strategies.base import Method
from task.core.device import configure_process, determinism_enabled
from task.core.models import build_model
from task.data.federation import Federation
from task.data.load import load_federation
from task.data.partitions import write_partition_report
from task.engine.checkpoint import CHECKPOINT
from task.engine.rounds import Engine
from task.run.config import compose_config
from task.run.door import check_run
from task.run.figures import run_title
from task.run.outputs import RunOutputs
from task.run.progress import progress_line
from task.run.runfolder import RunFolder
from task.run.trackers import Trackers

app = ServerApp()
STOP_LINGER_S = 30.0


class StopRequestError(Exception):
    """pflower-sim asked the run to stop, or is gone (``RunFolder.stop_requested``)."""


class WatchedGrid:
    """The Grid, but every push first asks the run folder whether to stop: a stop acts before
    the next message (within a round), and the checkpoint on disk is the last finished round's."""

    def __init__(self, grid: Grid, folder: RunFolder):
        self._grid, self._folder = grid, folder

    def push_messages(self, messages):
        reason = self._folder.stop_requested()
        if reason is not None:
            raise StopRequestError(reason)
        return self._grid.push_messages(messages)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def short_error(err: BaseException, limit: int = 300) -> str:
    """The error's first line, at most ``limit`` characters (a Ray error's text holds whole tracebacks)."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def build_strategy(cfg: DictConfig, federation: Federation) -> Method:
    """The configured strategy, over the configured federation, with the run's initial model."""
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, federation.input_shape, federation.num_classes)
    server_cls, _ = lookup(cfg.strategy.name)
    sizes = [(c.num_train, c.num_test) for c in federation.clients]
    strategy = server_cls.from_model(cfg, model, sizes)
    strategy.client_groups = [c.domain for c in federation.clients]
    strategy.group_names = list(federation.domain_names)
    return strategy


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Check the run at the door, claim its folder, run it; the folder's status says how it ended."""
    started = time.monotonic()
    cfg = compose_config(str(context.run_config.get("overrides", "")))
    configure_process(cfg)  # before anything can start CUDA
    federation = load_federation(cfg, torch.device("cpu"))
    strategy = build_strategy(cfg, federation)
    handover = str(context.run_config.get("launcher", ""))  # pflower-sim's lock on the folder
    directory = check_run(cfg, federation, strategy.keeps_client_state, handover)
    folder = RunFolder(directory)
    folder.claim(resume=bool(cfg.resume), handover=handover)
    try:
        outputs = run(cfg, federation, strategy, WatchedGrid(grid, folder), directory)
        results = outputs.write_results(time.monotonic() - started)
        folder.set_status("completed", rounds=results["num_rounds"])
    except StopRequestError as stop:
        # A stop between two messages: the last checkpoint is whole; the run ends normally in
        # Flower's eyes, and the folder says it stopped (resumable).
        folder.set_status("stopped", detail=f"{stop}; resume it with resume=<dir>")
        log(INFO, "pflower: run stopped (%s); the checkpoint of the last finished round is kept", stop)
        folder.release()
        if handover and folder.launcher_alive():
            # pflower-sim sends `flwr stop` on seeing the folder stopped; waiting for it here lets
            # the SuperLink record the run as stopped (a returning ServerApp reads as completed).
            time.sleep(STOP_LINGER_S)
        return
    except BaseException as err:
        # One line: a status.json is read by people and scripts; the traceback is in the log.
        folder.set_status("failed", error=short_error(err))
        log(ERROR, "pflower: run failed: %s", err)
        raise
    finally:
        folder.release()
    outputs.plot_accuracy(run_title(cfg.strategy.name, cfg.dataset.name))
    strategy.plot(outputs.rounds(), outputs.dir)
    for line in outputs.summary_lines(results):
        log(INFO, "%s", line)
    log(INFO, "pflower: done in %.1fs; results in %s", results["wall_seconds"], outputs.dir / "results.json")


def run(cfg: DictConfig, federation: Federation, strategy: Method, grid: Grid,
        directory: Path) -> RunOutputs:
    """Start or resume the rounds into ``directory``; raise if no round could aggregate."""
    outputs = RunOutputs(directory, clients=federation.clients)
    engine = Engine(strategy)
    first_round = 1
    if cfg.resume:
        first_round = engine.load_checkpoint(directory / CHECKPOINT) + 1
        outputs.truncate_rounds(first_round - 1)
        log(INFO, "pflower: resuming %s after round %s", directory, first_round - 1)
    else:
        outputs.write_config(cfg)
        write_partition_report(federation, outputs.dir)
    log(INFO, "pflower: %s on %s; outputs in %s", cfg.strategy.name, cfg.dataset.name, outputs.dir)

    trackers = Trackers(cfg, outputs.dir, stops=(StopRequestError,))

    def on_round(row: dict) -> None:
        outputs.append_round(row)
        trackers.log_round(row)
        log(INFO, "%s", progress_line(row, int(cfg.num_rounds)))

    with trackers:  # closed however the rounds end: finished, stopped or failed
        engine.start(grid, num_rounds=int(cfg.num_rounds), timeout=float(cfg.round_timeout),
                     first_round=first_round, on_round=on_round, checkpoint_path=outputs.dir / CHECKPOINT)
    nodes = engine.directory.deterministic_nodes
    log(INFO, "pflower: deterministic algorithms %s in the ServerApp, on in %s of %s ClientApp nodes",
        "on" if determinism_enabled() else "off", sum(nodes.values()), len(nodes))
    if not any(r.get("train_loss") is not None for r in outputs.rounds()):
        reasons = "; ".join(strategy.stats.reasons[:4]) or "no replies"
        raise RuntimeError(f"no round aggregated: every round had fewer than min_replies={cfg.min_replies} "
                           f"valid replies (last round's rejections: {reasons})")
    return outputs
