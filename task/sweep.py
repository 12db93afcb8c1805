"""``pflower-sweep``: run a grid of pflower jobs and write one comparison table and plot.

    pflower-sweep strategy=lgmix,fedavg,fedbn seed=0,1,2 num_rounds=20 --out sweeps/default

Comma-separated values are swept (Hydra's sweep syntax, parsed by Hydra's own override
parser: ``range(0,3)`` and ``choice(a,b)`` work too); every combination runs as a real Flower
simulation through ``pflower-sim`` (``flwr run``), one after the other, each writing its own
output directory under ``--out``. Then ``summary.csv`` and ``summary.md`` (one row per
combination of the swept keys other than ``seed``: final mean personalized accuracy, worst
client, the best round by mean validation accuracy (never by test accuracy) with its test
accuracy, global accuracy, bytes, wall time, as mean ± std over seeds) and
``summary.png`` (mean personalized accuracy per round, one line per row) are written.
A job whose output already has ``results.json`` is not run again, so a sweep can be resumed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser

from task import launch
from task.outputs import select_best_round


def expand(overrides: list[str]) -> list[list[str]]:
    """Every combination of the swept values, as lists of plain ``key=value`` overrides."""
    parser = OverridesParser.create()
    axes = []
    for override in parser.parse_overrides(overrides):
        key = override.get_key_element()
        values = [str(v) for v in override.sweep_string_iterator()] if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def job_name(combo: list[str]) -> str:
    """A directory name for one job: its overrides with unsafe characters replaced."""
    name = "_".join(combo) or "default"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def group_key(combo: list[str]) -> str:
    """The row a job belongs to: its overrides without the seed."""
    return " ".join(o for o in combo if not o.startswith("seed=")) or "default"


def run_jobs(combos: list[list[str]], out: Path) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for i, combo in enumerate(combos, 1):
        job_dir = (out / job_name(combo)).resolve()
        groups.setdefault(group_key(combo), []).append(job_dir)
        if (job_dir / "results.json").exists():
            print(f"[{i}/{len(combos)}] {job_dir.name}: done already", flush=True)
            continue
        print(f"[{i}/{len(combos)}] {job_dir.name}", flush=True)
        code = launch.main([*combo, f"output_dir={job_dir}"])
        if code != 0 or not (job_dir / "results.json").exists():
            print(f"pflower-sweep: job {job_dir.name} failed (exit {code})", file=sys.stderr)
    return groups


def summarize(groups: dict[str, list[Path]], out: Path) -> list[dict]:
    rows = []
    for key, dirs in groups.items():
        results = [json.loads((d / "results.json").read_text()) for d in dirs
                   if (d / "results.json").exists()]
        if not results:
            continue

        def stat(values: list[float | None]) -> tuple[float | None, float | None]:
            vals = [v for v in values if v is not None]
            return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)

        last = [r["last_evaluated_round"] for r in results]
        # The same rule as each run's results.json: the round with the best mean validation
        # accuracy, recomputed from metrics.jsonl; test accuracy never selects.
        best = [select_best_round(_rounds(d)) for d in dirs if (d / "results.json").exists()]
        row = {"run": key, "seeds": len(results)}
        for name, values in {
            "final_mean": [x["personalized_accuracy"]["mean"] for x in last],
            "final_worst": [x["personalized_accuracy"]["worst"] for x in last],
            "best_val_mean": [b["validation_accuracy"]["mean"] if b else None for b in best],
            "best_mean": [b["personalized_accuracy"]["mean"] if b else None for b in best],
            "final_global": [x.get("global_accuracy") for x in last],
            "mbytes_total": [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in results],
            "wall_seconds": [r["wall_seconds"] for r in results],
        }.items():
            row[name], row[f"{name}_std"] = stat(values)
        row["curves"] = [[(x["round"], x["personalized_accuracy"]["mean"])
                          for x in _rounds(d) if x.get("personalized_accuracy")] for d in dirs]
        rows.append(row)
    _write_tables(rows, out)
    _plot(rows, out / "summary.png")
    return rows


def _rounds(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    return "—" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _write_tables(rows: list[dict], out: Path) -> None:
    columns = ["run", "seeds", "final_mean", "final_mean_std", "final_worst", "final_worst_std",
               "best_val_mean", "best_val_mean_std", "best_mean", "best_mean_std", "final_global",
               "final_global_std", "mbytes_total",
               "mbytes_total_std", "wall_seconds", "wall_seconds_std"]
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| run | seeds | final personal acc (mean) | worst client | best-by-validation round: "
             "val acc | its test acc | global acc | MB up+down | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['seeds']} | {_fmt(r['final_mean'], r['final_mean_std'])} | "
                     f"{_fmt(r['final_worst'], r['final_worst_std'])} | "
                     f"{_fmt(r['best_val_mean'], r['best_val_mean_std'])} | "
                     f"{_fmt(r['best_mean'], r['best_mean_std'])} | "
                     f"{_fmt(r['final_global'], r['final_global_std'])} | "
                     f"{_fmt(r['mbytes_total'], r['mbytes_total_std'], 1)} | "
                     f"{_fmt(r['wall_seconds'], r['wall_seconds_std'], 1)} |")
    lines += ["", "Final: the last evaluated round. Best-by-validation: per run, the round with the highest "
              "mean validation accuracy, and that round's test accuracy (— without validation data, "
              "val_fraction = 0). Test data never selects a round."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        curves = [c for c in row["curves"] if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        xs = [x for x, _ in curves[0][:length]]
        ys = np.array([[y for _, y in c[:length]] for c in curves])
        ax.plot(xs, ys.mean(0), label=row["run"])
        ax.fill_between(xs, ys.mean(0) - ys.std(0), ys.mean(0) + ys.std(0), alpha=0.2)
    ax.set(xlabel="round", ylabel="mean personalized accuracy", ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pflower-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="+", help="Hydra overrides; comma-separated values are swept")
    parser.add_argument("--out", type=Path, required=True, help="directory for the jobs and the summary")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the summary")
    parser.add_argument("--target", type=float, default=None,
                        help="also write tradeoff.md/.csv/.png: per row, rounds and bytes to reach this "
                             "mean personalized accuracy, and accuracy against rounds and bytes")
    args = parser.parse_args(argv)
    combos = expand(args.overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        groups: dict[str, list[Path]] = {}
        for combo in combos:
            groups.setdefault(group_key(combo), []).append((args.out / job_name(combo)).resolve())
    else:
        groups = run_jobs(combos, args.out)
    summarize(groups, args.out)
    print((args.out / "summary.md").read_text())
    if args.target is not None:
        from task.tradeoff import write_report

        write_report(groups, args.out, args.target)
        print((args.out / "tradeoff.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
