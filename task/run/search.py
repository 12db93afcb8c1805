"""``pflower-sweep --search N``: a hyper-parameter search with Optuna's ask-and-tell.

    pflower-sweep --search 20 strategy=ditto 'strategy.lam=choice(0.1,1,10)' \
        'lr=tag(log,interval(0.005,0.2))' partition.val_fraction=0.2 seed=0,1 --out sweeps/ditto

The search space is written in Hydra's sweep syntax, as Hydra's Optuna sweeper reads it:
``interval(a,b)`` a float drawn uniformly, ``tag(log,interval(a,b))`` log-uniformly,
``range(a,b[,step])`` an integer (Hydra's range: b excluded), ``choice(x,y)`` or ``x,y`` one of
the values. ``seed=0,1`` is not searched: every trial runs each seed, and its value is their
mean. Each trial's runs are pflower-sweep's jobs (a folder per run under ``--out``, named by its
overrides, run by ``pflower-sim``); a trial's value is its best round's mean *validation*
accuracy (``task.run.outputs.select_best_round``), so a search without validation data is
refused before anything runs. The study lives in ``<out>/study.db`` (Optuna's SQLite storage):
the same command again continues it until it holds N finished trials, resuming an interrupted
trial's runs from their checkpoints, and a run already completed is never run again.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
from hydra.errors import OverrideParseException

from task.run.config import ConfigError
from task.run.outputs import select_best_round

STUDY_FILE = "study.db"
STUDY_NAME = "pflower-search"
LOCK_FILE = "search.lock"
SPACE_KEY = "search_space"
SYNTAX = ("interval(a,b), tag(log,interval(a,b)), range(a,b[,step]), choice(x,y,...) or x,y")


class SearchError(ValueError):
    """A search that cannot run: bad syntax, no validation data, another study in the folder."""


@dataclass
class Space:
    """The search: Optuna distributions by key, the fixed overrides, the seeds every trial runs."""

    distributions: dict[str, Any]
    fixed: list[str]
    seeds: list[str]

    def describe(self) -> dict[str, Any]:
        """What identifies the search (stored with the study: a resume must search the same)."""
        from optuna.distributions import distribution_to_json

        return {"fixed": self.fixed, "seeds": self.seeds,
                "distributions": {k: distribution_to_json(d) for k, d in self.distributions.items()}}

    def representative(self) -> list[str]:
        """Overrides of one point of the space (each low end / first choice), for the door."""
        return [*self.fixed, *(f"{k}={v[0]}" for k, v in self.edges().items()), *self.seeds[:1]]

    def edges(self) -> dict[str, list[str]]:
        """Per key, the values the door composes: every choice, or both ends of a range."""
        from optuna.distributions import CategoricalDistribution

        return {k: [str(c) for c in d.choices] if isinstance(d, CategoricalDistribution)
                else [format_value(d.low), format_value(d.high)] for k, d in self.distributions.items()}

    def corners(self) -> list[list[str]]:
        """The representative point with one key moved to each of its other edge values."""
        base = self.representative()
        return [[o for o in base if not o.startswith(f"{k}=")] + [f"{k}={v}"]
                for k, values in self.edges().items() for v in values[1:]]

    def runs(self, chosen: list[str]) -> list[list[str]]:
        """A trial's runs: its overrides, once per seed."""
        return [[*self.fixed, *chosen, seed] for seed in self.seeds] or [[*self.fixed, *chosen]]


def format_value(value: Any) -> str:
    """A sampled value as an override: floats with 6 significant digits (folder names stay
    readable; the run uses exactly what its folder says)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def parse_space(overrides: list[str]) -> Space:
    """The search space of Hydra-style overrides (see the module docstring), or SearchError."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise SearchError(f"cannot parse the overrides {overrides}: {err}") from None
    distributions: dict[str, Any] = {}
    fixed, seeds = [], []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(f"{key}={override.get_value_element_as_str()}")
        elif key == "seed":
            if isinstance(override.value(), IntervalSweep):
                raise SearchError(f"{override.input_line}: seeds are not searched; list the seeds every "
                                  "trial runs, e.g. seed=0,1,2")
            seeds = [f"seed={v}" for v in override.sweep_string_iterator()]
        else:
            distributions[key] = distribution(key, override)
    twice = sorted(set(distributions) & {o.split("=", 1)[0] for o in fixed})
    if twice:
        raise SearchError(f"{twice[0]} is both searched and set to one value; give it once")
    if not distributions:
        raise SearchError(f"a search needs at least one key to search, written {SYNTAX} "
                          "(e.g. 'lr=tag(log,interval(0.005,0.2))')")
    return Space(distributions, fixed, seeds)


def distribution(key: str, override: Any) -> Any:
    """The Optuna distribution of one swept override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, ChoiceSweep) and not value.shuffle and not value.tags:
        choices = list(dict.fromkeys(override.sweep_string_iterator()))
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep) and not value.shuffle and not value.tags:
        values = list(override.sweep_iterator())
        if not values:
            raise SearchError(f"{override.input_line} is an empty range")
        if all(isinstance(v, int) for v in values):
            step = int(value.step)
            return IntDistribution(min(values), max(values), step=abs(step))
        return CategoricalDistribution([format_value(v) for v in values])
    if isinstance(value, IntervalSweep) and value.tags <= {"log"}:
        low, high, log = float(value.start), float(value.end), "log" in value.tags
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SearchError(f"{key}=interval({low},{high}): an interval needs finite bounds, low < high")
        if log and low <= 0:
            raise SearchError(f"{key}=tag(log,interval({low},{high})): a log interval needs low > 0")
        return FloatDistribution(low, high, log=log)
    raise SearchError(f"{override.input_line} is not a search space pflower-sweep --search takes; "
                      f"write {SYNTAX}")


def check_validation(space: Space) -> None:
    """Refuse a search whose runs would have no validation split: it could only rank by test."""
    from task.data.load import build_federation
    from task.run.config import compose_config
    from task.run.launch import join_overrides

    for overrides in space.corners():  # a value no trial could run is refused now, not trial by trial
        compose_config(join_overrides(overrides))
    cfg = compose_config(join_overrides(space.representative()))
    federation = build_federation(cfg)
    if not any(c.num_val for c in federation.clients):
        fraction = cfg.partition.get("val_fraction", 0.0)
        raise SearchError(
            "a search ranks its trials by the best round's mean validation accuracy (never by test), and "
            f"these runs have no validation split (partition.val_fraction={fraction}): add e.g. "
            "partition.val_fraction=0.2 (or give 'val' indices in partition=file's file)")


def trial_value(job_dirs: list[Path]) -> float | None:
    """A trial's value: the mean over its runs of the best round's mean validation accuracy."""
    values = []
    for directory in job_dirs:
        path = directory / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
        best = select_best_round(rows)
        if best is None:
            return None
        values.append(float(best["validation_accuracy"]["mean"]))
    return sum(values) / len(values) if values else None


def open_study(out: Path, space: Space) -> Any:
    """The study in ``out`` (created, or continued when it searched the same space)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(out / STUDY_FILE).resolve()}"
    try:
        study = optuna.create_study(storage=storage, study_name=STUDY_NAME, direction="maximize",
                                    load_if_exists=True)
    except Exception as err:  # noqa: BLE001 - SQLAlchemy's and Optuna's own errors alike
        raise SearchError(f"{out / STUDY_FILE} cannot be opened as an Optuna study ({type(err).__name__}); "
                          "move it aside to start a new search there, or give another --out") from None
    described = json.loads(json.dumps(space.describe()))
    saved = study.user_attrs.get(SPACE_KEY)
    if saved is None:
        study.set_user_attr(SPACE_KEY, described)
    elif saved != described:
        raise SearchError(f"{out / STUDY_FILE} holds a study of another search "
                          f"({_difference(saved, described)}); run this search with another --out, "
                          "or repeat the original overrides")
    return study


def _difference(saved: dict, now: dict) -> str:
    keys = [k for k in ("fixed", "seeds") if saved.get(k) != now.get(k)]
    keys += [f"{k}" for k in sorted(set(saved["distributions"]) | set(now["distributions"]))
             if saved["distributions"].get(k) != now["distributions"].get(k)]
    return "it differs in " + ", ".join(keys)


def lock_folder(out: Path) -> Any:
    """An exclusive lock on the search folder for this process's life (a second search into it
    would tell trials to the same study)."""
    handle = (out / LOCK_FILE).open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SearchError(f"another pflower-sweep --search is running in {out}; wait for it, "
                          "or give this one another --out") from None
    return handle


def search(space: Space, out: Path, trials: int,
           run_jobs: Callable[[list[list[str]], Path], tuple[dict[str, list[Path]], list[str]]]
           ) -> tuple[Any, list[str]]:
    """Run trials until the study holds ``trials`` finished ones; the study and the failed runs."""
    import optuna
    from optuna.trial import TrialState

    study = open_study(out, space)
    # Trials a stopped search left running: asked again with the same values (same folders, so
    # their runs resume from their checkpoints); the stale entries are closed as failed.
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.enqueue_trial(stale.params, user_attrs={"resumes": stale.number})
        study.tell(stale.number, state=TrialState.FAIL)
    failed: list[str] = []
    # Seeded by how far the study is: each invocation samples anew, and reproducibly.
    study.sampler = optuna.samplers.TPESampler(seed=len(study.get_trials(deepcopy=False)))
    while (done := _finished(study)) < trials:
        trial = study.ask(space.distributions)
        chosen = [f"{k}={format_value(v)}" for k, v in trial.params.items()]
        print(f"pflower-sweep: trial {trial.number} ({done + 1} of {trials}): {' '.join(chosen)}", flush=True)
        groups, failures = run_jobs(space.runs(chosen), out)
        job_dirs = [d for dirs in groups.values() for d in dirs]
        trial.set_user_attr("runs", [d.name for d in job_dirs])
        value = None if failures else trial_value(job_dirs)
        if value is None:
            failed += failures or [f"trial {trial.number} (its runs report no validation accuracy)"]
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)
    return study, failed


def finished_trials(study: Any) -> list[Any]:
    """The study's completed and failed trials, less those a later trial resumed."""
    from optuna.trial import TrialState

    resumed = {t.user_attrs.get("resumes") for t in study.get_trials(deepcopy=False)}
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL))
            if t.number not in resumed]


def _finished(study: Any) -> int:
    return len(finished_trials(study))


def write_ranking(study: Any, out: Path) -> list[dict]:
    """search.md / search.csv: the trials by value (best validation accuracy), best first."""
    rows = ranking_rows(study, out)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (out / "search.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [*ranking_table(rows), "", "Ranked by each trial's best round by mean validation accuracy (mean "
             "over its seeds); the test accuracy of that round is reported, never used to rank."]
    (out / "search.md").write_text("\n".join(lines) + "\n")
    return rows


def ranking_rows(study: Any, out: Path) -> list[dict]:
    """One dict per finished trial (its number, state, value, test accuracy at its best rounds
    and its parameters), best first."""
    rows = []
    for t in finished_trials(study):
        dirs = [out / name for name in t.user_attrs.get("runs", [])]
        rows.append({"trial": t.number, "state": t.state.name.lower(), "value": t.value,
                     "test_at_best": _test_at_best(dirs) if t.value is not None else None,
                     **{k: format_value(v) for k, v in t.params.items()}})
    rows.sort(key=lambda r: (r["value"] is None, -(r["value"] or 0.0), r["trial"]))
    return rows


def ranking_table(rows: list[dict]) -> list[str]:
    """search.md's table: ``rows`` (``ranking_rows``'s, best first) ranked 1, 2, ..."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    params = [k for k in keys if k not in ("trial", "state", "value", "test_at_best")]
    lines = ["| rank | trial | " + " | ".join(params) + " | best-round val acc | its test acc |",
             "|---" * (len(params) + 4) + "|"]
    for rank, r in enumerate(rows, 1):
        value = "failed" if r["value"] is None else f"{r['value']:.4f}"
        test = "—" if r["test_at_best"] is None else f"{r['test_at_best']:.4f}"
        lines.append(f"| {rank} | {r['trial']} | " + " | ".join(str(r.get(k, "")) for k in params)
                     + f" | {value} | {test} |")
    return lines


def _test_at_best(dirs: list[Path]) -> float | None:
    values = []
    for directory in dirs:
        path = directory / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
        best = select_best_round(rows)
        if best is None or not best.get("personalized_accuracy"):
            return None
        values.append(float(best["personalized_accuracy"]["mean"]))
    return sum(values) / len(values) if values else None


def main(overrides: list[str], out: Path, trials: int,
         run_jobs: Callable[[list[list[str]], Path], tuple[dict[str, list[Path]], list[str]]],
         summarize_only: bool = False) -> int:
    """The search's command: exit 0, 1 (a trial's run failed), 2 (refused) or 130 (stopped);
    ``summarize_only``: rewrite the ranking from the study, run nothing."""
    if trials < 1:
        print(f"pflower-sweep: --search {trials}: the number of trials must be at least 1", file=sys.stderr)
        return 2
    try:
        space = parse_space(overrides)
        check_validation(space)
        if out.exists() and not out.is_dir():
            raise SearchError(f"--out {out} is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_folder(out)
    except (SearchError, ConfigError, ValueError, OSError, KeyError) as err:
        print(f"pflower-sweep: {err}", file=sys.stderr)
        return 2
    try:
        if summarize_only:
            study, failed = open_study(out, space), []
        else:
            study, failed = search(space, out, trials, run_jobs)
    except SearchError as err:
        print(f"pflower-sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pflower-sweep: stopped; run the same command again to resume the search", file=sys.stderr)
        return 130
    finally:
        lock.close()
    rows = write_ranking(study, out)
    print((out / "search.md").read_text())
    best = next((r for r in rows if r["value"] is not None), None)
    if best is not None:
        print(f"pflower-sweep: best trial {best['trial']}: best-round validation accuracy "
              f"{best['value']:.4f}")
    if failed:
        print(f"pflower-sweep: runs failed: {', '.join(failed)} (their trials count as failed)",
              file=sys.stderr)
        return 1
    return 0
