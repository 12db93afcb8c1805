"""Every table and figure in README.md and docs/ that comes from a run: where it is, the
commands that produce its data, and how its markdown is written from their outputs.

Each entry's ``build`` calls the formatter the producing tool itself uses (pflower-sweep's
``_write_tables``, ``bench/*.py``'s ``table`` functions, the search's ``ranking_table``), so
a table in the docs can only have the columns the code writes today. ``empty`` is that
formatter's header with no runs (what tests/test_doc_tables.py compares the docs against).

Commands are written with ``{root}``, the folder their outputs go under (``sweeps`` unless
``docs/regenerate.py --root`` says otherwise); the settings are the published ones, as the
text beside each table states them.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import baselines, clustered_grid, prfl_attacks
from docs import comparisons as cmp
from task.run import comparison as paper_comparison
from task.run import launch, search, sweep

Lines = list[str]


@dataclass(frozen=True)
class Entry:
    """One generated table (or figure) of the docs."""

    id: str
    doc: str  # the markdown file holding it, relative to the repository
    commands: tuple[str, ...]  # what produces its data, with {root} for the output folder
    build: Callable[[Path, Path], Lines]  # (root, scratch folder) -> the table's lines / [image path]
    empty: Callable[[Path], Lines] | None = None  # scratch -> the formatter's header rows, no runs
    figure: bool = False
    done: Callable[[Path], bool] | None = None  # outputs already there: the commands are skipped


def table_lines(markdown: str) -> Lines:
    """The first table of a markdown text (its lines that start with ``|``)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


# --- pflower-sweep -------------------------------------------------------------------------

def sweep_groups(overrides: str, out: Path) -> dict[str, list[Path]]:
    """A sweep's job folders by row, as pflower-sweep names them for these overrides."""
    groups: dict[str, list[Path]] = {}
    for combo in sweep.expand(launch.split_arguments(shlex.split(overrides))):
        groups.setdefault(sweep.group_key(combo), []).append((out / sweep.job_name(combo)).resolve())
    return groups


def sweep_dir(overrides: str, out: Path, *wanted: str) -> Path:
    """The folder of the one job of a sweep whose overrides include every ``wanted`` one."""
    combos = sweep.expand(launch.split_arguments(shlex.split(overrides)))
    (combo,) = [c for c in combos if set(wanted) <= set(c)]
    return (out / sweep.job_name(combo)).resolve()


def sweep_empty(scratch: Path) -> Lines:
    sweep._write_tables([], scratch)
    return table_lines((scratch / "summary.md").read_text())


def sweep_table(overrides: str, folder: str) -> Callable[[Path, Path], Lines]:
    def build(root: Path, scratch: Path) -> Lines:
        sweep.summarize(sweep_groups(overrides, root / folder), scratch)
        return table_lines((scratch / "summary.md").read_text())
    return build


def sweep_figure(overrides: str, folder: str) -> Callable[[Path, Path], Lines]:
    def build(root: Path, scratch: Path) -> Lines:
        groups = sweep_groups(overrides, root / folder)
        if not any(sweep.completed(d) for dirs in groups.values() for d in dirs):
            return []  # no figure of no runs
        sweep.summarize(groups, scratch)
        return [str(scratch / "summary.png")]
    return build


DEFAULT = "strategy=lgmix,fedavg,fedbn seed=0,1,2 num_rounds=20"
DEFAULT_COMMAND = f"pflower-sweep {DEFAULT} --out {{root}}/default"

# --- bench/baselines.py --------------------------------------------------------------------

BASELINE_COMMANDS = (
    "python bench/baselines.py --methods fedper fedrep fedbabu lgfedavg apfl fedavg fedavg_ft local fedbn "
    "ditto --rounds 20 --seeds 0 --extra eval_every=5 --set fedrep:strategy.head_epochs=5 "
    "--out {root}/baselines/bl",
    "python bench/baselines.py --methods fedrod fml --rounds 20 --seeds 0 --extra eval_every=5 "
    "--out {root}/baselines/bl",
    "python bench/baselines.py --methods cfl perfedavg pfedme --rounds 20 --seeds 0 --extra eval_every=5 "
    "--out {root}/baselines/new",
    "python bench/baselines.py --methods perfedavg --rounds 20 --seeds 0 --extra eval_every=5 "
    "--set perfedavg:strategy.variant=hf --out {root}/baselines/hf",
    "python bench/baselines.py --methods cfl --rounds 20 --seeds 0 "
    "--extra 'eval_every=5 strategy.eps1=0.25 strategy.eps2=0.6' --out {root}/baselines/cfl",
    "python bench/baselines.py --methods fedavg --rounds 20 --seeds 0 --extra eval_every=5 "
    "--out {root}/baselines/fedavg",
)
# (row label, folder under {root}/baselines, method): docs/baselines.md's rows in its order
BASELINE_ROWS = (
    *((m, "bl", m) for m in ("fedavg", "fedavg_ft", "local", "fedbn", "ditto", "fedper", "fedrep",
                             "fedbabu", "lgfedavg", "apfl", "fedrod", "fml")),
    ("fedavg (rerun)", "fedavg", "fedavg"), ("pfedme", "new", "pfedme"),
    ("perfedavg (FO)", "new", "perfedavg"), ("perfedavg (HF)", "hf", "perfedavg"),
    ("cfl (eps 0.4 / 1.6)", "new", "cfl"), ("cfl (eps 0.25 / 0.6)", "cfl", "cfl"),
)


def baselines_build(root: Path, scratch: Path) -> Lines:
    rows = []
    for label, folder, method in BASELINE_ROWS:
        runs = [r for r in baselines.read_runs(root / "baselines" / folder) if r["method"] == method]
        if runs:  # a row without its run is left out (has_numbers refuses a table of none)
            rows.append((label, runs))
    return baselines.table(rows)


def baselines_done(root: Path) -> bool:
    """Every row has its run (bench/baselines.py would refuse to write into a used folder)."""
    return all(any(r["method"] == m for r in baselines.read_runs(root / "baselines" / f))
               for _, f, m in BASELINE_ROWS)


# --- bench/prfl_attacks.py and the clustered sweeps (docs/clustered.md) ----------------------

ATTACKS = list(prfl_attacks.ATTACKS)
PRFL = ("dataset=mnist5k partition=relabel partition.num_clients=40 partition.num_clusters=4 model=mlp "
        "model.hidden=200 lr=0.02 momentum=0.9 batch_size=32 num_rounds=25 seed=0 attack.fraction=0.2")
PRFL_FEDAVG = f"{PRFL} strategy=fedavg attack=none,gaussian,bitflip,signflip,labelflip,alie,ipm"
PRFL_BASELINES = f"{PRFL} attack=none strategy=ifca,local"
PRFL_PER_CLIENT = (f"{PRFL} strategy=clustered_per_client "
                   "attack=none,signflip,alie,bitflip,gaussian,labelflip,ipm")
# The 25-round table's `oracle` column was `--methods oracle` at d7dfe35, which is today's
# oracle_tc (the page says so); today's `oracle` is the papers' plain per-cluster FedAvg.
PRFL_COMMANDS = (
    "python bench/prfl_attacks.py --methods clustered,oracle_tc --jobs 2 --out {root}/prfl_attacks",
    f"pflower-sweep {PRFL_FEDAVG} --out {{root}}/prfl_fedavg",
    f"pflower-sweep {PRFL_BASELINES} --out {{root}}/prfl_baselines",
    f"pflower-sweep {PRFL_PER_CLIENT} --out {{root}}/prfl_per_client",
)


def prfl_columns(root: Path) -> dict[str, dict[str, Path]]:
    """The 25-round table's columns: each attack's run folder."""
    def sweep_runs(overrides: str, folder: str, strategy: str, attacks: list[str]) -> dict[str, Path]:
        return {a: sweep_dir(overrides, root / folder, f"strategy={strategy}", f"attack={a}")
                for a in attacks}
    return {
        "clustered (robust)": {a: root / "prfl_attacks" / f"clustered-{a}" for a in ATTACKS},
        "oracle=tc (robust)": {a: root / "prfl_attacks" / f"oracle_tc-{a}" for a in ATTACKS},
        "clustered_per_client (robust)": sweep_runs(PRFL_PER_CLIENT, "prfl_per_client",
                                                    "clustered_per_client", ATTACKS),
        "fedavg": sweep_runs(PRFL_FEDAVG, "prfl_fedavg", "fedavg", ATTACKS),
        "ifca": sweep_runs(PRFL_BASELINES, "prfl_baselines", "ifca", ["none"]),
        "local": sweep_runs(PRFL_BASELINES, "prfl_baselines", "local", ["none"]),
    }


def prfl_table(folder: str, methods: dict[str, str]) -> Callable[[Path, Path], Lines]:
    """bench/prfl_attacks.py's table of one --out folder; ``methods``: column label -> method."""
    def build(root: Path, scratch: Path) -> Lines:
        return prfl_attacks.table_of({label: {a: root / folder / f"{m}-{a}" for a in ATTACKS}
                                      for label, m in methods.items()}, ATTACKS)
    return build


def prfl_empty(labels: list[str]) -> Callable[[Path], Lines]:
    return lambda scratch: prfl_attacks.table_of({label: {} for label in labels}, ATTACKS)[:2]


SMALL = {m: m for m in ("clustered_paper", "clustered", "oracle", "oracle_tc", "ifca")}
GRID = (["paper", "robust"], ["0.05", "0.02"], ["0", "0.9"], [0, 1, 2])

# --- pflower-sweep --search (docs/search.md) -----------------------------------------------

SEARCH = ("pflower-sweep --search {n} strategy=ditto 'strategy.lam=choice(0.1,1,10)' "
          "'lr=tag(log,interval(0.01,0.2))' partition.val_fraction=0.2 num_rounds=5 --out {root}/search")


def search_table(trials: int) -> Callable[[Path, Path], Lines]:
    """search.md's table of the study's first ``trials`` trials (a study continued past them
    still holds them, ranked among themselves as they were then)."""
    def build(root: Path, scratch: Path) -> Lines:
        import optuna

        out = root / "search"
        if not (out / search.STUDY_FILE).exists():
            return []
        study = optuna.load_study(study_name=search.STUDY_NAME,
                                  storage=f"sqlite:///{(out / search.STUDY_FILE).resolve()}")
        return search.ranking_table([r for r in search.ranking_rows(study, out) if r["trial"] < trials])
    return build


def search_empty(scratch: Path) -> Lines:
    fake = {"trial": 0, "state": "complete", "value": None, "test_at_best": None,
            "strategy.lam": "", "lr": ""}  # the two searched keys of the page's command
    return search.ranking_table([fake])[:2]


# --- pflower-sim new_clients=0.2 (docs/new_clients.md) ----------------------------------------

# (row label, folder under {root}/new_clients, the strategy's overrides); the page's runs had
# the default output folder: output_dir only names one for each here.
NEW_CLIENTS = (("fedavg", "fedavg", "strategy=fedavg"), ("ditto", "ditto", "strategy=ditto"),
               ("ditto, `strategy.personal_init=received`", "ditto-received",
                "strategy=ditto strategy.personal_init=received"), ("lgmix", "lgmix", "strategy=lgmix"))
NEW_CLIENTS_HEADER = ("| strategy | training clients: personal acc (mean / worst) "
                      "| new clients: acc (mean / worst) | new clients: global model |", "|---|---|---|---|")


def new_clients_row(label: str, results: dict) -> str:
    """One row from a run's results.json."""
    def pair(acc: dict | None) -> str:
        return "—" if acc is None else f"{acc['mean']:.4f} / {acc['worst']:.4f}"
    glob = results.get("new_client_global_accuracy")
    return (f"| {label} | {pair(results['final_accuracy'])} | {pair(results.get('new_client_accuracy'))} | "
            f"{'—' if glob is None else f'{glob:.4f}'} |")


def new_clients_build(root: Path, scratch: Path) -> Lines:
    found = [(label, root / "new_clients" / folder / "results.json") for label, folder, _ in NEW_CLIENTS]
    return [*NEW_CLIENTS_HEADER, *(new_clients_row(label, json.loads(path.read_text()))
                                   for label, path in found if path.exists())]


# --- pflower-sweep --comparison: a published table's rows beside its figures ------------------

# (a suffix for the rows' labels, the command line's overrides, --methods or None, --out's folder)
ComparisonSweep = tuple[str, str, str | None, str]


def comparison_commands(name: str, sweeps: list[ComparisonSweep]) -> tuple[str, ...]:
    return tuple(f"pflower-sweep --comparison {name} {overrides}" + (f" --methods {m}" if m else "")
                 + f" --out {{root}}/{folder}" for _, overrides, m, folder in sweeps)


def comparison_table(name: str, sweeps: list[ComparisonSweep]) -> Callable[[Path, Path], Lines]:
    """The comparison's summary table (task/run/comparison.py's ``table``) over the finished
    runs of one or more of its sweeps, each sweep's rows labelled with its suffix."""
    def build(root: Path, scratch: Path) -> Lines:
        spec = paper_comparison.load(name)
        rows = []
        for i, (suffix, overrides, methods, folder) in enumerate(sweeps):
            jobs = paper_comparison.plan(spec, shlex.split(overrides), root / folder,
                                         methods.split(",") if methods else None, False, sweep)
            (scratch / str(i)).mkdir(parents=True, exist_ok=True)
            rows += sweep.summarize(paper_comparison.run_folders(jobs, suffix), scratch / str(i))
        return table_lines(paper_comparison.table(spec, rows, False, [], sweep._fmt))
    return build


def comparison_figure(name: str, sweeps: list[ComparisonSweep]) -> Callable[[Path, Path], Lines]:
    """The first sweep's summary.png (each row's mean personal accuracy per round)."""
    def build(root: Path, scratch: Path) -> Lines:
        has_rows = len(comparison_table(name, sweeps[:1])(root, scratch)) > 2
        return [str(scratch / "0" / "summary.png")] if has_rows else []
    return build


def comparison_empty(name: str) -> Callable[[Path], Lines]:
    return lambda scratch: table_lines(paper_comparison.table(paper_comparison.load(name), [], False, [],
                                                              sweep._fmt))


PFLLIB = [("", "num_rounds=15 backend=local", None, "pfllib")]
PFLLIB_CHECKS = [("(alpha 1.0, rho 0.02: PFLlib's)", "num_rounds=15 backend=local strategy.alpha=1.0 "
                  "strategy.alpha_reg=0.02", "apfl", "pfllib_apfl1"),
                 ("(60 rounds)", "num_rounds=60 backend=local", "fedper", "pfllib_long")]


# --- several sweeps side by side with their trade-off figure (docs/fedclup.md, docs/pfml.md) ----

def comparison(prefix: str, doc: str, rows: list[cmp.Row], columns: list[cmp.Column], target: float,
               run_target: float | None) -> tuple[Entry, Entry]:
    """The table and its figure (``<prefix>-figure``); the sweeps ran with ``--target
    run_target`` (None: without it; it only changes their own report), the table reads them at
    ``target``."""
    commands = cmp.commands(rows, run_target)
    return (Entry(prefix, doc, commands, lambda root, scratch: cmp.table(rows, columns, root, target),
                  lambda scratch: cmp.table([], columns, scratch, target)),
            Entry(f"{prefix}-figure", doc, commands,
                  lambda root, scratch: cmp.figure(rows, root, scratch, target), figure=True))


# The MLP sweeps ran with --target 0.9 and were read at 0.96 (--summarize-only, as the page
# says). The CNN's: the page states its settings (the preset, local_epochs=1, seed 0, target
# 0.9) without a command line; these are the MLP's commands with them.
FEDCLUP = (*comparison("fedclup-mlp", "docs/fedclup.md", cmp.fedclup_rows("model=mlp model.hidden=100", "0,1",
                                                                          "lam_mlp"),
                       cmp.fedclup_columns(0.96, "R^ = mean ‖w_i − w_g‖"), 0.96, 0.9),
           *comparison("fedclup-cnn", "docs/fedclup.md", cmp.fedclup_rows("local_epochs=1", "0", "lam_cnn"),
                       cmp.fedclup_columns(0.9, "R^"), 0.9, 0.9))
# PFML's sweeps ran without --target; write_report over their folders made the rest (the page).
PFML = comparison("pfml", "docs/pfml.md", cmp.PFML_ROWS, cmp.pfml_columns(0.95), 0.95, None)

ENTRIES = (
    Entry("readme-default-federation", "README.md", (DEFAULT_COMMAND,),
          sweep_table(DEFAULT, "default"), sweep_empty),
    Entry("results-default-federation", "docs/results/default-federation.md", (DEFAULT_COMMAND,),
          sweep_table(DEFAULT, "default"), sweep_empty),
    Entry("readme-default-federation-figure", "README.md", (DEFAULT_COMMAND,),
          sweep_figure(DEFAULT, "default"), figure=True),
    Entry("baselines", "docs/baselines.md", BASELINE_COMMANDS, baselines_build,
          lambda scratch: list(baselines.HEADER), done=baselines_done),
    Entry("clustered-attacks", "docs/clustered.md", PRFL_COMMANDS,
          lambda root, scratch: prfl_attacks.table_of(prfl_columns(root), ATTACKS),
          lambda scratch: prfl_attacks.table_of({label: {} for label in prfl_columns(scratch)}, ATTACKS)[:2]),
    Entry("clustered-iid", "docs/clustered.md",
          ("python bench/prfl_attacks.py --partition iid --methods fedavg --rounds 10 "
           "--out {root}/prfl_iid",),
          prfl_table("prfl_iid", {"fedavg (mean), iid": "fedavg"}), prfl_empty(["fedavg (mean), iid"])),
    Entry("clustered-small", "docs/clustered.md",
          ("OMP_NUM_THREADS=1 python bench/prfl_attacks.py --methods "
           "clustered_paper,clustered,oracle,oracle_tc,ifca --clients 20 --rounds 5 "
           "--out {root}/prfl_attacks_small",),
          prfl_table("prfl_attacks_small", SMALL), prfl_empty(list(SMALL))),
    Entry("clustered-grid", "docs/clustered.md",
          ("OMP_NUM_THREADS=1 python bench/clustered_grid.py --out {root}/clustered_grid --clients 20 "
           "--rounds 5 --extra model.hidden=64",),
          lambda root, scratch: clustered_grid.table(root / "clustered_grid", *GRID),
          lambda scratch: clustered_grid.table(scratch / "none", *GRID)[:2]),
    Entry("search-4", "docs/search.md", (SEARCH.replace("{n}", "4"),), search_table(4), search_empty),
    Entry("search-6", "docs/search.md", (SEARCH.replace("{n}", "4"), SEARCH.replace("{n}", "6")),
          search_table(6), search_empty),
    *FEDCLUP, *PFML,
    Entry("pfllib-fmnist", "docs/baselines.md", comparison_commands("pfllib_fmnist", PFLLIB),
          comparison_table("pfllib_fmnist", PFLLIB), comparison_empty("pfllib_fmnist")),
    Entry("pfllib-fmnist-figure", "docs/baselines.md", comparison_commands("pfllib_fmnist", PFLLIB),
          comparison_figure("pfllib_fmnist", PFLLIB), figure=True),
    Entry("pfllib-fmnist-checks", "docs/baselines.md", comparison_commands("pfllib_fmnist", PFLLIB_CHECKS),
          comparison_table("pfllib_fmnist", PFLLIB_CHECKS), comparison_empty("pfllib_fmnist")),
    Entry("new-clients", "docs/new_clients.md",
          tuple(f"pflower-sim {o} new_clients=0.2 num_rounds=10 output_dir={{root}}/new_clients/{f}"
                for _, f, o in NEW_CLIENTS), new_clients_build, lambda scratch: list(NEW_CLIENTS_HEADER),
          # pflower-sim refuses a used folder: the runs are made once (remove them to rerun)
          done=lambda root: all((root / "new_clients" / f / "results.json").exists()
                                for _, f, _o in NEW_CLIENTS)),
)
BY_ID = {entry.id: entry for entry in ENTRIES}
