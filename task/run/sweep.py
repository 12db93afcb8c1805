"""``pflower-sweep``: run a grid of pflower jobs and write one comparison table and plot.

    pflower-sweep strategy=lgmix,fedavg,fedbn seed=0,1,2 num_rounds=20 --out sweeps/default

Comma-separated values are swept (Hydra's sweep syntax, parsed by Hydra's own override
parser: ``range(0,3)`` and ``choice(a,b)`` work too); every combination runs as a real Flower
simulation through ``pflower-sim`` (``flwr run``), one after the other, each writing its own
output directory under ``--out``. Then ``summary.csv`` and ``summary.md`` (one row per
combination of the swept keys other than ``seed``: final mean personalized accuracy, worst
client, the best round by mean validation accuracy (never by test accuracy) with its test
accuracy, global accuracy, bytes, wall time, as mean ± sample std (ddof=1) over seeds) and
``summary.png`` (mean personalized accuracy per round, one line per row) are written.
A job whose run completed (its folder's ``status.json``) is not run again, and an interrupted
one is resumed from its checkpoint (``resume=``), never appended to, so running the same
command again finishes a sweep. Failed jobs are left out of the summary and make the command
exit 1; Ctrl-C stops the running job (and the sweep) with exit 130.

``--search N`` searches instead of sweeping: Optuna's ask-and-tell over the same override
syntax (``lr=tag(log,interval(0.005,0.2))``, ``strategy.lam=choice(0.1,1,10)``), N trials
ranked by best-round validation accuracy, the study kept in ``--out`` and resumed by running
the same command again (task/run/search.py, docs/search.md).

``--comparison NAME`` runs a seed paper's comparison table instead: the rows of
conf/comparison/NAME.yaml on its preset, the paper's figures beside pflower's
(task/run/comparison.py, docs/baselines.md).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException

from task.run import figures, launch
from task.run.outputs import select_best_round
from task.run.runfolder import read_lock, read_status
from task.run.seed_stats import band, format_mean_std, mean_std


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


MAX_NAME = 180


def job_name(combo: list[str]) -> str:
    """A directory name for one job: its overrides with unsafe characters replaced ('+' spelled
    out, so that lr=1e+30 and lr=1e-30 get folders of their own)."""
    name = "_".join(combo).replace("+", "plus") or "default"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
    if len(name) > MAX_NAME:  # file systems refuse names over 255 bytes: keep a readable head
        digest = hashlib.sha1("_".join(combo).encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def group_key(combo: list[str]) -> str:
    """The row a job belongs to: its overrides without the seed."""
    return " ".join(o for o in combo if not o.startswith("seed=")) or "default"


def completed(job_dir: Path) -> bool:
    """Whether the job's run completed (its status says so; a folder from before status files
    counts when it has results.json)."""
    status = read_status(job_dir)
    if status is None:
        return (job_dir / "results.json").exists()
    return status.get("status") == "completed"


def job_arguments(combo: list[str], job_dir: Path) -> list[str]:
    """``pflower-sim``'s arguments for a job: a fresh run into its folder, or the resumption of
    an interrupted one (never a second run appended to a folder). A folder without a checkpoint
    (the run died before its first round) is moved aside, ``<job>.incomplete-<time>``."""
    if (job_dir / "checkpoint.npz").exists() and (job_dir / "config.yaml").exists():
        return [*combo, f"output_dir={job_dir}", f"resume={job_dir}"]
    if job_dir.exists() and any(job_dir.iterdir()) and read_lock(job_dir) is None:
        aside = job_dir.with_name(f"{job_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        job_dir.rename(aside)
        print(f"pflower-sweep: {job_dir.name} had no checkpoint; its files moved to {aside.name}", flush=True)
    return [*combo, f"output_dir={job_dir}"]


def run_jobs(combos: list[list[str]], out: Path, run_job: Callable[[list[str]], int] | None = None
             ) -> tuple[dict[str, list[Path]], list[str]]:
    """Run every job not completed yet with ``run_job`` (default: ``pflower-sim``'s main, looked
    up at the call); the jobs by row, and the names of the failed ones."""
    groups: dict[str, list[Path]] = {}
    failed = []
    for i, combo in enumerate(combos, 1):
        job_dir = (out / job_name(combo)).resolve()
        groups.setdefault(group_key(combo), []).append(job_dir)
        if not run_one(combo, job_dir, f"[{i}/{len(combos)}]", run_job):
            failed.append(job_dir.name)
    return groups, failed


def run_one(combo: list[str], job_dir: Path, counter: str, run_job: Callable[[list[str]], int] | None = None
            ) -> bool:
    """Run one job into ``job_dir`` unless it completed already; whether it completed."""
    run_job = run_job or launch.main
    if completed(job_dir):
        print(f"{counter} {job_dir.name}: done already", flush=True)
        return True
    arguments = job_arguments(combo, job_dir)
    resumed = " (resumed)" if arguments[-1].startswith("resume=") else ""
    print(f"{counter} {job_dir.name}{resumed}", flush=True)
    code = run_job(arguments)
    if code in (130, 143):  # Ctrl-C / SIGTERM stopped the job: stop the sweep too
        raise KeyboardInterrupt
    if code != 0 or not completed(job_dir):
        # A job refused at pflower-sim's door (exit 2) never got a folder: point at the
        # message above, not at files that do not exist.
        where = (f"see {job_dir / 'status.json'} and {job_dir / 'flower.log'}" if read_status(job_dir)
                 else "it never started, so it has no folder; its message is above")
        print(f"pflower-sweep: job {job_dir.name} failed (exit {code}): {where}", file=sys.stderr,
              flush=True)
        return False
    return True


def summarize(groups: dict[str, list[Path]], out: Path) -> list[dict]:
    rows = []
    for key, dirs in groups.items():
        dirs = [d for d in dirs if completed(d)]  # a failed or stopped run reports nothing
        results = [json.loads((d / "results.json").read_text()) for d in dirs]
        if not results:
            continue

        last = [r["last_evaluated_round"] for r in results]
        # The same rule as each run's results.json: the round with the best mean validation
        # accuracy, recomputed from metrics.jsonl; test accuracy never selects.
        best = [select_best_round(_rounds(d)) for d in dirs]
        row = {"run": key, "seeds": len(results)}
        for name, values in {
            "final_mean": [x["personalized_accuracy"]["mean"] for x in last],
            "final_worst": [x["personalized_accuracy"]["worst"] for x in last],
            "best_val_mean": [b["validation_accuracy"]["mean"] if b else None for b in best],
            "best_mean": [b["personalized_accuracy"]["mean"] if b else None for b in best],
            # a paper's selection, not pflower's (comparisons with paper_selection: peak_weighted)
            "peak_weighted": [peak_weighted(_rounds(d)) for d in dirs],
            "final_global": [x.get("global_accuracy") for x in last],
            "mbytes_total": [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in results],
            "wall_seconds": [r["wall_seconds"] for r in results],
        }.items():
            row[name], row[f"{name}_std"], row[f"{name}_n"] = mean_std(values)
        row["curves"] = [[(x["round"], x["personalized_accuracy"]["mean"])
                          for x in _rounds(d) if x.get("personalized_accuracy")] for d in dirs]
        rows.append(row)
    _write_tables(rows, out)
    _plot(rows, out / "summary.png")
    return rows


def peak_weighted(rows: list[dict]) -> float | None:
    """The best round's sample-weighted personal test accuracy: how PFLlib picks its figure
    (all clients' correct over all their test samples, the best round of the run)."""
    scored = [r["personalized_accuracy"]["weighted"] for r in rows
              if (r.get("personalized_accuracy") or {}).get("weighted") is not None]
    return max(scored) if scored else None


def _rounds(directory: Path) -> list[dict]:
    path = directory / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _fmt(mean: float | None, std: float | None, digits: int = 4) -> str:
    return format_mean_std(mean, std, digits)


# summary.csv's values: each with its mean, sample std (ddof=1) and the n of seeds it is over
SUMMARY_VALUES = ("final_mean", "final_worst", "best_val_mean", "best_mean", "final_global", "mbytes_total",
                  "wall_seconds", "peak_weighted")


def _write_tables(rows: list[dict], out: Path) -> None:
    columns = ["run", "seeds", *(f"{name}{end}" for name in SUMMARY_VALUES for end in ("", "_std", "_n"))]
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
    lines += ["", "Each cell: mean ± sample standard deviation (ddof=1) over the row's seeds (the mean alone "
              "for one seed; summary.csv's *_n columns: how many seeds a value is over).",
              "Final: the last evaluated round. Best-by-validation: per run, the round with the highest "
              "mean validation accuracy, and that round's test accuracy (— without validation data, "
              "val_fraction = 0). Test data never selects a round."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _plot(rows: list[dict], path: Path) -> None:
    """summary.png and .pdf: each row's mean personalized accuracy per round over its seeds,
    the band one sample standard deviation either side."""
    figures.save(summary_figure(rows), path)


@figures.styled
def summary_figure(rows: list[dict]):
    from task.algorithms.tradeoff import short_labels
    fig, ax = figures.new_figure(width=6.5)
    labels = short_labels([row["run"] for row in rows]) if rows else []
    for i, (row, label) in enumerate(zip(rows, labels, strict=True)):
        curves = [c for c in row["curves"] if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        xs = [x for x, _ in curves[0][:length]]
        mean, std = band(np.array([[y for _, y in c[:length]] for c in curves]))
        style = ("-", "--", ":")[i // len(figures.PALETTE) % 3]  # past the palette's colours
        line, = ax.plot(xs, mean, marker=".", linestyle=style,
                        label=f"{figures.override_label(label)} (n={len(curves)})")
        ax.fill_between(xs, mean - std, mean + std, alpha=0.2, color=line.get_color(), linewidth=0)
    ax.set(ylabel="mean personalized test accuracy", ylim=(0, 1),
           title="Mean over seeds, band: ± one sample std")
    figures.integer_rounds(ax)
    if rows:
        figures.legend(ax, "below" if len(rows) <= 4 else "beside")
    return fig


def main(argv: list[str] | None = None, run_job: Callable[[list[str]], int] | None = None) -> int:
    """The command; ``run_job`` runs one job from ``pflower-sim``'s arguments (its exit status)."""
    parser = argparse.ArgumentParser(prog="pflower-sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides; comma-separated values are swept")
    parser.add_argument("--out", type=Path, required=True, help="directory for the jobs and the summary")
    parser.add_argument("--summarize-only", action="store_true", help="only rebuild the summary")
    parser.add_argument("--target", type=float, default=None,
                        help="also write tradeoff.md/.csv/.png: per row, rounds and bytes to reach this "
                             "mean personalized accuracy, and accuracy against rounds and bytes")
    parser.add_argument("--search", type=int, default=None, metavar="N",
                        help="search instead: N Optuna trials over interval(a,b), tag(log,interval(a,b)), "
                             "range(a,b), choice(x,y); ranked by best-round validation accuracy")
    parser.add_argument("--comparison", metavar="NAME",
                        help="run a seed paper's comparison table (conf/comparison/NAME.yaml): every row "
                             "it reports, on its preset; the overrides apply to every row")
    parser.add_argument("--methods", help="with --comparison: only these rows (comma-separated)")
    parser.add_argument("--stand-in", action="store_true",
                        help="with --comparison: the offline data its file names instead of the paper's")
    args = parser.parse_args(argv)
    if args.comparison is not None:
        from task.run import comparison

        methods = args.methods.split(",") if args.methods else None
        return comparison.main(args.comparison, launch.split_arguments(args.overrides), args.out, methods,
                               args.stand_in, args.summarize_only, sys.modules[__name__], run_job)
    if not args.overrides:
        parser.error("give the overrides to sweep (or --comparison NAME)")
    if args.search is not None:
        from task.run import search

        return search.main(launch.split_arguments(args.overrides), args.out, args.search,
                           lambda combos, out: run_jobs(combos, out, run_job), args.summarize_only)
    try:
        combos = expand(launch.split_arguments(args.overrides))
    except OverrideParseException as err:
        print(f"pflower-sweep: cannot parse the overrides {args.overrides}: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    if args.summarize_only:
        groups: dict[str, list[Path]] = {}
        for combo in combos:
            groups.setdefault(group_key(combo), []).append((args.out / job_name(combo)).resolve())
    else:
        try:
            groups, failed = run_jobs(combos, args.out, run_job)
        except KeyboardInterrupt:
            print("pflower-sweep: stopped; run the same command again to resume", file=sys.stderr)
            return 130
    summarize(groups, args.out)
    print((args.out / "summary.md").read_text())
    if args.target is not None:
        from task.algorithms.tradeoff import write_report

        write_report(groups, args.out, args.target)
        print((args.out / "tradeoff.md").read_text())
    if failed:
        print(f"pflower-sweep: {len(failed)} of {len(combos)} jobs failed: {', '.join(failed)} (each "
              "one's reason is printed above; they are left out of the summary)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
