"""The robustness table of docs/clustered.md: honest clients' accuracy per method and attack.

Every job is a whole pflower run in this machine's processes: the real ServerApp round loop
driving the real ClientApp handlers through the in-process grid (``tests/fake_grid.py``), so
the numbers are those of ``pflower-sim`` with the same overrides (same seeds, same data, same
Byzantine clients) without Flower's transport, which costs ~25 s of start-up a run here.
Each job writes its usual output directory (metrics.jsonl, results.json) under ``--out``;
a job whose results.json exists is not rerun.

    python bench/prfl_attacks.py --out sweeps/prfl_attacks --jobs 2
    python bench/prfl_attacks.py --methods clustered,fedavg --attacks none,alie --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMMON = ("dataset=mnist5k model=mlp model.hidden=200 lr=0.02 momentum=0.9 batch_size=32 seed=0 "
          "attack.fraction=0.2 client_threads=1")
PARTITIONS = {"relabel": "partition=relabel partition.num_clusters=4", "iid": "partition=iid"}
METHODS = {
    "clustered": "strategy=clustered strategy.mode=robust",
    "clustered_paper": "strategy=clustered strategy.mode=paper",
    "clustered_per_client": "strategy=clustered_per_client strategy.mode=robust",
    "clustered_per_client_paper": "strategy=clustered_per_client strategy.mode=paper",
    "fedavg": "strategy=fedavg",
    "ifca": "strategy=ifca",
    "local": "strategy=local",
    "oracle": "strategy=clustered strategy.oracle=true",
    "oracle_tc": "strategy=clustered strategy.mode=robust strategy.oracle=tc",
}
ATTACKS = ("none", "gaussian", "bitflip", "signflip", "labelflip", "alie", "ipm")


def overrides(method: str, attack: str, partition: str, clients: int, rounds: int, out: Path) -> str:
    return (f"{COMMON} {PARTITIONS[partition]} partition.num_clients={clients} num_rounds={rounds} "
            f"{METHODS[method]} attack={attack} output_dir={out}")


def run_job(method: str, attack: str, partition: str, clients: int, rounds: int,
            out: Path) -> tuple[str, str, float]:
    """One whole run in this process; returns (method, attack, seconds)."""
    from flwr.app import Context, RecordDict

    import server_app
    from tests.fake_grid import FakeGrid

    began = time.perf_counter()
    full = overrides(method, attack, partition, clients, rounds, out)
    server_app.main(FakeGrid(clients, full), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                     run_config={"overrides": full}))
    return method, attack, time.perf_counter() - began


def final_row(out: Path) -> dict | None:
    """The last metrics row of a finished job, or None."""
    if not (out / "results.json").exists():
        return None
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])


def cell(row: dict | None, free: dict | None) -> str:
    if row is None:
        return ""
    acc = row["personalized_accuracy"]["mean"]
    text = f"{acc:.3f}"
    if free is not None and free is not row:
        text += f" ({100 * (acc - free['personalized_accuracy']['mean']):+.1f})"
    if row.get("cluster_ari") is not None:
        text += f", ARI {row['cluster_ari']:.2f}"
    return text


def table(out: Path, methods: list[str], attacks: list[str]) -> str:
    """Markdown: a row per attack, a column per method; in brackets the change in points
    against the method's attack-free run."""
    return "\n".join(table_of({m: {a: out / f"{m}-{a}" for a in attacks} for m in methods}, attacks))


def table_of(columns: dict[str, dict[str, Path]], attacks: list[str]) -> list[str]:
    """The table's lines from run folders: ``columns[label][attack]`` is the folder of that
    column's run under that attack (any run folder: this script's or a pflower-sweep job's);
    a missing or unfinished run leaves its cell empty."""
    rows = {(label, a): final_row(runs[a]) if a in runs else None
            for label, runs in columns.items() for a in attacks}
    lines = ["| attack | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for a in attacks:
        cells = [cell(rows[label, a], rows.get((label, "none"))) for label in columns]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "sweeps" / "prfl_attacks")
    parser.add_argument("--methods", default="clustered_paper,clustered,oracle,fedavg")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--partition", choices=sorted(PARTITIONS), default="relabel",
                        help="relabel: K = 4 label-permuted clusters; iid: one population (shows "
                             "what each attack does to a method that has nothing to personalise)")
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one core each)")
    args = parser.parse_args()
    methods, attacks = args.methods.split(","), args.attacks.split(",")
    unknown = [m for m in methods if m not in METHODS] + [a for a in attacks if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown {unknown}; methods: {sorted(METHODS)}, attacks: {list(ATTACKS)}")
    todo = [(m, a) for m in methods for a in attacks if final_row(args.out / f"{m}-{a}") is None]
    done = len(methods) * len(attacks) - len(todo)
    print(f"{len(todo)} runs to do, {done} already in {args.out}", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, m, a, args.partition, args.clients, args.rounds,
                               args.out / f"{m}-{a}") for m, a in todo]
        for future in futures:
            method, attack, seconds = future.result()
            print(f"done {method} {attack} in {seconds:.0f} s", flush=True)
    print(f"\n{args.clients} clients, {args.rounds} rounds; {COMMON} {PARTITIONS[args.partition]}\n")
    print(table(args.out, methods, attacks))


if __name__ == "__main__":
    main()
