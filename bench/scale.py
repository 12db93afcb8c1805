"""Scale: seconds per round and memory per client with 100 and with 1,000 clients.

Both federations are ``dataset=mnist5k`` (5,000 real MNIST digits, 28x28) split ``iid``,
``model=mlp`` (784-200-10), ``strategy=ditto`` (every client that trains keeps a personal
model in its personal state), 10 clients sampled a round, and 10 clients evaluated a round
(``eval_fraction`` = 10 / clients: a fixed seeded sample). ``dataset.test_fraction=0.5`` so
that each of 1,000 clients gets test samples (2 or 3 train and test samples each; 25 each
with 100 clients). Each sampled client does the same work in both runs: ``batch_size=3``
and as many local (and personal) epochs as make about 9 SGD steps (1 epoch of 25 samples
with 100 clients, 9 epochs of 2 to 3 samples with 1,000).

How it runs: the real ServerApp strategy (``PFLStrategy.start``'s round loop: sampling,
per-client messages, reply validation, aggregation, checkpoints off) drives the real
ClientApp handlers (``client_app.train`` / ``evaluate``) in this one process through
``tests/fake_grid.py``'s ``FakeGrid``: every client has its own Flower ``Context`` whose
``state`` holds its personal state, as a SuperNode's does. Flower's transport (SuperLink,
Ray) is not in this measurement: ``bench/overhead.py`` measures that for 10 clients, and
``--flwr`` here adds ``flwr run`` simulation timings (1 CPU per ClientApp, as
``pflower-sim``) for the same jobs.

Memory: the process's resident set size (RSS) after the warm-up round and after the last,
divided by the number of clients that gained a personal state in between, against the bytes
of one client's personal model. Clients trained twice or more keep two versions of their
state (the previous round's, for resume: see ``task/state.py``); the script counts those.

    .venv/bin/python bench/scale.py [--rounds 20] [--clients 100 1000] [--flwr]
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
from task.config import compose_config  # noqa: E402
from task.data import load_federation  # noqa: E402
from task.params import model_state, num_bytes  # noqa: E402
from tests.fake_grid import FakeGrid  # noqa: E402

SAMPLED = 10
STEPS = 9
BATCH = 3


def overrides_for(clients: int, rounds: int, extra: str = "") -> str:
    """The job: ditto on mnist5k/iid, 10 sampled and 10 evaluated clients, ~9 steps each."""
    base = (f"strategy=ditto dataset=mnist5k dataset.test_fraction=0.5 partition=iid "
            f"partition.num_clients={clients} model=mlp device=cpu num_rounds={rounds} seed=0 "
            f"batch_size={BATCH} fraction_train={SAMPLED / clients} eval_fraction={SAMPLED / clients}")
    cfg = compose_config(base)
    fed = load_federation(cfg, torch.device("cpu"))
    mean_train = statistics.mean(c.num_train for c in fed.clients)
    epochs = max(1, round(STEPS / math.ceil(mean_train / BATCH)))
    return f"{base} local_epochs={epochs} strategy.personal_epochs={epochs} {extra}".strip()


def rss_bytes() -> int:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def state_summary(grid: FakeGrid) -> tuple[int, int, int]:
    """(clients with a personal state, of them with two versions, bytes held in all states)."""
    with_state = two = total = 0
    for context in grid.contexts.values():
        records = context.state.array_records
        if records:
            with_state += 1
            two += sum(1 for k in records if k.endswith(".prev")) > 0
            total += sum(r.count_bytes() for r in records.values())
    return with_state, two, total


def in_process(clients: int, rounds: int) -> dict:
    """The job through FakeGrid; per-round seconds, memory, and one full evaluation's cost."""
    overrides = overrides_for(clients, rounds)
    cfg = compose_config(overrides)
    fed = load_federation(cfg, torch.device("cpu"))
    torch.set_num_threads(max(1, int(cfg.client_threads)))
    strategy = server_app.build_strategy(cfg, fed)
    began = time.perf_counter()
    grid = FakeGrid(clients, overrides)
    strategy.discover(grid, 60.0)
    discover_s = time.perf_counter() - began
    seconds, sampled, evaluated = [], [], []
    rss_start = None
    for server_round in range(1, rounds + 1):
        row = strategy.run_round(grid, server_round, 600.0, evaluate=True)
        seconds.append(row["seconds"])
        sampled.append(row["sampled_clients"])
        evaluated.append(row.get("evaluated_clients", 0))
        if server_round == 1:
            rss_start, states_start = rss_bytes(), state_summary(grid)
    rss_end, states_end = rss_bytes(), state_summary(grid)
    personal = num_bytes(model_state(strategy_model(cfg, fed)))
    # What evaluating every client once costs (eval_fraction=1), for the record.
    strategy.eval_clients = lambda: sorted(strategy.clients)
    t0 = time.perf_counter()
    strategy.run_round(grid, rounds + 1, 600.0, evaluate=True)
    full_round = time.perf_counter() - t0
    new_states = states_end[0] - states_start[0]
    return {
        "clients": clients, "overrides": overrides, "discover_s": discover_s,
        "round_s": seconds, "sampled": sampled, "evaluated": evaluated,
        "median_round_s": statistics.median(seconds[1:] or seconds),
        "full_eval_round_s": full_round,
        "personal_bytes": personal,
        "rss_growth": rss_end - rss_start, "new_states": new_states,
        "with_state": states_end[0], "two_versions": states_end[1], "state_bytes": states_end[2],
        "train_samples": statistics.mean(c.num_train for c in fed.clients),
    }


def strategy_model(cfg, fed):
    from task.models import build_model

    return build_model(cfg.model, fed.input_shape, fed.num_classes)


def through_flwr(clients: int, rounds: int, home: Path, out: Path) -> dict:
    """The same job through ``flwr run`` simulation (server-side seconds per round)."""
    from bench.overhead import flwr_run

    overrides = overrides_for(clients, rounds)
    began = time.perf_counter()
    res = flwr_run(overrides, clients, home, out, (39191, 39193))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"total_s": time.perf_counter() - began, "round_s": res["rounds"],
            "median_round_s": statistics.median(res["rounds"][1:] or res["rounds"]),
            "evaluated": [r.get("evaluated_clients") for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--flwr", action="store_true", help="also time `flwr run` simulation")
    args = parser.parse_args()
    print(f"Scale: ditto, mnist5k iid, mlp, {SAMPLED} sampled + {SAMPLED} evaluated clients a round, "
          f"~{STEPS} SGD steps of batch {BATCH} per sampled client, {args.rounds} rounds, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__}", flush=True)
    print("in-process (real strategy + real ClientApp handlers through FakeGrid; no SuperLink, no Ray):")
    results = []
    for n in args.clients:
        r = in_process(n, args.rounds)
        results.append(r)
        per_client = r["rss_growth"] / max(r["new_states"], 1)
        print(f"  {n:5d} clients: {r['median_round_s']:.3f} s/round (median of rounds 2..{args.rounds}; "
              f"round 1 {r['round_s'][0]:.3f} s) | identity query of all clients {r['discover_s']:.2f} s | "
              f"a round evaluating all {n} clients {r['full_eval_round_s']:.2f} s", flush=True)
        print(f"        memory: RSS +{r['rss_growth'] / 2**20:.1f} MiB for {r['new_states']} new personal "
              f"states = {per_client / 2**10:.0f} KiB per client vs personal model "
              f"{r['personal_bytes'] / 2**10:.0f} KiB: {per_client / r['personal_bytes']:.2f}x | "
              f"{r['with_state']} clients hold state ({r['two_versions']} with two versions), "
              f"{r['state_bytes'] / max(r['with_state'], 1) / r['personal_bytes']:.2f}x per client "
              f"in context.state", flush=True)
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"  ratio s/round {b['clients']} / {a['clients']} clients: "
              f"{b['median_round_s'] / a['median_round_s']:.2f} (target <= 1.2)")
    if args.flwr:
        from bench.overhead import stop_superlink

        print("flwr run simulation (1 CPU per ClientApp; server-side seconds per round):")
        with tempfile.TemporaryDirectory(prefix="pflower-scale-") as tmp:
            home = Path(tmp, "flwr_home")
            try:
                sims = []
                for n in args.clients:
                    s = through_flwr(n, args.rounds, home, Path(tmp, f"run{n}"))
                    sims.append(s)
                    print(f"  {n:5d} clients: {s['median_round_s']:.3f} s/round (median of rounds "
                          f"2..{args.rounds}; round 1 {s['round_s'][0]:.2f} s) | whole command "
                          f"{s['total_s']:.1f} s", flush=True)
                if len(sims) >= 2:
                    print(f"  ratio s/round {args.clients[-1]} / {args.clients[0]} clients: "
                          f"{sims[-1]['median_round_s'] / sims[0]['median_round_s']:.2f}")
            finally:
                stop_superlink(home)


if __name__ == "__main__":
    main()
