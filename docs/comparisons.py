"""Tables that put the rows of several sweeps side by side, with the trade-off report's figures
(docs/fedclup.md, docs/pfml.md): each row is one group of one sweep's runs, each column a
value read from the runs' results.json and metrics.jsonl, mean ± sample std over the seeds
(``task.run.seed_stats``), and the rounds and MB to a target as the trade-off report counts
them (``task.algorithms.tradeoff``, whose ``write_report`` also draws the figure).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from task.algorithms import tradeoff
from task.run import launch, sweep
from task.run.seed_stats import format_mean_std, mean_std


@dataclass(frozen=True)
class Row:
    label: str  # the row's name in the table
    overrides: str  # its sweep's overrides (pflower-sweep's arguments but --out)
    folder: str  # its sweep's --out, under the outputs' root
    pick: str = ""  # the override that selects its group of that sweep ("" : the sweep's only one)

    def command(self, target: float | None) -> str:
        report = "" if target is None else f" --target {target:g}"
        return f"pflower-sweep {self.overrides}{report} --out {{root}}/{self.folder}"

    def dirs(self, root: Path) -> list[Path]:
        """Its finished runs' folders."""
        groups: dict[str, list[Path]] = {}
        for combo in sweep.expand(launch.split_arguments(shlex.split(self.overrides))):
            groups.setdefault(sweep.group_key(combo), []).append(root / self.folder / sweep.job_name(combo))
        (dirs,) = [d for key, d in groups.items() if not self.pick or self.pick in key.split()]
        return [d for d in dirs if (d / "results.json").exists()]


# One column: its header, and its cell from (the row's run folders, its trade-off row).
Column = tuple[str, Callable[[list[Path], dict[str, Any]], str] | None]  # the first: the row's label


def _last(directory: Path) -> dict:
    return tradeoff.read_rows(directory)[-1]


def over_seeds(value: Callable[[Path], float | None], digits: int = 4
               ) -> Callable[[list[Path], dict], str]:
    """A cell: ``value`` of each run, mean ± sample std over the row's seeds ("—" if one lacks it)."""
    def cell(dirs: list[Path], _: dict) -> str:
        values = [value(d) for d in dirs]
        if any(v is None for v in values):
            return "—"
        mean, std, _n = mean_std(values)
        return format_mean_std(mean, std, digits)
    return cell


def final(key: str) -> Callable[[Path], float]:
    return lambda d: json.loads((d / "results.json").read_text())["final_accuracy"][key]


def last_metric(key: str) -> Callable[[Path], float | None]:
    return lambda d: _last(d).get(key)


def to_target(name: str, digits: int) -> Callable[[list[Path], dict], str]:
    """Rounds or MB to the target, as the trade-off report writes them."""
    return lambda dirs, row: tradeoff._cell(row, name, digits)


def total_mb(dirs: list[Path], row: dict) -> str:
    return f"{row['mbytes_total']:.1f}"


def table(rows: list[Row], columns: list[Column], root: Path, target: float) -> list[str]:
    """The markdown table's lines; a row without finished runs is left out."""
    lines = ["| " + " | ".join(header for header, _ in columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        dirs = row.dirs(root)
        found = tradeoff.tradeoff_rows({row.label: dirs}, target) if dirs else []
        if found:
            cells = [cell(dirs, found[0]) for _, cell in columns[1:] if cell is not None]
            lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return lines


def figure(rows: list[Row], root: Path, scratch: Path, target: float) -> list[str]:
    """The trade-off report's figure over the rows (``write_report`` with them as its groups):
    [its path], or [] where no row has a finished run."""
    groups = {f"{row.overrides} {row.pick}".strip(): row.dirs(root) for row in rows}
    if not any(groups.values()):
        return []
    tradeoff.write_report(groups, scratch, target)
    return [str(scratch / "tradeoff.png")]


def commands(rows: list[Row], target: float | None) -> tuple[str, ...]:
    """Each sweep's command once, in the rows' order."""
    return tuple(dict.fromkeys(row.command(target) for row in rows))


def fedclup_columns(target: float, r_header: str) -> list[Column]:
    return [("run", None), ("final personal acc", over_seeds(final("mean"))),
            ("worst client", over_seeds(final("worst"))),
            ("global model acc", over_seeds(last_metric("global_accuracy"))),
            (r_header, over_seeds(last_metric("fedclup_R"), 2)),
            (f"rounds to {target:g}", to_target("rounds_to_target", 1)),
            (f"MB to {target:g}", to_target("mbytes_to_target", 2)), ("MB in 20 rounds", total_mb)]


def pfml_columns(target: float) -> list[Column]:
    return [("method", None), ("final personal acc (mean)", over_seeds(final("mean"))),
            ("worst client", over_seeds(final("worst"))),
            ("global model acc", over_seeds(last_metric("global_accuracy"))),
            (f"rounds to {target:g}", to_target("rounds_to_target", 1)),
            ("MB up+down (20 rounds)", total_mb)]


def fedclup_rows(model: str, seeds: str, folder: str) -> list[Row]:
    """docs/fedclup.md's rows: the lam sweep and its two endpoints, FedAvg and Local."""
    lam = f"+experiment=fedclup_mnist {model} strategy.lam=0.2,0.5,2.5 seed={seeds}".replace("  ", " ")
    ends = f"+experiment=fedclup_mnist {model} strategy=fedavg,local seed={seeds}".replace("  ", " ")
    return [Row("Local (lam -> 0)", ends, f"{folder}/endpoints", "strategy=local"),
            *(Row(f"lam = {v}", lam, f"{folder}/fedclup", f"strategy.lam={v}")
              for v in ("0.2", "0.5", "2.5")),
            Row("FedAvg (lam -> inf)", ends, f"{folder}/endpoints", "strategy=fedavg")]


PFML_SETUP = ("dataset=mnist5k dataset.test_fraction=0.25 partition=pathological partition.num_clients=20 "
              "partition.classes_per_client=2 model=mlp model.hidden=100 batch_size=200 lr=0.01 "
              "num_rounds=20")
PFML_ROWS = [
    Row("PFML (m)", f"strategy=pfml strategy.local_iterations=10 strategy.beta=2 seed=0,1 {PFML_SETUP}",
        "pfml_mnist/pfml"),
    Row("PFML, beta = 1",
        f"strategy=pfml strategy.local_iterations=10 strategy.beta=1 seed=0,1 {PFML_SETUP}",
        "pfml_mnist/pfml_beta1"),
    Row("FedAvg (w_g)", f"strategy=fedavg local_epochs=10 seed=0,1 {PFML_SETUP}", "pfml_mnist/fedavg"),
    Row("FedAvg-FT", f"strategy=fedavg_ft local_epochs=10 strategy.ft_epochs=10 seed=0,1 {PFML_SETUP}",
        "pfml_mnist/fedavg_ft"),
    Row("Ditto (v)",
        f"strategy=ditto local_epochs=10 strategy.personal_epochs=10 seed=0,1 {PFML_SETUP}",
        "pfml_mnist/ditto"),
]
