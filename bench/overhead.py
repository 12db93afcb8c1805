"""Flower's overhead: the same FedAvg job through ``flwr run`` simulation and as a plain loop.

Side by side in one run, on the default federation (``strategy=fedavg``, built-in digits,
10 clients, ``digit_cnn_small``):

- ``flwr``: ``flwr run`` in simulation, 10 SuperNodes with 1 CPU each (as ``pflower-sim``
  launches it), against a local SuperLink in a temporary FLWR_HOME on its own ports; the
  SuperLink and everything it spawned is stopped afterwards. Per-round times are the
  server's own (``seconds`` in metrics.jsonl); start-up is the command's wall time less
  the rounds.
- ``plain``: one Python process, the same work with the same ``task/`` modules: the same
  federation tensors, ``build_model`` under the same seed, the same client sampling,
  ``train_epochs`` with the same per-(client, round) generators, the same sample-weighted
  mean (clients in id order), and every client's evaluation of the global model on its own
  test split after every round (``eval_every=1``, as the real run). Clients run one after
  another with ``client_threads`` torch threads (1, as each ClientApp in simulation) and,
  with ``--all-cores``, with all the machine's cores.

Both must reach the same accuracies (the plain loop with one thread reproduces the
simulation's arithmetic); the script prints the last round's mean personal accuracy of
each. Usage:

    .venv/bin/python bench/overhead.py [--rounds 20] [--overrides "local_epochs=2"] [--repeats 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from task.config import compose_config  # noqa: E402
from task.data import load_federation  # noqa: E402
from task.models import build_model  # noqa: E402
from task.params import load_partial, model_state, weighted_mean  # noqa: E402
from task.training import evaluate, step_generator, train_epochs  # noqa: E402


# --------------------------------------------------------------------------- plain loop
def plain_run(overrides: str, threads: int) -> dict:
    """The FedAvg job as a plain PyTorch loop; returns per-round seconds and accuracies."""
    began = time.perf_counter()
    cfg = compose_config(overrides)
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    fed = load_federation(cfg, device)
    seed = int(cfg.seed)
    torch.manual_seed(seed)
    model = build_model(cfg.model, fed.input_shape, fed.num_classes).to(device)
    global_state = model_state(model)
    initial = model_state(model)
    rng = np.random.default_rng(seed)
    n = len(fed.clients)
    size = max(1, min(n, round(float(cfg.fraction_train) * n)))
    rounds, cpu, acc = [], [], None
    startup = time.perf_counter() - began
    for server_round in range(1, int(cfg.num_rounds) + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        sampled = sorted(int(c) for c in rng.choice(n, size=size, replace=False))
        states, weights = [], []
        for cid in sampled:
            data = fed.clients[cid]
            load_partial(model, initial)
            load_partial(model, global_state)
            train_epochs(model, data.x_train, data.y_train, epochs=int(cfg.local_epochs),
                         batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                         gen=step_generator(seed, cid, server_round, 0))
            states.append(model_state(model))
            weights.append(data.num_train)
        global_state.update(weighted_mean(states, weights))
        if server_round % int(cfg.eval_every) == 0 or server_round == int(cfg.num_rounds):
            accs = []
            for data in fed.clients:
                load_partial(model, initial)
                load_partial(model, global_state)
                accs.append(evaluate(model, data.x_test, data.y_test)[1])
            acc = float(np.mean(accs))
        rounds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"total": time.perf_counter() - began, "startup": startup, "rounds": rounds, "cpu": cpu,
            "accuracy": acc}


# --------------------------------------------------------------------------- in-process
def fakegrid_run(overrides: str, threads: int) -> dict:
    """pflower's own code without Flower's transport: the real strategy's round loop drives the
    real ClientApp handlers in this process (``tests/fake_grid.py``), one client at a time."""
    import server_app
    from tests.fake_grid import FakeGrid

    began = time.perf_counter()
    cfg = compose_config(overrides)
    torch.set_num_threads(threads)
    fed = load_federation(cfg, torch.device("cpu"))
    strategy = server_app.build_strategy(cfg, fed)
    grid = FakeGrid(len(fed.clients), overrides)
    strategy.discover(grid, 60.0)
    startup = time.perf_counter() - began
    rounds, cpu, acc = [], [], None
    num_rounds = int(cfg.num_rounds)
    for server_round in range(1, num_rounds + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate = server_round % int(cfg.eval_every) == 0 or server_round == num_rounds
        row = strategy.run_round(grid, server_round, 600.0, evaluate)
        rounds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if row["personalized_accuracy"]:
            acc = row["personalized_accuracy"]["mean"]
    return {"total": time.perf_counter() - began, "startup": startup, "rounds": rounds, "cpu": cpu,
            "accuracy": acc}


# --------------------------------------------------------------------------- flwr run
def _pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def stop_superlink(flwr_home: Path) -> None:
    """Kill the SuperLink started under ``flwr_home`` with its process group and children."""
    for pid in _pids(f"flower-superlink.*{flwr_home}"):
        for target in [pid, *_pids(f"--parent-pid {pid}")]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(target), signal.SIGKILL)


def flwr_run(overrides: str, clients: int, flwr_home: Path, out: Path, ports: tuple[int, int]) -> dict:
    """The FedAvg job through ``flwr run`` (simulation); returns per-round seconds and accuracy."""
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
           "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(ports[0]),
           "FLWR_LOCAL_CONTROL_API_PORT": str(ports[1])}
    run_config = f'overrides="{overrides} output_dir={out}"'
    cmd = [str(Path(bindir, "flwr")), "run", str(ROOT), "--stream",
           "--run-config", run_config, "--federation-config",
           f"num-supernodes={clients} client-resources-num-cpus=1"]
    began = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    total = time.perf_counter() - began
    if proc.returncode != 0 or not (out / "metrics.jsonl").exists():
        sys.exit(f"flwr run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = rows[-1]["personalized_accuracy"]["mean"]
    rounds = [r["seconds"] for r in rows]
    return {"total": total, "startup": total - sum(rounds), "rounds": rounds, "accuracy": acc}


# --------------------------------------------------------------------------- report
def _med(values: list[float]) -> float:
    return statistics.median(values[1:] or values)


def describe(name: str, r: dict, base: dict | None) -> str:
    later = r["rounds"][1:] or r["rounds"]
    per = statistics.median(later)
    line = (f"  {name:28s} total {r['total']:7.2f} s | start-up {r['startup']:6.2f} s | "
            f"round 1 {r['rounds'][0]:6.3f} s | rounds 2..: median {per:6.3f} s, "
            f"mean {statistics.mean(later):6.3f} s | final mean acc {r['accuracy']:.4f}")
    if "cpu" in r:
        c = statistics.median(r["cpu"][1:] or r["cpu"])
        line += f"\n  {'':28s} CPU time of this process: rounds 2..: median {c:6.3f} s"
    if base is not None:
        bper = statistics.median(base["rounds"][1:] or base["rounds"])
        line += (f"\n  {'':28s} ratio to flwr: total {base['total'] / r['total']:5.2f} | "
                 f"rounds {sum(base['rounds']) / sum(r['rounds']):5.2f} | median round {bper / per:5.2f}")
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides")
    parser.add_argument("--repeats", type=int, default=1, help="alternate flwr/plain this many times")
    parser.add_argument("--ports", default="39191,39193", help="SuperLink HTTP and Control API ports")
    parser.add_argument("--skip-flwr", action="store_true")
    parser.add_argument("--in-process", action="store_true",
                        help="also run pflower's strategy and ClientApp handlers in this process (FakeGrid, "
                             "no Flower transport): pflower's own overhead over the plain loop")
    parser.add_argument("--all-cores", action="store_true",
                        help="also run the plain loop with torch using every core (unreliable when "
                             "other processes load the machine: its threads then wait on each other)")
    args = parser.parse_args()
    overrides = f"strategy=fedavg num_rounds={args.rounds} device=cpu {args.overrides}".strip()
    cfg = compose_config(overrides)
    clients = len(load_federation(cfg, torch.device("cpu")).clients)
    ports = tuple(int(p) for p in args.ports.split(","))
    threads_all = os.cpu_count() or 1
    print(f"FedAvg overhead: {cfg.dataset.name}, {clients} clients, model {cfg.model.name}, "
          f"{args.rounds} rounds, local_epochs {cfg.local_epochs}, batch {cfg.batch_size}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, overrides {overrides!r}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pflower-overhead-") as tmp:
        home = Path(tmp, "flwr_home")
        try:
            for repeat in range(args.repeats):
                print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
                res = {}
                if not args.skip_flwr:
                    res["flwr"] = flwr_run(overrides, clients, home, Path(tmp, f"run{repeat}"), ports)
                    print(describe("flwr run (simulation)", res["flwr"], None), flush=True)
                variants = {int(cfg.client_threads) or threads_all}
                if args.all_cores:
                    variants.add(threads_all)
                for threads in sorted(variants):
                    r = plain_run(overrides, threads)
                    print(describe(f"plain loop, {threads} thread(s)", r, res.get("flwr")), flush=True)
                    if threads == (int(cfg.client_threads) or threads_all):
                        res["plain"] = r
                if args.in_process:
                    r = fakegrid_run(overrides, int(cfg.client_threads) or threads_all)
                    print(describe("in-process pflower (FakeGrid)", r, res.get("flwr")), flush=True)
                    p = res["plain"]
                    wall, cpu = _med(r["rounds"]) / _med(p["rounds"]), _med(r["cpu"]) / _med(p["cpu"])
                    print(f"  {'':28s} vs plain loop: median round {wall:5.3f} | median round CPU {cpu:5.3f}",
                          flush=True)
                torch.set_num_threads(threads_all)
        finally:
            stop_superlink(home)
    print("  (ratio = flwr / plain; 'rounds' = sum of per-round times, start-up excluded)")


if __name__ == "__main__":
    main()
