"""``pflower-sweep --search``: Optuna trials ranked by validation, a resumable study, a door."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from task.run import sweep
from task.run.search import SearchError, parse_space
from tests.helpers import TINY


def _arguments(arguments: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in arguments)


class FakeJobs:
    """A job that writes a completed run folder whose validation accuracy is ``lr`` and whose
    test accuracy is ``1 - lr``: ranking by test would put the smallest lr first."""

    def __init__(self, stop_at: int | None = None):
        self.calls: list[list[str]] = []
        self.stop_at = stop_at

    def __call__(self, arguments: list[str]) -> int:
        self.calls.append(arguments)
        if self.stop_at is not None and len(self.calls) == self.stop_at:
            return 130  # Ctrl-C in the middle of this job
        values = _arguments(arguments)
        lr, folder = float(values["lr"]), Path(values["output_dir"])
        folder.mkdir(parents=True, exist_ok=True)
        row = {"round": 1, "personalized_accuracy": {"mean": 1 - lr, "weighted": 1 - lr, "worst": 0.0},
               "validation_accuracy": {"mean": lr, "weighted": lr, "worst": 0.0}}
        (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
        (folder / "status.json").write_text(json.dumps({"status": "completed"}))
        return 0


SPACE = ["lr=interval(0.01,0.5)", "num_rounds=1", "partition.val_fraction=0.25", TINY]


def test_trials_are_ranked_by_validation_and_the_study_resumes(tmp_path, capsys):
    jobs = FakeJobs()
    assert sweep.main(["--search", "3", *SPACE, "--out", str(tmp_path)], run_job=jobs) == 0
    assert len(jobs.calls) == 3 and (tmp_path / "study.db").exists()
    table = (tmp_path / "search.md").read_text().splitlines()
    lrs = [float(_arguments(c)["lr"]) for c in jobs.calls]
    assert f"| {max(lrs):.6g} | {max(lrs):.4f} |" in table[2]  # rank 1: the highest validation
    assert sweep.main(["--search", "3", *SPACE, "--out", str(tmp_path)], run_job=jobs) == 0
    assert len(jobs.calls) == 3  # the study holds 3 finished trials: nothing runs again
    assert sweep.main(["--search", "4", *SPACE, "--out", str(tmp_path)], run_job=jobs) == 0
    assert len(jobs.calls) == 4 and "| 4 |" in (tmp_path / "search.md").read_text()
    (tmp_path / "search.md").unlink()
    only = ["--search", "9", "--summarize-only", *SPACE, "--out", str(tmp_path)]
    assert sweep.main(only, run_job=jobs) == 0
    assert len(jobs.calls) == 4 and "| 4 |" in (tmp_path / "search.md").read_text()
    other = ["lr=interval(0.01,0.2)", *SPACE[1:]]
    assert sweep.main(["--search", "4", *other, "--out", str(tmp_path)], run_job=jobs) == 2
    assert "holds a study of another search (it differs in lr)" in capsys.readouterr().err


def test_a_stopped_trial_is_resumed_with_its_values_and_folder(tmp_path):
    stopping = FakeJobs(stop_at=2)
    assert sweep.main(["--search", "2", *SPACE, "--out", str(tmp_path)], run_job=stopping) == 130
    jobs = FakeJobs()
    assert sweep.main(["--search", "2", *SPACE, "--out", str(tmp_path)], run_job=jobs) == 0
    assert jobs.calls == [stopping.calls[1]]  # the interrupted trial's run, its folder, again
    rows = (tmp_path / "search.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in r for r in rows[1:])


def test_bad_search_syntax_and_a_search_without_validation_exit_2(tmp_path, capsys):
    for bad, said in [("lr=interval(0.1,0.01)", "low < high"), ("lr=shuffle(0.1,0.2)", "interval(a,b)"),
                      ("lr=tag(log,interval(0,1))", "log interval needs low > 0"),
                      ("lr=interval(0.1,0.2", "cannot parse"), ("lr=interval(0.01,20)", "lr=20"),
                      ("strategy=choice(fedavg,nosuch)", "Could not find 'strategy/nosuch'"),
                      ("seed=interval(0,3)", "seeds are not searched")]:
        assert sweep.main(["--search", "2", bad, "--out", str(tmp_path)], run_job=FakeJobs()) == 2
        assert said in capsys.readouterr().err
    assert sweep.main(["--search", "2", "lr=interval(0.01,0.1)", TINY, "--out", str(tmp_path)],
                      run_job=FakeJobs()) == 2
    assert "partition.val_fraction=0.0" in capsys.readouterr().err
    assert sweep.main(["--search", "0", "lr=interval(0.01,0.1)", "--out", str(tmp_path)]) == 2
    try:
        parse_space(["num_rounds=2"])
    except SearchError as err:
        assert "at least one key to search" in str(err)
    else:
        raise AssertionError("a search with nothing to search was accepted")
    space = parse_space(["x=range(1,10,3)", "y=a,b", "seed=0,1", "z=tag(log,interval(1e-3,1))"])
    x = space.distributions["x"]
    assert (x.low, x.high, x.step) == (1, 7, 3)
    assert space.distributions["y"].choices == ("a", "b") and space.distributions["z"].log
    assert space.runs(["x=4"]) == [["x=4", "seed=0"], ["x=4", "seed=1"]]


def run_in_process(arguments: list[str]) -> int:
    """One job through the real ServerApp and ClientApp handlers (tests/fake_grid.py)."""
    import server_app
    from tests.fake_grid import FakeGrid

    overrides = " ".join(arguments)
    server_app.main(FakeGrid(4, overrides), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                    run_config={"overrides": overrides}))
    return 0


@pytest.mark.slow
def test_a_tiny_real_search_ranks_real_runs_by_their_validation_accuracy(tmp_path):
    argv = ["--search", "2", "lr=tag(log,interval(0.01,0.3))", "strategy=fedavg", "num_rounds=2",
            "partition.val_fraction=0.25", TINY, "--out", str(tmp_path)]
    assert sweep.main(argv, run_job=run_in_process) == 0
    import optuna

    study = optuna.load_study(study_name="pflower-search", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 2
    for trial in study.trials:
        (run,) = trial.user_attrs["runs"]
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert trial.value == results["best_round"]["validation_accuracy"]["mean"]
    ranked = [float(line.split(",")[2]) for line in (tmp_path / "search.csv").read_text().splitlines()[1:]]
    assert ranked == sorted((t.value for t in study.trials), reverse=True)
