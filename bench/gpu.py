"""pflower beside a plain PyTorch loop on the same device, and the cost of its data path.

For each model (``--models``; default ``digit_cnn_small``, ``digit_cnn``, ``resnet18_gn``),
FedAvg on the default federation (built-in digits, 10 clients, 1 local epoch, every client
evaluated every round) is run side by side on ``--device`` (``auto``: CUDA where torch sees
it, else the CPU):

- ``plain``: one process, the same work as pflower with the same ``task/`` modules (tensors,
  model under the same seed, sampling, per-(client, round) batch generators, sample-weighted
  mean, every client's evaluation of the global model); the model stays on the device;
- ``in-process``: pflower's real strategy round loop driving the real ClientApp handlers in
  this process (``tests/fake_grid.py``): every array crosses a Flower ``Message`` as it does
  in a run, without a transport;
- ``flwr run`` (``--flwr``): the simulation with one SuperNode per client, 1 CPU and
  ``--gpus`` of a GPU per ClientApp (on CUDA), a local SuperLink in a temporary FLWR_HOME.

Per round (the median of rounds 2.., round 1 being the warm-up) it prints the round's wall
time, the time inside local training and evaluation (``train_epochs`` and ``evaluate``,
with a CUDA synchronisation at both ends) and the time outside them. Outside them the plain
loop loads weights into the model, copies its state and takes the mean; pflower also moves
every array through a Flower ``Message`` (into a message and out, validation, bookkeeping).
pflower's **data path** is its time outside training less the plain loop's, both measured in
the same run (so that the training's own variation under load cancels). The bytes the round's
messages carried (``bytes_up`` + ``bytes_down``) over pflower's whole time outside training
give the GB/s (also over its CPU time there: on a loaded machine the wall clock mostly
measures the other processes). Usage:

    .venv/bin/python bench/gpu.py [--device cpu] [--models digit_cnn] [--rounds 4] [--flwr]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task.core.device import configure_process, resolve_device  # noqa: E402
from task.core.models import build_model  # noqa: E402
from task.core.params import load_partial, model_state, weighted_mean  # noqa: E402
from task.core.training import evaluate, step_generator, train_epochs  # noqa: E402
from task.data.load import load_federation  # noqa: E402
from task.run.config import compose_config  # noqa: E402

MODELS = ("digit_cnn_small", "digit_cnn", "resnet18_gn")


class ComputeClock:
    """Wall and CPU seconds spent inside the wrapped functions (local training, evaluation)."""

    def __init__(self, device: torch.device):
        self.wall = self.cpu = 0.0
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            self.sync()
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.wall += time.perf_counter() - wall
                self.cpu += time.process_time() - cpu
        return timed

    @contextmanager
    def round(self, into: dict):
        """Time one round: its wall and CPU seconds, and those inside the wrapped functions."""
        self.wall = self.cpu = 0.0
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.sync()
        into.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu,
                    compute_wall=self.wall, compute_cpu=self.cpu)


@contextmanager
def timed_client_compute(clock: ComputeClock):
    """Time the ClientApps' ``train_epochs`` and ``evaluate`` (as strategies.client_base calls them)."""
    from strategies import client_base

    saved = client_base.train_epochs, client_base.evaluate
    client_base.train_epochs, client_base.evaluate = clock.wrap(saved[0]), clock.wrap(saved[1])
    try:
        yield
    finally:
        client_base.train_epochs, client_base.evaluate = saved


def plain_rounds(overrides: str) -> Iterator[dict]:
    """The FedAvg job as a plain loop on the configured device, one round per step."""
    cfg = compose_config(overrides)
    device = resolve_device(str(cfg.device))
    fed = load_federation(cfg, device)
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, fed.input_shape, fed.num_classes).to(device)
    global_state = model_state(model)
    rng = np.random.default_rng(seed)
    n = len(fed.clients)
    size = max(1, min(n, round(float(cfg.fraction_train) * n)))
    clock = ComputeClock(device)
    train, score = clock.wrap(train_epochs), clock.wrap(evaluate)
    for server_round in range(1, int(cfg.num_rounds) + 1):
        row: dict = {}
        with clock.round(row):
            sampled = sorted(int(c) for c in rng.choice(n, size=size, replace=False))
            states, weights = [], []
            for cid in sampled:
                data = fed.clients[cid]
                load_partial(model, global_state)
                train(model, data.x_train, data.y_train, epochs=int(cfg.local_epochs),
                      batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                      gen=step_generator(seed, cid, server_round, 0))
                states.append(model_state(model))
                weights.append(data.num_train)
            global_state.update(weighted_mean(states, weights))
            accuracies = []
            for data in fed.clients:
                load_partial(model, global_state)
                accuracies.append(score(model, data.x_test, data.y_test)[1])
        yield {**row, "accuracy": float(np.mean(accuracies))}


def in_process_rounds(overrides: str) -> Iterator[dict]:
    """pflower's strategy and ClientApp handlers in this process (no transport), one round per step."""
    import server_app
    from task.engine.rounds import Engine
    from tests.fake_grid import FakeGrid

    cfg = compose_config(overrides)
    device = resolve_device(str(cfg.device))
    fed = load_federation(cfg, torch.device("cpu"))
    strategy = Engine(server_app.build_strategy(cfg, fed))
    grid = FakeGrid(len(fed.clients), overrides)
    strategy.discover(grid, 60.0)
    clock = ComputeClock(device)
    for server_round in range(1, int(cfg.num_rounds) + 1):
        row: dict = {}
        with timed_client_compute(clock), clock.round(row):
            metrics = strategy.run_round(grid, server_round, 600.0, evaluate=True)
        yield {**row, "bytes": metrics["bytes_up"] + metrics["bytes_down"],
               "accuracy": metrics["personalized_accuracy"]["mean"]}


def interleaved(overrides: str) -> tuple[list[dict], list[dict]]:
    """The plain loop's and pflower's rounds, one of each in turn: load from other processes
    on the machine then falls on both alike."""
    cfg = compose_config(overrides)
    configure_process(cfg)
    device = resolve_device(str(cfg.device))
    if device.type == "cpu" and int(cfg.client_threads) > 0:
        torch.set_num_threads(int(cfg.client_threads))  # as each ClientApp does
    plain, pflower = [], []
    for a, b in zip(plain_rounds(overrides), in_process_rounds(overrides), strict=True):
        plain.append(a)
        pflower.append(b)
    return plain, pflower


def flwr_run(overrides: str, clients: int, gpus: float, home: Path, out: Path) -> dict:
    """The job through ``flwr run`` (simulation); the server's per-round seconds."""
    import json
    import subprocess

    from task.run.launch import flwr_command

    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39291", "FLWR_LOCAL_CONTROL_API_PORT": "39293"}
    began = time.perf_counter()
    proc = subprocess.run(flwr_command(f"{overrides} output_dir={out}", clients, 1, gpus), env=env,
                          capture_output=True, text=True, cwd=ROOT, timeout=3600)
    total = time.perf_counter() - began
    metrics = out / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.exists():
        sys.exit(f"flwr run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rounds = [float(r["seconds"]) for r in rows]
    return {"rounds": rounds, "startup": total - sum(rounds),
            "accuracy": rows[-1]["personalized_accuracy"]["mean"]}


def _median(values: list[float]) -> float:
    return statistics.median(values[1:] or values)


def _outside(rounds: list[dict], clock: str) -> float:
    """Median seconds of a round outside training and evaluation (``wall`` or ``cpu``)."""
    return _median([r[clock] - r[f"compute_{clock}"] for r in rounds])


def compare(model: str, args: argparse.Namespace, home: Path) -> dict:
    """Run the variants for ``model``; print and return their medians."""
    overrides = (f"strategy=fedavg model={model} num_rounds={args.rounds} device={args.device} "
                 f"{args.overrides}").strip()
    cfg = compose_config(overrides)
    device = resolve_device(str(cfg.device))
    torch.manual_seed(int(cfg.seed))
    fed = load_federation(cfg, torch.device("cpu"))
    params = sum(v.numel() for v in build_model(cfg.model, fed.input_shape, fed.num_classes)
                 .state_dict().values())
    print(f"\n{model}: {params / 1e6:.2f}M values, {device.type}, {len(fed.clients)} clients, "
          f"{args.rounds} rounds, deterministic={cfg.deterministic}, overrides {overrides!r}", flush=True)
    plain, pf = interleaved(overrides)
    out = {"model": model, "plain": _median([r["wall"] for r in plain]),
           "in_process": _median([r["wall"] for r in pf]), "gb": _median([r["bytes"] for r in pf]) / 1e9}
    for name, rounds in (("plain loop", plain), ("pflower in-proc", pf)):
        wall, cpu = _median([r["wall"] for r in rounds]), _median([r["cpu"] for r in rounds])
        compute = _median([r["compute_wall"] for r in rounds])
        print(f"  {name:16s} round {wall:7.3f} s (CPU {cpu:7.3f}) | train+eval {compute:7.3f} s | "
              f"outside {_outside(rounds, 'wall'):6.3f} s (CPU {_outside(rounds, 'cpu'):6.3f}) | "
              f"acc {rounds[-1]['accuracy']:.4f}", flush=True)
    outside = _outside(pf, "wall")
    out["data_path"] = outside - _outside(plain, "wall")
    out["data_path_cpu"] = _outside(pf, "cpu") - _outside(plain, "cpu")
    out["gbps"] = out["gb"] / outside
    out["gbps_cpu"] = out["gb"] / _outside(pf, "cpu")
    print(f"  data path        {out['data_path']:6.3f} s a round (CPU {out['data_path_cpu']:6.3f} s): "
          f"pflower's time outside training less the plain loop's | {out['gb']:.3f} GB moved a round, "
          f"{out['gbps']:5.2f} GB/s outside training (CPU time: {out['gbps_cpu']:5.2f}) | in-process "
          f"{out['in_process'] / out['plain']:5.2f}x plain", flush=True)
    if args.flwr:
        gpus = args.gpus if device.type == "cuda" else 0.0
        with tempfile.TemporaryDirectory(prefix="pflower-gpu-") as tmp:
            fl = flwr_run(overrides, len(fed.clients), gpus, home, Path(tmp, model))
        out["flwr"] = _median(fl["rounds"])
        print(f"  flwr run         round {out['flwr']:7.3f} s | start-up {fl['startup']:6.1f} s | "
              f"{out['flwr'] / out['plain']:5.2f}x plain | acc {fl['accuracy']:.4f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model configs")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    parser.add_argument("--flwr", action="store_true", help="also run each model through flwr run")
    parser.add_argument("--gpus", type=float, default=0.2, help="GPU per ClientApp in flwr run (CUDA)")
    args = parser.parse_args()
    print(f"bench/gpu.py: torch {torch.__version__}, {os.cpu_count()} CPU cores, "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="pflower-gpu-home-") as home:
        try:
            for model in args.models.split(","):
                results.append(compare(model.strip(), args, Path(home)))
        finally:
            if args.flwr:
                from bench.overhead import stop_superlink

                stop_superlink(Path(home))
    print("\nmodel              plain s | in-process s (x) | flwr run s (x) | data path s (CPU) | "
          "GB/round | GB/s (CPU)")
    for r in results:
        flwr = f"{r['flwr']:7.3f} ({r['flwr'] / r['plain']:4.2f})" if "flwr" in r else "      -       "
        ratio = r["in_process"] / r["plain"]
        print(f"{r['model']:18s} {r['plain']:7.3f} | {r['in_process']:7.3f} ({ratio:4.2f}) | {flwr} | "
              f"{r['data_path']:7.3f} ({r['data_path_cpu']:6.3f}) | {r['gb']:8.3f} | {r['gbps']:5.2f} "
              f"({r['gbps_cpu']:5.2f})")
    print(f"(medians of rounds 2..{args.rounds}; load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
