"""``pflower-sweep --comparison NAME``: a seed paper's comparison table, every row it reports.

A comparison is a sweep over methods on one paper preset, declared in
``conf/comparison/<NAME>.yaml``:

    title: the paper and its table
    experiment: the ``+experiment=`` preset every row runs on
    paper_metric: what the paper's figures are (they are printed beside pflower's)
    paper_selection: how the paper picked the round its figure is from, where that is not
        pflower's rule: ``peak_weighted`` (the round of best sample-weighted test accuracy, as
        PFLlib reports) adds that figure of pflower's runs as a column beside the paper's
    stand_in: {overrides: [...], note: ...}   the offline data that replaces the paper's (--stand-in)
    methods: [{method, label?, experiment?, overrides?: {key: value}, paper?: figure}]
    missing: [{method, reason}]               rows pflower cannot run (printed, never dropped)
    note: anything the reader of the table must know

A row runs ``+experiment=<preset> strategy=<method>``. A preset's ``strategy.*`` keys belong to
the preset's own method: for another method each is reset to that method's default (or
removed where it has no such key), so a baseline runs with its own defaults plus exactly the
overrides the file states. The command line's overrides come last and win.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from omegaconf import OmegaConf

from task.run.config import CONF_DIR, ConfigError, compose_config
from task.run.schema import STRATEGY_SCHEMAS

COMPARISONS = CONF_DIR / "comparison"


@dataclass(frozen=True)
class Row:
    """One row of a paper's table: a method with the overrides the paper states."""

    method: str
    label: str
    experiment: str
    overrides: dict[str, Any]
    paper: float | None = None


@dataclass(frozen=True)
class Comparison:
    name: str
    title: str
    experiment: str
    paper_metric: str
    rows: list[Row]
    missing: list[dict[str, str]]
    stand_in: list[str] = field(default_factory=list)
    stand_in_note: str = ""
    note: str = ""
    paper_selection: str = ""


# paper_selection -> the summary column it adds: (its header, the sweep row's value)
SELECTIONS = {"peak_weighted": ("peak round: weighted test acc (the paper's selection)", "peak_weighted")}


def available(directory: Path = COMPARISONS) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load(name: str, directory: Path = COMPARISONS) -> Comparison:
    """Read ``<directory>/<name>.yaml``; an unknown name is a ConfigError naming the valid ones."""
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"there is no comparison {name!r}; the comparisons: "
                          f"{', '.join(available(directory))}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(spec) - {"title", "experiment", "paper_metric", "paper_selection", "stand_in", "methods",
                           "missing", "note"}
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}")
    selection = str(spec.get("paper_selection") or "")
    if selection and selection not in SELECTIONS:
        raise ConfigError(f"{path}: paper_selection={selection!r}; valid: {', '.join(SELECTIONS)}")
    rows = [Row(method=str(m["method"]), label=str(m.get("label", m["method"])),
                experiment=str(m.get("experiment", spec["experiment"])),
                overrides=dict(m.get("overrides") or {}), paper=m.get("paper"))
            for m in spec["methods"]]
    stand_in = spec.get("stand_in") or {}
    return Comparison(name=name, title=str(spec["title"]), experiment=str(spec["experiment"]),
                      paper_metric=str(spec.get("paper_metric", "")), rows=rows,
                      missing=list(spec.get("missing") or []), stand_in=list(stand_in.get("overrides") or []),
                      stand_in_note=str(stand_in.get("note", "")), note=str(spec.get("note", "")),
                      paper_selection=selection)


def hydra_value(value: Any) -> str:
    """A YAML value as Hydra's override grammar writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return str(value)


def _preset(experiment: str) -> tuple[str, dict]:
    """A preset's own strategy and the strategy keys it sets."""
    spec = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{experiment}.yaml"))
    own = next(str(d["override /strategy"]) for d in spec.get("defaults", [])
               if isinstance(d, dict) and "override /strategy" in d)
    return own, dict(spec.get("strategy") or {})


def row_overrides(row: Row) -> list[str]:
    """The overrides of one row, before the command line's: preset, method, the preset's strategy
    keys undone for another method, then the row's own (a key given twice: the last wins)."""
    own, preset_keys = _preset(row.experiment)
    merged: dict[str, str] = {"+experiment": f"+experiment={row.experiment}"}
    if row.method != own:
        merged["strategy"] = f"strategy={row.method}"
        defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{row.method}.yaml"))
        for key in preset_keys:  # the preset's keys are its own method's, not this baseline's
            merged[f"strategy.{key}"] = (f"strategy.{key}={hydra_value(defaults[key])}" if key in defaults
                                         else f"~strategy.{key}")
    for key, value in row.overrides.items():
        merged[key] = f"{key}={hydra_value(value)}"
    return list(merged.values())


def check(comparison: Comparison, stand_in: bool = False) -> None:
    """Every row's method is registered, its strategy keys are that method's, and its whole
    config composes and validates (task/run/config.py's schemas); a ConfigError names the row."""
    import strategies

    strategies.load_all()
    for row in comparison.rows:
        where = f"comparison {comparison.name}, row {row.label}"
        if row.method not in strategies.REGISTRY:
            raise ConfigError(f"{where}: strategy {row.method!r} is not registered; the methods: "
                              f"{', '.join(sorted(strategies.REGISTRY))}")
        schema = STRATEGY_SCHEMAS[row.method]
        for key in row.overrides:
            if key.startswith("strategy.") and key.removeprefix("strategy.") not in schema:
                raise ConfigError(f"{where}: {key} is not a key of strategy={row.method}; its keys: "
                                  f"{', '.join(sorted(k for k in schema if k != 'name'))}")
        overrides = row_overrides(row) + (comparison.stand_in if stand_in else [])
        try:
            compose_config(" ".join(shlex.quote(o) for o in overrides))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None


def selected(row: Row, methods: list[str] | None) -> bool:
    """Whether ``--methods`` (labels or method names; None: all) selects the row."""
    return not methods or row.label in methods or row.method in methods


@dataclass
class Job:
    label: str
    directory: Path
    overrides: list[str]


def plan(comparison: Comparison, user: list[str], out: Path, methods: list[str] | None,
         stand_in: bool, sweep: ModuleType) -> list[Job]:
    """Every job: each selected row times each combination of the command line's sweep."""
    expand, group_key, job_name = sweep.expand, sweep.group_key, sweep.job_name

    rows = [r for r in comparison.rows if selected(r, methods)]
    extra = comparison.stand_in if stand_in else []
    combos = expand(user) if user else [[]]
    common = set.intersection(*(set(c) for c in combos))
    jobs = []
    for row in rows:
        for combo in combos:
            # A row's label names only what the command line sweeps (seeds aside): an override
            # given once applies to every row and is said once, above the table.
            swept = group_key([o for o in combo if o not in common])
            label = row.label if swept == "default" else f"{row.label} {swept}"
            jobs.append(Job(label, (out / row.label / job_name(combo)).resolve(),
                            row_overrides(row) + extra + combo))
    return jobs


def run_folders(jobs: list[Job], suffix: str = "") -> dict[str, list[Path]]:
    """The jobs' run folders by row label (``suffix`` after it): one summary row each, its
    seeds' runs together."""
    folders: dict[str, list[Path]] = {}
    for job in jobs:
        folders.setdefault(f"{job.label} {suffix}".strip(), []).append(job.directory)
    return folders


def table(comparison: Comparison, rows: list[dict], stand_in: bool, skipped: list[str],
          fmt: Callable[..., str], user: list[str] | None = None) -> str:
    """summary.md for a comparison: the sweep's columns with the paper's figure beside each row
    (cells written by the sweep's ``fmt``), then the rows not run and why."""
    _fmt = fmt

    papers = {r.label: r.paper for r in comparison.rows}
    header, value = SELECTIONS.get(comparison.paper_selection, (None, None))
    lines = [f"# {comparison.title}", "",
             f"Preset `+experiment={comparison.experiment}`" + (
                 f", on the offline stand-in ({' '.join(comparison.stand_in)}): {comparison.stand_in_note}"
                 if stand_in else "") + "." + (f" Command line: `{' '.join(user)}`." if user else ""), "",
             "| method | paper | " + (f"{header} | " if header else "") + "seeds | final personal acc "
             "(mean) | worst client | best-by-validation round: val acc | its test acc | global acc | "
             "MB up+down | wall s |",
             "|---|---|" + ("---|" if header else "") + "---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = papers.get(r["run"].split(" ")[0])
        lead = ["—" if paper is None else f"{paper:g}"]
        if value:  # the paper's own selection sits beside the paper's figure
            lead.append(_fmt(r[value], r[f"{value}_std"]))
        accuracies = ("final_mean", "final_worst", "best_val_mean", "best_mean", "final_global")
        cells = [_fmt(r[k], r[f"{k}_std"]) for k in accuracies]
        cells += [_fmt(r[k], r[f"{k}_std"], 1) for k in ("mbytes_total", "wall_seconds")]
        lines.append(f"| {r['run']} | " + " | ".join([*lead, str(r["seeds"]), *cells]) + " |")
    lines += ["", f"paper: {comparison.paper_metric or 'the figure ALGORITHMS.md quotes'} (— for a row "
              "without one). pflower's accuracies are fractions; cells as in a sweep: mean ± sample std over "
              "seeds."]
    if comparison.missing:
        lines += ["", "Reported by the paper, not run (pflower lacks them):"]
        lines += [f"- {m['method']}: {m['reason']}" for m in comparison.missing]
    if skipped:
        lines += ["", f"Rows of the paper's table left out by --methods: {', '.join(skipped)}"]
    if comparison.note:
        lines += ["", f"Note: {comparison.note}"]
    return "\n".join(lines) + "\n"


def main(name: str, user: list[str], out: Path, methods: list[str] | None, stand_in: bool,
         summarize_only: bool, sweep: ModuleType, run_job: Callable[[list[str]], int] | None = None,
         directory: Path = COMPARISONS) -> int:
    """Run (or only summarize) a paper's comparison; exit status as ``pflower-sweep``'s.
    ``sweep``: task/run/sweep.py, which calls this (passed, not imported: no import circle)."""

    try:
        comparison = load(name, directory)
        unknown = sorted(m for m in methods or [] if not any(selected(r, [m]) for r in comparison.rows))
        if unknown:
            raise ConfigError(f"--methods {','.join(unknown)}: not rows of comparison {name}; its rows: "
                              f"{', '.join(r.label for r in comparison.rows)}")
        check(comparison, stand_in)
        jobs = plan(comparison, user, out, methods, stand_in, sweep)
    except ConfigError as err:
        print(f"pflower-sweep: {err}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    failed: list[str] = []
    for i, job in enumerate([] if summarize_only else jobs, 1):
        try:
            if not sweep.run_one(job.overrides, job.directory, f"[{i}/{len(jobs)}]", run_job):
                failed.append(f"{job.label} ({job.directory.name})")
        except KeyboardInterrupt:
            print("pflower-sweep: stopped; run the same command again to resume", file=sys.stderr)
            return 130
    rows = sweep.summarize(run_folders(jobs), out)
    skipped = [r.label for r in comparison.rows if not selected(r, methods)]
    (out / "summary.md").write_text(table(comparison, rows, stand_in, skipped, sweep._fmt, user))
    print((out / "summary.md").read_text())
    if failed:
        print(f"pflower-sweep: {len(failed)} of {len(jobs)} jobs failed: {', '.join(failed)} (left out of "
              "the summary)", file=sys.stderr)
        return 1
    return 0
