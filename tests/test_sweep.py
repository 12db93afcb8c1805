"""The sweep tool's grid expansion and summary (jobs faked: no Flower run here)."""

from __future__ import annotations

import json

from task.run.sweep import expand, group_key, job_name, summarize


def test_expand_takes_the_cartesian_product_of_swept_values():
    combos = expand(["strategy=lgmix,fedavg", "seed=range(0,3)", "num_rounds=2"])
    assert len(combos) == 6
    assert ["strategy=fedavg", "seed=2", "num_rounds=2"] in combos
    assert group_key(combos[0]) == "strategy=lgmix num_rounds=2"
    assert job_name(["dataset.domains=[a,b]", "seed=1"]) == "dataset.domains-a-b-_seed-1"
    assert job_name(["lr=1e+30"]) != job_name(["lr=1e-30"])
    long = [f"strategy.key{i}=value{i}" for i in range(30)]
    assert len(job_name(long)) <= 180 and job_name(long) != job_name(long[:-1] + ["strategy.key29=other"])


def _fake_job(directory, accs, global_acc=0.5):
    directory.mkdir(parents=True)
    rows = [{"round": i + 1, "personalized_accuracy": {"mean": a, "weighted": a, "worst": a / 2},
             "global_accuracy": global_acc} for i, a in enumerate(accs)]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = max(rows, key=lambda r: r["personalized_accuracy"]["mean"])
    (directory / "results.json").write_text(json.dumps({
        "last_evaluated_round": rows[-1], "best_round": best, "bytes_up": 1e6, "bytes_down": 2e6,
        "wall_seconds": 3.0}))


def test_summary_averages_over_seeds_and_writes_table_and_plot(tmp_path):
    _fake_job(tmp_path / "a0", [0.2, 0.6])
    _fake_job(tmp_path / "a1", [0.3, 0.8])
    _fake_job(tmp_path / "b0", [0.1, 0.4], global_acc=None)
    rows = summarize({"strategy=a": [tmp_path / "a0", tmp_path / "a1"],
                      "strategy=b": [tmp_path / "b0"]}, tmp_path)
    a = rows[0]
    # the sample standard deviation (ddof=1) of 0.6 and 0.8: 0.1414 (np.std's default: 0.1)
    assert a["seeds"] == 2 and abs(a["final_mean"] - 0.7) < 1e-12
    assert abs(a["final_mean_std"] - 0.02 ** 0.5) < 1e-12 and a["final_mean_n"] == 2
    assert abs(a["mbytes_total"] - 3.0) < 1e-12 and rows[1]["final_global"] is None
    assert rows[1]["final_global_n"] == 0 and rows[1]["final_mean_std"] is None  # one seed: no std
    table = (tmp_path / "summary.md").read_text()
    assert "0.7000 ± 0.1414" in table and "| strategy=b | 1 | 0.4000 |" in table
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["run", "seeds", "final_mean", "final_mean_std", "final_mean_n"]
    assert (tmp_path / "summary.png").stat().st_size > 0 and (tmp_path / "summary.csv").exists()


def test_an_interrupted_job_is_resumed_and_one_without_checkpoint_restarts_in_a_clean_folder(tmp_path):
    from task.run.sweep import completed, job_arguments

    resumable = tmp_path / "a"
    resumable.mkdir()
    for name in ("checkpoint.npz", "config.yaml", "metrics.jsonl"):
        (resumable / name).write_text("x")
    (resumable / "status.json").write_text(json.dumps({"status": "stopped"}))
    assert not completed(resumable)
    expected = ["seed=0", f"output_dir={resumable}", f"resume={resumable}"]
    assert job_arguments(["seed=0"], resumable) == expected
    early = tmp_path / "b"
    early.mkdir()
    (early / "partition.json").write_text("{}")
    assert job_arguments(["seed=0"], early) == ["seed=0", f"output_dir={early}"]
    assert not early.exists() and [p.name for p in tmp_path.glob("b.incomplete-*")]
    (resumable / "status.json").write_text(json.dumps({"status": "completed"}))
    assert completed(resumable)
