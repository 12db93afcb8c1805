"""clustered's robustness over seeds, learning rates and local momentum (docs/clustered.md).

Every job is a whole pflower run in this process (the real ServerApp round loop and ClientApp
handlers over tests/fake_grid.py's in-process grid), at pflower's defaults but for the grid's
keys: mnist5k, relabel K = 4 of 40 clients, MLP, 10 rounds. A job whose results.json exists is
not rerun; the table is printed from what is there.

    python bench/clustered_grid.py --out sweeps/clustered_grid
    python bench/clustered_grid.py --modes paper --seeds 0 --lrs 0.05 --momenta 0 --attacks signflip
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = ("strategy=clustered dataset=mnist5k partition=relabel partition.num_clients=40 "
        "partition.num_clusters=4 model=mlp attack.fraction=0.2 client_threads=1")
MODES = {"paper": "strategy.mode=paper", "robust": "strategy.mode=robust",
         "oracle": "strategy.oracle=true"}


def job_name(mode: str, attack: str, lr: str, momentum: str, seed: int) -> str:
    return f"{mode}-{attack}-lr{lr}-m{momentum}-s{seed}"


def run_job(overrides: str, out: Path, clients: int) -> float:
    """One whole run in this process; returns its seconds."""
    from flwr.app import Context, RecordDict

    import server_app
    from tests.fake_grid import FakeGrid

    began = time.perf_counter()
    full = f"{overrides} output_dir={out}"
    server_app.main(FakeGrid(clients, full), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                     run_config={"overrides": full}))
    return time.perf_counter() - began


def rows_of(out: Path) -> list[dict] | None:
    if not (out / "results.json").exists():
        return None
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def summary(root: Path, mode: str, lr: str, momentum: str, seeds: list[int]) -> str:
    """Mean over seeds of: attack-free accuracy, signflip accuracy, the drop in points,
    round-1 and final ARI under signflip (and the worst seed's drop)."""
    free = [rows_of(root / job_name(mode, "none", lr, momentum, s)) for s in seeds]
    hit = [rows_of(root / job_name(mode, "signflip", lr, momentum, s)) for s in seeds]
    if any(r is None for r in free + hit):
        return f"| {mode} | {lr} | {momentum} | (not run) | | | | |"
    acc0 = [r[-1]["personalized_accuracy"]["mean"] for r in free]
    acc1 = [r[-1]["personalized_accuracy"]["mean"] for r in hit]
    drops = [100 * (b - a) for a, b in zip(acc0, acc1, strict=True)]
    ari1 = [r[0].get("cluster_ari") for r in hit]
    ari = [r[-1].get("cluster_ari") for r in hit]
    free_ari = [r[-1].get("cluster_ari") for r in free]

    def m(xs):
        return statistics.mean(xs)
    return (f"| {mode} | {lr} | {momentum} | {m(acc0):.3f} (ARI {m(free_ari):.2f}) | {m(acc1):.3f} | "
            f"{m(drops):+.1f} (worst {min(drops):+.1f}) | {m(ari1):.2f} | "
            f"{m(ari):.2f} (min {min(ari):.2f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "sweeps" / "clustered_grid")
    parser.add_argument("--modes", default="paper,robust")
    parser.add_argument("--attacks", default="none,signflip")
    parser.add_argument("--lrs", default="0.05,0.02")
    parser.add_argument("--momenta", default="0,0.9")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--extra", default="", help="more overrides for every job (e.g. model.hidden=64)")
    args = parser.parse_args()
    modes, attacks = args.modes.split(","), args.attacks.split(",")
    lrs, momenta = args.lrs.split(","), args.momenta.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    for mode, lr, mom, seed, attack in itertools.product(modes, lrs, momenta, seeds, attacks):
        out = args.out / job_name(mode, attack, lr, mom, seed)
        if rows_of(out) is not None:
            continue
        overrides = (f"{BASE} {MODES[mode]} partition.num_clients={args.clients} num_rounds={args.rounds} "
                     f"lr={lr} momentum={mom} seed={seed} attack={attack} {args.extra}")
        print(f"{out.name}: {run_job(overrides, out, args.clients):.0f} s", flush=True)
    print(f"\n{BASE} partition.num_clients={args.clients} num_rounds={args.rounds} {args.extra}; "
          f"seeds {seeds}; mean over seeds\n")
    print("\n".join(table(args.out, modes, lrs, momenta, seeds)))


def table(root: Path, modes: list[str], lrs: list[str], momenta: list[str], seeds: list[int]) -> list[str]:
    """The markdown table's lines: one row per (mode, lr, momentum), from the jobs under ``root``."""
    header = ["| mode | lr | momentum | attack-free acc | signflip acc | change (points) | round-1 ARI "
              "| final ARI |", "|---|---|---|---|---|---|---|---|"]
    return header + [summary(root, mode, lr, mom, seeds)
                     for mode, lr, mom in itertools.product(modes, lrs, momenta)]


if __name__ == "__main__":
    main()
