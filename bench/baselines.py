"""The baselines side by side on one federation, in-process: docs/baselines.md's table.

    python bench/baselines.py --rounds 20 --seeds 0 1 --out /tmp/baselines
    python bench/baselines.py --methods fedavg fedrep --rounds 2 --extra "dataset.image_size=16" \
        --set fedrep:strategy.head_epochs=2

Each run is the real ServerApp round loop and ClientApp handlers over the in-process grid
(tests/fake_grid.py), one node per client: the handlers ``flwr run`` calls, without Ray's
start-up or a network. Every run's numbers are appended to ``<out>/runs.jsonl`` (``--table``
prints the table from it, e.g. after runs made in several invocations). The table: final
mean / worst-client personalized accuracy (mean ± std over seeds), the global model's
accuracy where the method has one, MB up + down over the run and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from task.run.seed_stats import format_mean_std, mean_std  # noqa: E402 - after the path

METHODS = ("fedavg", "fedavg_ft", "local", "fedbn", "ditto", "fedper", "fedrep", "fedbabu",
           "lgfedavg", "apfl")


def one_run(runner, name: str, overrides: str, clients: int) -> dict[str, float | None]:
    folder = runner.run(name, overrides, num_supernodes=clients)
    results = json.loads((folder / "results.json").read_text())
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
    glob = rows[-1].get("global_accuracy")
    return {"mean": results["final_accuracy"]["mean"], "worst": results["final_accuracy"]["worst"],
            "global": None if glob is None else float(glob),
            "mb": (results["bytes_up"] + results["bytes_down"]) / 1e6, "s": results["wall_seconds"]}


def cell(values: list[float | None], digits: int = 4) -> str:
    if any(v is None for v in values):
        return "—"
    mean, std, _ = mean_std(values)  # the sample std (ddof=1) over the seeds
    return format_mean_std(mean, std, digits)


def main() -> int:
    from tests.fake_grid import InProcessRunner

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--clients", type=int, default=10, help="the federation's client count")
    parser.add_argument("--extra", default="", help="overrides for every run")
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD:OVERRIDES",
                        help="overrides for one method's runs, e.g. 'fedrep:strategy.head_epochs=5'")
    parser.add_argument("--out", type=Path, default=Path("/tmp/pflower-baselines"))
    parser.add_argument("--table", action="store_true", help="only print the table of <out>/runs.jsonl")
    args = parser.parse_args()
    log = args.out / "runs.jsonl"
    print("\n".join(HEADER))
    if args.table:
        done = read_runs(args.out)
        for name in dict.fromkeys(d["method"] for d in done):
            print(row(name, [d for d in done if d["method"] == name]))
        return 0
    runner = InProcessRunner(args.out)
    own = dict(item.split(":", 1) for item in args.set)
    for name in args.methods:
        got = []
        for seed in args.seeds:
            overrides = (f"strategy={name} num_rounds={args.rounds} seed={seed} {args.extra} "
                         f"{own.get(name, '')}").strip()
            got.append({"method": name, "seed": seed, "overrides": overrides,
                        **one_run(runner, f"{name}-seed{seed}", overrides, args.clients)})
            with log.open("a") as f:
                f.write(json.dumps(got[-1]) + "\n")
        print(row(name, got), flush=True)
    return 0


# The table's header and separator (docs/regenerate.py writes docs/baselines.md's table with them).
HEADER = ("| method | seeds | final personal acc (mean) | worst client | global acc | MB up+down | wall s |",
          "|---|---|---|---|---|---|---|")


def read_runs(out: Path) -> list[dict]:
    """``<out>/runs.jsonl``'s runs, the last of each (method, seed) only: a method run again
    into the same folder replaces its earlier numbers instead of counting as another seed."""
    path = out / "runs.jsonl"
    runs = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return list({(r["method"], r["seed"]): r for r in runs}.values())


def row(name: str, got: list[dict]) -> str:
    """One table line: ``got``'s runs of method ``name``, mean ± std over them."""
    cols = [cell([g[k] for g in got]) for k in ("mean", "worst", "global")]
    return (f"| {name} | {len(got)} | {' | '.join(cols)} | {cell([g['mb'] for g in got], 1)} "
            f"| {cell([g['s'] for g in got], 1)} |")


def table(rows: list[tuple[str, list[dict]]]) -> list[str]:
    """The markdown table: one line per (label, runs), in the given order."""
    return [*HEADER, *(row(label, got) for label, got in rows)]


if __name__ == "__main__":
    sys.exit(main())
