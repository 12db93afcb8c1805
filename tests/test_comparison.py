"""The seed papers' comparison files (conf/comparison/) and `pflower-sweep --comparison`'s refusals
(no job runs here; tests/test_comparison_run.py runs one for real)."""

from __future__ import annotations

import pytest

import strategies
from task.run import comparison, sweep
from task.run.config import ConfigError
from task.run.schema import STRATEGY_SCHEMAS
from task.run.sweep import main

NAMES = comparison.available()


SEED_PAPERS = ["fedclup_mnist", "fedslr_cifar10", "lgmix_digits5", "pfml_mnist", "prfl_mnist"]
BENCHMARKS = ["pfllib_fmnist"]  # a published benchmark's table (PFLlib's), not a seed paper's


def test_every_seed_paper_has_a_comparison():
    assert sorted(SEED_PAPERS + BENCHMARKS) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_every_row_is_a_registered_method_with_its_own_keys_and_composes(name):
    spec = comparison.load(name)
    strategies.load_all()
    assert spec.rows and len({r.label for r in spec.rows}) == len(spec.rows)
    for row in spec.rows:
        assert row.method in strategies.REGISTRY, row
        for key in row.overrides:
            if key.startswith("strategy."):
                assert key.removeprefix("strategy.") in STRATEGY_SCHEMAS[row.method], (row.label, key)
    for missing in spec.missing:
        assert missing["method"] not in strategies.REGISTRY and missing["reason"]
    # every row's whole config, with and without the offline stand-in, validates against the schemas
    comparison.check(spec)
    comparison.check(spec, stand_in=True)


def test_a_preset_strategy_key_is_reset_or_removed_for_another_method():
    pfedme, fedavg = (next(r for r in comparison.load("pfml_mnist").rows if r.method == m)
                      for m in ("pfedme", "fedavg"))
    assert "strategy.K=3" in comparison.row_overrides(pfedme)  # the row's own value over the default 5
    assert "strategy.inner_l2=0.0" not in comparison.row_overrides(pfedme)  # not the preset's key
    assert {"~strategy.K", "local_epochs=10"} <= set(comparison.row_overrides(fedavg))
    fc = comparison.load("prfl_mnist").rows[0]
    assert comparison.row_overrides(fc) == ["+experiment=prfl_mnist"]  # the preset's own method: untouched


def test_a_bad_row_is_named():
    spec = comparison.load("pfml_mnist")
    bad = comparison.Comparison(**{**spec.__dict__, "rows": [comparison.Row("fedavg", "fedavg", "pfml_mnist",
                                                                               {"strategy.lam": 1.0})]})
    with pytest.raises(ConfigError, match="row fedavg: strategy.lam is not a key of strategy=fedavg"):
        comparison.check(bad)


def test_an_unknown_comparison_exits_2_naming_the_valid_ones(tmp_path, capsys):
    assert main(["--comparison", "lgmix", "--out", str(tmp_path)], run_job=lambda a: pytest.fail("ran")) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pflower-sweep: there is no comparison 'lgmix'; the comparisons: {', '.join(NAMES)}"
    assert main(["--comparison", "pfml_mnist", "--methods", "scaffold", "--out", str(tmp_path)],
                run_job=lambda a: pytest.fail("ran")) == 2
    assert "--methods scaffold: not rows of comparison pfml_mnist" in capsys.readouterr().err


FAMILIES = ["global", "local (lower bound)", "fine-tuning", "partial sharing", "regularized", "interpolation",
            "meta-learning", "clustering", "mutual learning", "low-rank + sparse"]


def test_the_readme_methods_table_lists_every_method_grouped_by_family():
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
    start = lines.index("| family | name | client | personal model | module |") + 2
    rows = [line.split("|") for line in lines[start:] if line.startswith("|")]
    rows = rows[:next((i for i, r in enumerate(rows) if len(r) != 7), len(rows))]
    families = [r[1].strip() for r in rows]
    assert families == sorted(families, key=FAMILIES.index)  # each family one block, in this order
    assert {r[2].strip().split("`")[1] for r in rows} == set(strategies.REGISTRY)


def _summary_row(run: str, rounds_weighted: list[float | None]) -> dict:
    """A sweep's summary row for one seed whose rounds had these weighted test accuracies."""
    rounds = [{"round": i + 1, "personalized_accuracy": None if w is None else {"weighted": w}}
              for i, w in enumerate(rounds_weighted)]
    row = {"run": run, "seeds": 1, "peak_weighted": sweep.peak_weighted(rounds), "peak_weighted_std": None}
    for key in ("final_mean", "final_worst", "best_val_mean", "best_mean", "final_global", "mbytes_total",
                "wall_seconds"):
        row[key], row[f"{key}_std"] = 0.5, None
    return row


def test_peak_weighted_is_the_best_rounds_weighted_accuracy_not_the_last():
    assert sweep.peak_weighted([]) is None
    assert _summary_row("x", [0.6, None, 0.9, 0.7])["peak_weighted"] == 0.9


def test_a_paper_selection_puts_pflowers_figure_by_the_same_rule_beside_the_papers():
    spec = comparison.load("pfllib_fmnist")
    assert spec.paper_selection == "peak_weighted"
    text = comparison.table(spec, [_summary_row("fedper", [0.7, 0.93, 0.91])], False, [], sweep._fmt)
    header = next(line for line in text.splitlines() if line.startswith("| method"))
    row = next(line for line in text.splitlines() if line.startswith("| fedper"))
    assert header.split(" | ")[1:3] == ["paper", "peak round: weighted test acc (the paper's selection)"]
    assert row.split(" | ")[1:4] == ["97.44", "0.9300", "1"]
    assert len(row.split("|")) == len(header.split("|"))
    plain = comparison.Comparison(**{**spec.__dict__, "paper_selection": ""})
    assert "peak round" not in comparison.table(plain, [_summary_row("fedper", [0.7])], False, [], sweep._fmt)


def test_an_unknown_paper_selection_is_refused_naming_the_valid_one(tmp_path):
    (tmp_path / "bad.yaml").write_text((comparison.COMPARISONS / "pfllib_fmnist.yaml").read_text()
                                       .replace("paper_selection: peak_weighted", "paper_selection: last"))
    with pytest.raises(ConfigError, match="paper_selection='last'; valid: peak_weighted"):
        comparison.load("bad", tmp_path)


def test_pfllib_fmnist_preset_is_pfllibs_benchmark_setting():
    from task.run.config import compose_config

    cfg = compose_config("+experiment=pfllib_fmnist")
    assert (cfg.strategy.name, cfg.dataset.name, cfg.partition.name, cfg.model.name) == (
        "fedavg", "fashion_mnist", "dirichlet", "fedavg_cnn")
    assert (cfg.partition.num_clients, cfg.partition.alpha, cfg.partition.self_balancing) == (20, 0.1, True)
    assert (cfg.batch_size, cfg.lr, cfg.local_epochs, cfg.fraction_train) == (10, 0.005, 1, 1.0)
    assert (cfg.momentum, cfg.weight_decay, cfg.num_rounds, cfg.eval_every) == (0.0, 0.0, 2000, 1)
    # the preset sets no strategy key, so any method runs on it by hand
    assert compose_config("+experiment=pfllib_fmnist strategy=fedrep").strategy.name == "fedrep"


def test_run_folders_put_one_rows_seeds_together_in_the_jobs_order(tmp_path):
    jobs = [comparison.Job(label, tmp_path / f"{label}-{seed}", [])
            for seed in (0, 1) for label in ("a", "b")]
    assert comparison.run_folders(jobs) == {"a": [tmp_path / "a-0", tmp_path / "a-1"],
                                            "b": [tmp_path / "b-0", tmp_path / "b-1"]}
    assert list(comparison.run_folders(jobs[:1], "(60 rounds)")) == ["a (60 rounds)"]
