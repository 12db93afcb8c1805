"""The accuracy-communication trade-off report of a sweep (``pflower-sweep ... --target ACC``).

For every row of the sweep (a combination of swept values other than the seed, e.g. one
FedCLUP lam), from each run's ``metrics.jsonl``:

- the final mean personalized accuracy (the last evaluated round), mean ± sample std
  (ddof=1) over seeds;
- the first evaluated round whose mean personalized accuracy reaches ``target``, and the bytes
  training moved up to and including that round (cumulative ``bytes_up + bytes_down``;
  evaluation's downlink, ``eval_bytes_down``, is left out so that the figure does not depend on
  ``eval_every``), averaged over
  the seeds that reached it ("not reached" where none did; "k/n seeds" where only some did);
- the total bytes of the run.

Writes ``tradeoff.md``, ``tradeoff.csv`` and ``tradeoff.png`` (mean personalized accuracy
against rounds and against cumulative megabytes, one line per row, the target dashed).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np

from task.run import figures
from task.run.seed_stats import format_mean_std, mean_std

MB = 1e6


def read_rows(directory: Path) -> list[dict]:
    """A run's metrics.jsonl rows (none if it has no metrics yet)."""
    path = Path(directory) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracy_curve(rows: list[dict]) -> list[tuple[int, float, float]]:
    """(round, cumulative bytes through it, mean personalized accuracy) of every evaluated round."""
    curve, total = [], 0.0
    for row in sorted(rows, key=lambda r: int(r["round"])):
        total += float(row.get("bytes_up") or 0) + float(row.get("bytes_down") or 0)
        acc = row.get("personalized_accuracy")
        if acc:
            curve.append((int(row["round"]), total, float(acc["mean"])))
    return curve


def first_reach(rows: list[dict], target: float) -> tuple[int, float] | None:
    """(round, cumulative bytes) of the first evaluated round with mean accuracy >= ``target``."""
    return next(((r, b) for r, b, acc in accuracy_curve(rows) if acc >= target), None)


def short_labels(keys: list[str]) -> list[str]:
    """Each row's overrides without those every row shares (the full key if nothing differs)."""
    split = [k.split() for k in keys]
    common = set.intersection(*(set(s) for s in split)) if len(split) > 1 else set()
    return [" ".join(o for o in s if o not in common) or k for s, k in zip(split, keys, strict=True)]


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    mean, std, _ = mean_std(values)
    return mean, std


def tradeoff_rows(groups: dict[str, list[Path]], target: float) -> list[dict[str, Any]]:
    """One dict per sweep row (in the sweep's order) with the figures the report shows."""
    out = []
    for label, (key, dirs) in zip(short_labels(list(groups)), groups.items(), strict=True):
        # Only finished runs (results.json written): a failed or interrupted one reports nothing.
        done = [d for d in dirs if (Path(d) / "results.json").exists()]
        runs = [rows for rows in (read_rows(d) for d in done) if accuracy_curve(rows)]
        if not runs:
            continue
        curves = [accuracy_curve(rows) for rows in runs]
        reached = [hit for hit in (first_reach(rows, target) for rows in runs) if hit is not None]
        row: dict[str, Any] = {"run": label, "key": key, "seeds": len(runs), "target": target,
                               "reached": len(reached), "curves": curves}
        row["final_mean"], row["final_mean_std"] = _mean_std([c[-1][2] for c in curves])
        row["rounds_to_target"], row["rounds_to_target_std"] = _mean_std([float(r) for r, _ in reached])
        row["mbytes_to_target"], row["mbytes_to_target_std"] = _mean_std([b / MB for _, b in reached])
        row["mbytes_total"], _ = _mean_std([c[-1][1] / MB for c in curves])
        out.append(row)
    return out


def _cell(row: dict, name: str, digits: int) -> str:
    if row["reached"] == 0:
        return "not reached"
    text = format_mean_std(row[name], row[f"{name}_std"], digits)
    return text if row["reached"] == row["seeds"] else f"{text} ({row['reached']}/{row['seeds']} seeds)"


def write_report(groups: dict[str, list[Path]], out: Path, target: float) -> list[dict[str, Any]]:
    """Write tradeoff.md, tradeoff.csv and tradeoff.png under ``out``; return the rows."""
    out = Path(out)
    rows = tradeoff_rows(groups, target)
    columns = ["run", "seeds", "final_mean", "final_mean_std", "target", "reached", "rounds_to_target",
               "rounds_to_target_std", "mbytes_to_target", "mbytes_to_target_std", "mbytes_total"]
    with (out / "tradeoff.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"| run | seeds | final personal acc (mean) | rounds to {target:g} | MB to {target:g} "
             "| MB total |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        final = format_mean_std(r["final_mean"], r["final_mean_std"])
        lines.append(f"| {r['run']} | {r['seeds']} | {final} | "
                     f"{_cell(r, 'rounds_to_target', 1)} | {_cell(r, 'mbytes_to_target', 2)} | "
                     f"{r['mbytes_total']:.2f} |")
    lines += ["", f"Rounds and MB to {target:g}: the first evaluated round whose mean personalized accuracy "
              f"reaches {target:g}, and the bytes up + down through it (mean ± std over the seeds that "
              "reached it; std: the sample standard deviation, ddof=1)."]
    (out / "tradeoff.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "tradeoff.png", target)
    return rows


def plot(rows: list[dict], path: Path, target: float | None = None) -> Path:
    """Mean personalized accuracy against rounds (left) and cumulative MB (right), as PNG and PDF."""
    return figures.save(tradeoff_figure(rows, target), path)[0]


@figures.styled
def tradeoff_figure(rows: list[dict], target: float | None = None):
    fig, (by_round, by_bytes) = figures.new_figure(width=10, height=3.8, ncols=2, sharey=True)
    for row in rows:
        length = min(len(c) for c in row["curves"])
        points = np.array([[p for p in c[:length]] for c in row["curves"]], dtype=float)  # seeds x rounds x 3
        rounds, mbytes, acc = points[0, :, 0], points[:, :, 1].mean(0) / MB, points[:, :, 2].mean(0)
        label = f"{figures.override_label(row['run'])} (n={len(row['curves'])})"
        line, = by_round.plot(rounds, acc, marker=".", label=label)
        by_bytes.plot(mbytes, acc, marker=".", color=line.get_color(), label=label)
    for ax in (by_round, by_bytes):
        if target is not None:
            ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:g}")
        ax.set(ylim=(0, 1))
    figures.integer_rounds(by_round)
    by_bytes.set_xlabel("MB communicated (up + down, cumulative)")
    by_round.set_ylabel("mean personalized test accuracy")
    by_round.set_title("Accuracy per round")
    by_bytes.set_title("Accuracy per MB communicated")
    figures.legend(by_bytes, "beside")
    return fig
