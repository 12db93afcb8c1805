"""Flower's overhead: the same FedAvg job through ``flwr run`` simulation and as plain loops.

Side by side in one run, on the default federation (``strategy=fedavg``, built-in digits,
10 clients, ``digit_cnn_small``; ``--overrides model=digit_cnn`` for a longer client step):

- ``flwr``: ``flwr run`` in simulation, 10 SuperNodes, 2 ClientApp actors with 1 CPU each (as
  ``pflower-sim`` launches it on 2 cores), against a local SuperLink in a temporary FLWR_HOME
  on its own ports; the SuperLink and everything it spawned is stopped afterwards. Per-round
  times are the server's own (``seconds`` in metrics.jsonl); start-up is the command's wall
  time less the rounds. CPU time: everything the run started (SuperLink, simulation process,
  Ray's daemons, the actors), read from /proc at the end of every round.
- ``plain``: the same work with the same ``task/`` modules (federation tensors, ``build_model``
  under the same seed, the same client sampling, ``train_epochs`` with the same per-(client,
  round) generators, the same sample-weighted mean, every client's evaluation of the global
  model on its own test split every round), as
    - 1 process x 1 thread (one client after another, as before: 1 core);
    - 2 processes x 1 thread: persistent worker processes (data and model built once) train
      and evaluate disjoint halves of the clients in parallel; the main process samples and
      averages (the same cores the simulation uses, the same arithmetic);
    - 1 process x 2 threads: torch's intra-op threads.

The headline compares ``flwr run`` with the faster of the two 2-core plain loops (wall and
CPU time per round, rounds 2..) and prints Flower's fixed cost per message. All must reach
the same final accuracy; the script prints each. Usage:

    .venv/bin/python bench/overhead.py [--rounds 20] [--overrides "model=digit_cnn"] [--repeats 1]
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

from task.core.models import build_model  # noqa: E402
from task.core.params import load_partial, model_state, weighted_mean  # noqa: E402
from task.core.training import evaluate, step_generator, train_epochs  # noqa: E402
from task.data.load import load_federation  # noqa: E402
from task.run.config import compose_config  # noqa: E402


# --------------------------------------------------------------------------- plain loop
def train_clients(cfg, fed, model, initial: dict, global_state: dict, cids: list[int],
                  server_round: int) -> tuple[list[dict], list[int]]:
    """FedAvg's client step for ``cids``, one after another: (trained states, sample counts)."""
    states, weights = [], []
    for cid in cids:
        data = fed.clients[cid]
        load_partial(model, initial)
        load_partial(model, global_state)
        train_epochs(model, data.x_train, data.y_train, epochs=int(cfg.local_epochs),
                     batch_size=int(cfg.batch_size), lr=float(cfg.lr),
                     gen=step_generator(int(cfg.seed), cid, server_round, 0))
        states.append(model_state(model))
        weights.append(data.num_train)
    return states, weights


def evaluate_clients(fed, model, initial: dict, global_state: dict, cids: list[int]) -> list[float]:
    accs = []
    for cid in cids:
        data = fed.clients[cid]
        load_partial(model, initial)
        load_partial(model, global_state)
        accs.append(evaluate(model, data.x_test, data.y_test)[1])
    return accs


def client_sampler(cfg, n: int):
    """Each round's sampled clients, in the server's seeded sequence (``Engine.sample``)."""
    rng = np.random.default_rng(int(cfg.seed))
    size = max(1, min(n, round(float(cfg.fraction_train) * n)))
    return lambda: sorted(int(c) for c in rng.choice(n, size=size, replace=False))


def timed_rounds(cfg, began: float, one_round) -> dict:
    """Run ``one_round(round, evaluate) -> (accuracy or None, CPU seconds spent elsewhere)`` for
    every round; per-round wall and CPU seconds (this process's plus what it reports)."""
    rounds, cpu, acc = [], [], None
    startup = time.perf_counter() - began
    for server_round in range(1, int(cfg.num_rounds) + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        evaluate = server_round % int(cfg.eval_every) == 0 or server_round == int(cfg.num_rounds)
        score, elsewhere = one_round(server_round, evaluate)
        acc = acc if score is None else score
        rounds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0 + elsewhere)
    return {"total": time.perf_counter() - began, "startup": startup, "rounds": rounds, "cpu": cpu,
            "accuracy": acc}


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
    n = len(fed.clients)
    sample = client_sampler(cfg, n)

    def one_round(server_round: int, evaluate: bool) -> tuple[float | None, float]:
        states, weights = train_clients(cfg, fed, model, initial, global_state, sample(), server_round)
        global_state.update(weighted_mean(states, weights))
        if not evaluate:
            return None, 0.0
        return float(np.mean(evaluate_clients(fed, model, initial, global_state, list(range(n))))), 0.0

    return timed_rounds(cfg, began, one_round)


# Each worker process of the parallel plain loop: its own copy of the federation and model.
_WORKER: dict = {}


def _worker_init(overrides: str) -> None:
    torch.set_num_threads(1)
    cfg = compose_config(overrides)
    fed = load_federation(cfg, torch.device("cpu"))
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg.model, fed.input_shape, fed.num_classes)
    _WORKER.update(cfg=cfg, fed=fed, model=model, initial=model_state(model))


def _worker_train(job: tuple[dict, list[int], int]) -> tuple[list[dict], list[int], float]:
    began = time.process_time()
    w = _WORKER
    states, weights = train_clients(w["cfg"], w["fed"], w["model"], w["initial"], *job)
    return states, weights, time.process_time() - began


def _worker_evaluate(job: tuple[dict, list[int]]) -> tuple[list[float], float]:
    began = time.process_time()
    w = _WORKER
    return evaluate_clients(w["fed"], w["model"], w["initial"], *job), time.process_time() - began


def plain_parallel_run(overrides: str, workers: int) -> dict:
    """The plain loop on ``workers`` cores: persistent worker processes (1 torch thread each,
    data and model built once) train and evaluate disjoint halves of the clients; the main
    process samples and averages exactly as ``plain_run`` (same clients, same order, same
    arithmetic). CPU time counts the main process and the workers' tasks."""
    import multiprocessing

    began = time.perf_counter()
    cfg = compose_config(overrides)
    n = len(load_federation(cfg, torch.device("cpu")).clients)
    pool = multiprocessing.get_context("spawn").Pool(workers, _worker_init, (overrides,))
    try:
        pool.map(time.sleep, [0.0] * workers)  # every worker has run its initializer
        torch.manual_seed(int(cfg.seed))
        fed = load_federation(cfg, torch.device("cpu"))
        global_state = model_state(build_model(cfg.model, fed.input_shape, fed.num_classes))
        sample = client_sampler(cfg, n)

        def one_round(server_round: int, evaluate: bool) -> tuple[float | None, float]:
            sampled = sample()
            jobs = [(global_state, sampled[k::workers], server_round) for k in range(workers)]
            done = pool.map(_worker_train, jobs)
            by_cid = {c: (s, w) for (states, weights, _), job in zip(done, jobs, strict=True)
                      for c, s, w in zip(job[1], states, weights, strict=True)}
            trained = [by_cid[c] for c in sampled]
            global_state.update(weighted_mean([t[0] for t in trained], [t[1] for t in trained]))
            worker_cpu = sum(d[2] for d in done)
            if not evaluate:
                return None, worker_cpu
            scored = pool.map(_worker_evaluate, [(global_state, list(range(n))[k::workers])
                                                 for k in range(workers)])
            accuracy = float(np.mean([a for accs, _ in scored for a in accs]))
            return accuracy, worker_cpu + sum(c for _, c in scored)

        return timed_rounds(cfg, began, one_round)
    finally:
        pool.terminate()


# --------------------------------------------------------------------------- in-process
def fakegrid_run(overrides: str, threads: int) -> dict:
    """pflower's own code without Flower's transport: the real strategy's round loop drives the
    real ClientApp handlers in this process (``tests/fake_grid.py``), one client at a time."""
    import server_app
    from task.engine.rounds import Engine
    from tests.fake_grid import FakeGrid

    began = time.perf_counter()
    cfg = compose_config(overrides)
    torch.set_num_threads(threads)
    fed = load_federation(cfg, torch.device("cpu"))
    strategy = Engine(server_app.build_strategy(cfg, fed))
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


def _proc_stats() -> dict[int, list[str]]:
    """Every process's /proc/<pid>/stat fields after the command name."""
    stats = {}
    for path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stats[int(path.parent.name)] = path.read_text().rsplit(")", 1)[1].split()
    return stats


def descendants(roots: list[int], stats: dict[int, list[str]] | None = None) -> list[int]:
    """The processes ``roots`` and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, fields in (stats if stats is not None else _proc_stats()).items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _tree_cpu(roots: list[int]) -> float:
    """CPU seconds (user + system) of the processes ``roots`` and all their descendants."""
    stats = _proc_stats()
    tick = os.sysconf("SC_CLK_TCK")
    tree = [p for p in descendants(roots, stats) if p in stats]
    return sum(int(stats[p][11]) + int(stats[p][12]) for p in tree) / tick


class Watcher:
    """Calls ``tick()`` every ``period`` seconds in a thread while the ``with`` block lasts."""

    period = 0.5

    def __enter__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class RoundCPU(Watcher):
    """CPU time of everything a ``flwr run`` started (the SuperLink, the simulation process,
    Ray, the actors) at each new line of metrics.jsonl, i.e. at the end of every round."""

    period = 0.05

    def __init__(self, flwr_home: Path, metrics: Path):
        self.flwr_home, self.metrics = flwr_home, metrics
        self.at_round: list[float] = []

    def tick(self) -> None:
        with contextlib.suppress(OSError):
            lines = self.metrics.read_bytes().count(b"\n")
            if lines > len(self.at_round):
                cpu = _tree_cpu(_pids(f"flower-superlink.*{self.flwr_home}"))
                self.at_round += [cpu] * (lines - len(self.at_round))

    def per_round(self) -> list[float]:
        """CPU seconds of rounds 2.. (round 1 has no start mark)."""
        return [b - a for a, b in zip(self.at_round, self.at_round[1:], strict=False)]


def flwr_run(overrides: str, clients: int, flwr_home: Path, out: Path, ports: tuple[int, int]) -> dict:
    """The FedAvg job through ``flwr run`` (simulation); returns per-round seconds and accuracy,
    and the CPU time of rounds 2.. of everything the run started."""
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
    with RoundCPU(flwr_home, out / "metrics.jsonl") as cpu:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    total = time.perf_counter() - began
    if proc.returncode != 0 or not (out / "metrics.jsonl").exists():
        sys.exit(f"flwr run failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    acc = rows[-1]["personalized_accuracy"]["mean"]
    rounds = [r["seconds"] for r in rows]
    return {"total": total, "startup": total - sum(rounds), "rounds": rounds, "accuracy": acc,
            "cpu_later": cpu.per_round()}


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
        line += f"\n  {'':28s} CPU time (its processes): rounds 2..: median {c:6.3f} s"
    if r.get("cpu_later"):
        c = statistics.median(r["cpu_later"])
        line += f"\n  {'':28s} CPU time (SuperLink, simulation, Ray, actors): rounds 2..: median {c:6.3f} s"
    if base is not None:
        bper = statistics.median(base["rounds"][1:] or base["rounds"])
        line += (f"\n  {'':28s} ratio to flwr: total {base['total'] / r['total']:5.2f} | "
                 f"rounds {sum(base['rounds']) / sum(r['rounds']):5.2f} | median round {bper / per:5.2f}")
    return line


def engine_costs(overrides: str) -> None:
    """What Flower's simulation engine adds per message, measured piece by piece.

    - The node's ``Context`` is pickled to the actor and back with every message
      (``RayBackend.process_message``): its size and a dumps + loads each way, with an empty
      ``context.state`` (FedAvg, or any method with ``client_state_dir``: task/core/state.py) and
      with one personal model in it (Ditto, Local, FedBN without ``client_state_dir``).
    - ``ray.nodes()``: what one call costs. ``flwr run``'s backend (``BasicActorPool``) calls it
      once, when it builds the actor pool; the per-message call (``_check_actor_fits_in_pool``)
      is in ``VirtualClientEngineActorPool``, used only by the deprecated ``start_simulation``.
    - The message pickup (``vce_api.add_messages_to_queue``) passes over every node every
      100 ms: bench/scale.py --engine-sweep times one pass.
    """
    import cloudpickle
    from flwr.app import Context, RecordDict

    from task.core.params import to_record

    cfg = compose_config(overrides)
    fed = load_federation(cfg, torch.device("cpu"))
    model = build_model(cfg.model, fed.input_shape, fed.num_classes)
    for label, state in (("empty context.state", RecordDict()),
                         ("one personal model in context.state", RecordDict({"client-0.personal":
                                                                             to_record(model_state(model))}))):
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 10},
                          state=state, run_config={"overrides": overrides})
        began = time.perf_counter()
        for _ in range(20):
            blob = cloudpickle.dumps(context)
            cloudpickle.loads(blob)
        each = (time.perf_counter() - began) / 20
        print(f"  Context pickled ({label}): {len(blob) / 2**10:.0f} KiB, dumps + loads "
              f"{each * 1000:.2f} ms; x2 per message (to the actor and back): {2 * each * 1000:.2f} ms",
              flush=True)
    import ray

    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        ray.nodes()
        began = time.perf_counter()
        for _ in range(20):
            ray.nodes()
        print(f"  ray.nodes(): {(time.perf_counter() - began) / 20 * 1000:.2f} ms a call (flwr run: once per "
              f"run, not per message)", flush=True)
    finally:
        ray.shutdown()


def equal_cores_headline(flwr: dict, plain: dict, name: str, messages: int, lanes: int) -> str:
    """Flower against the plain loop on the same cores: wall and CPU ratios per round (rounds
    2..), and Flower's fixed cost per message (the difference spread over the round's messages;
    in wall time per actor: ``lanes`` actors work at once)."""
    wall_f, wall_p = _med(flwr["rounds"]), _med(plain["rounds"])
    cpu_f, cpu_p = statistics.median(flwr["cpu_later"] or [float("nan")]), _med(plain["cpu"])
    return (f"  EQUAL CORES ({lanes}): flwr run / {name}: median round wall {wall_f / wall_p:5.3f} "
            f"({wall_f:.3f} / {wall_p:.3f} s) | CPU {cpu_f / cpu_p:5.3f} ({cpu_f:.3f} / {cpu_p:.3f} s)\n"
            f"  {'':21s} Flower's fixed cost per message ({messages} a round): "
            f"{(wall_f - wall_p) * lanes / messages * 1000:.1f} ms of an actor's wall time, "
            f"{(cpu_f - cpu_p) / messages * 1000:.1f} ms CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--overrides", default="", help="extra Hydra overrides, e.g. model=digit_cnn")
    parser.add_argument("--repeats", type=int, default=1, help="alternate flwr/plain this many times")
    parser.add_argument("--ports", default="39191,39193", help="SuperLink HTTP and Control API ports")
    parser.add_argument("--skip-flwr", action="store_true")
    parser.add_argument("--plain", default="1x1,2x1,1x2",
                        help="plain loops to run, PROCESSESxTHREADS: 1x1, 2x1 (2 worker processes), 1x2")
    parser.add_argument("--engine", action="store_true",
                        help="only measure the simulation engine's per-message pieces (Context pickling, "
                             "ray.nodes())")
    parser.add_argument("--in-process", action="store_true",
                        help="also run pflower's strategy and ClientApp handlers in this process (FakeGrid, "
                             "no Flower transport): pflower's own overhead over the plain loop")
    args = parser.parse_args()
    overrides = f"strategy=fedavg num_rounds={args.rounds} device=cpu {args.overrides}".strip()
    cfg = compose_config(overrides)
    clients = len(load_federation(cfg, torch.device("cpu")).clients)
    ports = tuple(int(p) for p in args.ports.split(","))
    if args.engine:
        engine_costs(overrides)
        return
    lanes = 2  # ClientApp actors: pflower-sim gives each 1 CPU on this 2-core machine
    size = max(1, min(clients, round(float(cfg.fraction_train) * clients)))
    messages = size + clients  # a round: train the sampled clients, then every client evaluates
    print(f"FedAvg overhead: {cfg.dataset.name}, {clients} clients, model {cfg.model.name} "
          f"(width {cfg.model.get('width', 1.0)}), "
          f"{args.rounds} rounds, local_epochs {cfg.local_epochs}, batch {cfg.batch_size}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}, overrides {overrides!r}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pflower-overhead-") as tmp:
        home = Path(tmp, "flwr_home")
        try:
            for repeat in range(args.repeats):
                print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
                res = {}
                if not args.skip_flwr:
                    res["flwr"] = flwr_run(overrides, clients, home, Path(tmp, f"run{repeat}"), ports)
                    print(describe(f"flwr run ({lanes} actors x 1 CPU)", res["flwr"], None), flush=True)
                variants = {
                    "1x1": ("plain loop, 1 process x 1 thread", lambda: plain_run(overrides, 1)),
                    "2x1": (f"plain loop, {lanes} processes x 1 thread",
                            lambda: plain_parallel_run(overrides, lanes)),
                    "1x2": (f"plain loop, 1 process x {lanes} threads", lambda: plain_run(overrides, lanes)),
                }
                variants = dict(variants[k] for k in args.plain.split(","))
                for name, run in variants.items():
                    res[name] = run()
                    print(describe(name, res[name], res.get("flwr")), flush=True)
                torch.set_num_threads(lanes)
                equal = [n for n in variants if "1 process x 1 thread" not in n]
                if equal:
                    best = min(equal, key=lambda n: _med(res[n]["rounds"]))
                    print(f"  best plain PyTorch on {lanes} cores here: {best}", flush=True)
                    if "flwr" in res:
                        print(equal_cores_headline(res["flwr"], res[best], best, messages, lanes), flush=True)
                if args.in_process:
                    r = fakegrid_run(overrides, 1)
                    print(describe("in-process pflower (FakeGrid)", r, res.get("flwr")), flush=True)
                    p = res.get("plain loop, 1 process x 1 thread") or plain_run(overrides, 1)
                    wall, cpu = _med(r["rounds"]) / _med(p["rounds"]), _med(r["cpu"]) / _med(p["cpu"])
                    print(f"  {'':28s} vs plain loop (1 thread): median round {wall:5.3f} | median round "
                          f"CPU {cpu:5.3f}", flush=True)
        finally:
            stop_superlink(home)
    print(f"  (ratio = flwr / plain; 'rounds' = sum of per-round times, start-up excluded; load average now "
          f"{os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
