"""Scale: seconds per round and memory per client with 100, 1,000 and 10,000 clients.

Every federation is ``dataset=fashion_mnist`` (60,000 + 10,000 real images, 28x28; the IDX
files in ``data/FashionMNIST/raw``) split ``iid``, ``model=mlp`` (784-200-10, 621 KiB),
``strategy=ditto`` (every client that trains keeps a personal model v in its personal
state), 10 clients sampled a round and 10 evaluated a round (``fraction_train`` and
``eval_fraction`` = 10 / clients; the evaluated ones are a fixed seeded sample). Each sampled
client does the same work in every federation: 12 SGD steps of its global model and 12 of its
personal model (100 clients: 600 samples each, 1 epoch of batch 50; 1,000: 60 samples, batch
5; 10,000: 6 samples, 2 epochs of batch 1).

Personal state (``--state``): ``disk`` (default) keeps it in ``client_state_dir`` only (a
temporary folder), ``memory`` in Flower's ``context.state`` (no ``client_state_dir``).

Two measurements:

- **in one process** (always): the real strategy's round loop (``Engine.run_round``:
  sampling, per-client messages, validation, aggregation) drives the real ClientApp handlers
  through ``tests/fake_grid.py``, every client with its own Flower ``Context``. No SuperLink, no
  Ray. Memory: the process's RSS (after ``malloc_trim``) after round 1 and after the last, per
  client that gained a personal state in between, against one personal model's bytes; and
  the state folder's bytes per client;
- **``flwr run`` simulation** (``--flwr``): ``--nodes`` SuperNodes (default one per client;
  fewer host several clients each), 2 ClientApp actors of 1 CPU, as ``pflower-sim``:
  server-side seconds per round, and the peak resident memory of the simulation process
  (ServerApp, Flower's engine with every node's Context, the in-memory LinkState, the Ray
  driver) and of it with everything it spawned (Ray's daemons and the 2 actors), sampled
  every 0.5 s.

    .venv/bin/python bench/scale.py [--rounds 20] [--clients 100 1000 10000] [--state disk]
        [--flwr] [--nodes N ...] [--skip-in-process] [--engine-sweep]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import server_app  # noqa: E402
from bench.overhead import Watcher, _pids, descendants  # noqa: E402
from task.core.params import model_state, num_bytes  # noqa: E402
from task.data.load import load_federation  # noqa: E402
from task.engine.rounds import Engine  # noqa: E402
from task.run.config import compose_config  # noqa: E402
from tests.fake_grid import FakeGrid  # noqa: E402

SAMPLED = 10
STEPS = 12


def overrides_for(clients: int, rounds: int, state_dir: Path | None) -> str:
    """The job: ditto on fashion_mnist/iid, 10 sampled and 10 evaluated clients, 12 steps each."""
    base = (f"strategy=ditto dataset=fashion_mnist dataset.data_root={ROOT / 'data'} partition=iid "
            f"partition.num_clients={clients} model=mlp device=cpu num_rounds={rounds} seed=0 "
            f"fraction_train={SAMPLED / clients} eval_fraction={SAMPLED / clients}")
    cfg = compose_config(base)
    fed = load_federation(cfg, torch.device("cpu"))
    per_client = statistics.mean(c.num_train for c in fed.clients)
    batch = max(1, int(per_client // STEPS))
    epochs = max(1, round(STEPS / math.ceil(per_client / batch)))
    extra = f" client_state_dir={state_dir}" if state_dir is not None else ""
    return f"{base} batch_size={batch} local_epochs={epochs} strategy.personal_epochs={epochs}{extra}"


def rss_bytes() -> int:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kib(os.getpid(), "VmRSS") * 1024


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return 0


def states_held(grid: FakeGrid, state_dir: Path | None) -> tuple[int, int, int]:
    """(clients with a personal state, bytes of it in context.state, bytes of it on disk)."""
    in_memory = sum(r.count_bytes() for c in grid.contexts.values()
                    for r in c.state.array_records.values())
    if state_dir is None:
        return sum(1 for c in grid.contexts.values() if c.state.array_records), in_memory, 0
    folders = list(state_dir.glob("client-*"))
    on_disk = sum(f.stat().st_size for d in folders for f in d.iterdir())
    return len(folders), in_memory, on_disk


def in_process(clients: int, rounds: int, state_dir: Path | None) -> dict:
    """The job through FakeGrid; per-round seconds and memory per client."""
    overrides = overrides_for(clients, rounds, state_dir)
    cfg = compose_config(overrides)
    fed = load_federation(cfg, torch.device("cpu"))
    torch.set_num_threads(max(1, int(cfg.client_threads)))
    strategy = Engine(server_app.build_strategy(cfg, fed))
    began = time.perf_counter()
    grid = FakeGrid(clients, overrides)
    strategy.discover(grid, 600.0)
    discover_s = time.perf_counter() - began
    seconds = []
    for server_round in range(1, rounds + 1):
        row = strategy.run_round(grid, server_round, 600.0, evaluate=True)
        seconds.append(row["seconds"])
        if server_round == 1:
            rss_start, held_start = rss_bytes(), states_held(grid, state_dir)
    rss_end, held_end = rss_bytes(), states_held(grid, state_dir)
    return {
        "clients": clients, "overrides": overrides, "discover_s": discover_s, "round_s": seconds,
        "median_round_s": statistics.median(seconds[1:] or seconds),
        "personal_bytes": num_bytes(model_state(strategy_model(cfg, fed))),
        "rss_growth": rss_end - rss_start, "new_states": held_end[0] - held_start[0],
        "with_state": held_end[0], "memory_bytes": held_end[1], "disk_bytes": held_end[2],
    }


def strategy_model(cfg, fed):
    from task.core.models import build_model

    return build_model(cfg.model, fed.input_shape, fed.num_classes)


class TreeMemory(Watcher):
    """Peak RSS of the run's simulation process and of it with its descendants (Ray's
    daemons and actors), sampled every 0.5 s while a ``flwr run`` lasts."""

    def __init__(self, flwr_home: Path):
        self.flwr_home = flwr_home
        self.peak_sim = self.peak_tree = 0

    def tick(self) -> None:
        for link in _pids(f"flower-superlink.*{self.flwr_home}"):
            # SuperLink -> flower-superexec -> flwr-simulation -> Ray's daemons -> actors
            for sim in [p for p in descendants([link]) if b"flwr-simulation" in _cmdline(p)]:
                tree = descendants([sim])
                self.peak_sim = max(self.peak_sim, _status_kib(sim, "VmRSS") * 1024)
                self.peak_tree = max(self.peak_tree, sum(_status_kib(p, "VmRSS") for p in tree) * 1024)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def through_flwr(clients: int, nodes: int, rounds: int, home: Path, out: Path,
                 state_dir: Path | None) -> dict:
    """The same job through ``flwr run`` simulation: server-side s/round and peak memory."""
    from bench.overhead import flwr_run

    overrides = overrides_for(clients, rounds, state_dir)
    began = time.perf_counter()
    with TreeMemory(home) as memory:
        res = flwr_run(overrides, nodes, home, out, (39191, 39193))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"total_s": time.perf_counter() - began, "round_s": res["rounds"],
            "median_round_s": statistics.median(res["rounds"][1:] or res["rounds"]),
            "evaluated": [r.get("evaluated_clients") for r in rows],
            "peak_sim": memory.peak_sim, "peak_tree": memory.peak_tree}


def engine_sweep(nodes: int) -> tuple[float, float]:
    """Flower's simulation engine with ``nodes`` SuperNodes: (seconds to register them, seconds
    of one pass of its message pickup, ``vce_api.add_messages_to_queue``, with no message
    waiting). The pickup asks the in-memory LinkState for each node's messages every 100 ms,
    and each ask scans every stored message: O(nodes x stored messages) per pass."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    began = time.perf_counter()
    mapping = _register_nodes(nodes, factory)
    registered = time.perf_counter() - began
    state = factory.state()
    passes = []
    for _ in range(5):
        began = time.perf_counter()
        for node_id in mapping:
            state.get_message_ins(node_id=node_id, limit=1)
        passes.append(time.perf_counter() - began)
    return registered, statistics.median(passes)


def report_in_process(r: dict, rounds: int) -> None:
    per_client = r["rss_growth"] / max(r["new_states"], 1)
    print(f"  {r['clients']:6d} clients: {r['median_round_s']:.3f} s/round (median of rounds 2..{rounds}; "
          f"round 1 {r['round_s'][0]:.3f} s) | identity query of all clients {r['discover_s']:.2f} s",
          flush=True)
    print(f"         memory: RSS {r['rss_growth'] / 2**20:+.1f} MiB for {r['new_states']} new personal "
          f"states = {per_client / 2**10:.0f} KiB per client = {per_client / r['personal_bytes']:.2f}x the "
          f"personal model ({r['personal_bytes'] / 2**10:.0f} KiB) | {r['with_state']} clients hold state: "
          f"{r['memory_bytes'] / max(r['with_state'], 1) / r['personal_bytes']:.2f}x per client in "
          f"context.state, {r['disk_bytes'] / max(r['with_state'], 1) / r['personal_bytes']:.2f}x on disk",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--state", choices=("disk", "memory"), default="disk",
                        help="personal state in client_state_dir only (disk) or in context.state (memory)")
    parser.add_argument("--flwr", action="store_true", help="also time `flwr run` simulation")
    parser.add_argument("--nodes", type=int, nargs="+", default=[0],
                        help="SuperNodes for --flwr: one value, or one per --clients (0: one per client)")
    parser.add_argument("--skip-in-process", action="store_true")
    parser.add_argument("--engine-sweep", action="store_true",
                        help="also time Flower's node registration and one message pickup pass")
    args = parser.parse_args()
    print(f"Scale: ditto, fashion_mnist iid, mlp, {SAMPLED} sampled + {SAMPLED} evaluated clients a round, "
          f"{STEPS} SGD steps per model per sampled client, {args.rounds} rounds, personal state: "
          f"{args.state}, {os.cpu_count()} CPU cores, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pflower-scale-") as tmp:
        def state_dir(tag: str) -> Path | None:
            return Path(tmp, f"state-{tag}") if args.state == "disk" else None

        if not args.skip_in_process:
            print("in-process (real strategy + real ClientApp handlers through FakeGrid; no SuperLink, "
                  "no Ray):")
            results = [in_process(n, args.rounds, state_dir(f"ip{n}")) for n in args.clients]
            for r in results:
                report_in_process(r, args.rounds)
            if len(results) >= 2:
                print(f"  ratio s/round {results[-1]['clients']} / {results[0]['clients']} clients: "
                      f"{results[-1]['median_round_s'] / results[0]['median_round_s']:.2f} (target <= 1.2)")
        if args.engine_sweep:
            print("Flower's simulation engine (in-memory LinkState, no message waiting):")
            for n in args.clients:
                registered, sweep = engine_sweep(n)
                print(f"  {n:6d} SuperNodes: registering {registered:.2f} s | one message pickup pass "
                      f"{sweep * 1000:.1f} ms (repeated every 100 ms for the whole run)", flush=True)
        if args.flwr:
            run_flwr(args, Path(tmp), state_dir)


def run_flwr(args, tmp: Path, state_dir) -> None:
    from bench.overhead import stop_superlink

    print("flwr run simulation (2 actors of 1 CPU; server-side seconds per round):", flush=True)
    home = tmp / "flwr_home"
    sims = []
    try:
        per_run = args.nodes if len(args.nodes) == len(args.clients) else args.nodes[:1] * len(args.clients)
        for n, wanted in zip(args.clients, per_run, strict=True):
            nodes = wanted or n
            s = through_flwr(n, nodes, args.rounds, home, tmp / f"run{n}", state_dir(f"flwr{n}"))
            sims.append(s)
            print(f"  {n:6d} clients on {nodes} SuperNodes: {s['median_round_s']:.3f} s/round (median of "
                  f"rounds 2..{args.rounds}; round 1 {s['round_s'][0]:.2f} s) | whole command "
                  f"{s['total_s']:.1f} s | peak RSS: simulation process {s['peak_sim'] / 2**20:.0f} MiB, "
                  f"with Ray and the actors {s['peak_tree'] / 2**20:.0f} MiB | load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
        if len(sims) >= 2:
            ratio = sims[-1]["median_round_s"] / sims[0]["median_round_s"]
            added = (sims[-1]["peak_sim"] - sims[0]["peak_sim"]) / (args.clients[-1] - args.clients[0])
            print(f"  ratio s/round {args.clients[-1]} / {args.clients[0]} clients: {ratio:.2f} "
                  f"(target <= 1.2); simulation process memory per added client: {added / 2**10:.1f} KiB")
    finally:
        stop_superlink(home)


if __name__ == "__main__":
    main()
