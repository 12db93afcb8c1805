"""The evaluation protocol: validation-only round selection, per-group accuracy, presets."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

import server_app
from task.core.training import batches
from task.data.load import build_federation, load_federation
from task.run.config import ConfigError, available_presets, compose_config
from task.run.outputs import NO_SELECTION, RunOutputs, select_best_round
from task.run.sweep import summarize

from .fake_grid import FakeGrid
from .helpers import TINY


def _run(overrides: str) -> tuple[list[dict], dict]:
    server_app.main(FakeGrid(4, overrides), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                                    run_config={"overrides": overrides}))
    out = Path(compose_config(overrides).output_dir)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "results.json").read_text())


def _row(r: int, val: float | None, test: float) -> dict:
    row = {"round": r, "personalized_accuracy": {"mean": test, "weighted": test, "worst": test}}
    if val is not None:
        row["validation_accuracy"] = {"mean": val, "weighted": val, "worst": val}
    return row


def test_the_best_round_is_the_best_validation_round_whatever_the_test_accuracy():
    rows = [_row(1, 0.5, 0.9), _row(2, 0.8, 0.1), _row(3, 0.8, 0.95), _row(4, 0.7, 0.99)]
    assert select_best_round(rows)["round"] == 2  # highest validation, earliest of equals
    assert select_best_round([_row(1, None, 0.9), _row(2, None, 0.5)]) is None


def test_changing_test_labels_cannot_change_the_selected_round(tmp_path, monkeypatch):
    base = f"{TINY} strategy=fedavg num_rounds=4 partition.val_fraction=0.3"
    rows, results = _run(f"{base} output_dir={tmp_path / 'a'}")
    assert len({r["validation_accuracy"]["mean"] for r in rows}) > 1, "a selection needs distinct rounds"
    fed = load_federation(compose_config(base), torch.device("cpu"))
    for c in fed.clients:  # the cached federation both halves read: every test label now wrong
        monkeypatch.setattr(c, "y_test", (c.y_test + 1) % 10)
    flipped_rows, flipped = _run(f"{base} output_dir={tmp_path / 'b'}")
    for r, f in zip(rows, flipped_rows, strict=True):
        assert r["validation_accuracy"] == pytest.approx(f["validation_accuracy"], abs=1e-12)
    assert [r["personalized_accuracy"] for r in rows] != [r["personalized_accuracy"] for r in flipped_rows]
    assert results["best_round"]["round"] == flipped["best_round"]["round"]
    best = results["best_round"]
    assert best["validation_accuracy"]["mean"] == max(r["validation_accuracy"]["mean"] for r in rows)
    assert results["best_accuracy"] == best["personalized_accuracy"]  # the test accuracy of that round
    assert "validation" in results["selection"]


def test_without_validation_data_there_is_only_the_final_round(tmp_path):
    rows, results = _run(f"{TINY} strategy=fedavg num_rounds=2 output_dir={tmp_path / 'r'}")
    assert all("validation_accuracy" not in r for r in rows)
    assert results["best_round"] is None and results["best_accuracy"] is None
    assert results["selection"] == NO_SELECTION
    assert results["final_accuracy"] == rows[-1]["personalized_accuracy"]
    lines = RunOutputs.summary_lines(results)
    assert any(NO_SELECTION in line for line in lines)


def test_group_accuracy_is_the_mean_of_its_clients_and_named_from_the_partition(tmp_path):
    rows, results = _run(f"{TINY} strategy=fedbn num_rounds=1 output_dir={tmp_path / 'g'}")
    partition = json.loads((tmp_path / "g" / "partition.json").read_text())
    per_client = rows[-1]["per_client_accuracy"]
    expected: dict[str, list[float]] = {}
    for c in partition["clients"]:
        expected.setdefault(partition["domain_names"][c["domain"]], []).append(per_client[str(c["client"])])
    assert rows[-1]["group_accuracy"] == pytest.approx({k: float(np.mean(v)) for k, v in expected.items()})
    assert set(results["group_accuracy"]) == {"plain", "inverted"}
    table = RunOutputs.summary_lines(results)
    assert any("plain" in line for line in table) and any("inverted" in line for line in table)


def test_drop_last_drops_only_an_incomplete_last_batch():
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert [len(b) for b in batches(10, 4, gen(), torch.device("cpu"))] == [4, 4, 2]
    assert [len(b) for b in batches(10, 4, gen(), torch.device("cpu"), drop_last=True)] == [4, 4]
    assert [len(b) for b in batches(8, 4, gen(), torch.device("cpu"), drop_last=True)] == [4, 4]
    assert [len(b) for b in batches(3, 4, gen(), torch.device("cpu"), drop_last=True)] == [3]


def _dump(path: Path, n: int, side: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(n).integers(0, 255, size=(n, side, side), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump((x, np.arange(n) % 10), f)


def test_digits5_lgmix_layout_reads_the_whole_file_and_validates_on_its_end(tmp_path):
    for domain in ("MNIST", "USPS"):
        _dump(tmp_path / "digits5" / domain / "train_stratified.pkl", 40, 16)
        _dump(tmp_path / "digits5" / domain / "test_stratified.pkl", 10, 16)
    cfg = (f"dataset=digits5 dataset.data_root={tmp_path} dataset.domains=[MNIST,USPS] "
           "partition.val_fraction=0.25")
    fed = build_federation(compose_config(cfg))
    with open(tmp_path / "digits5" / "MNIST" / "train_stratified.pkl", "rb") as f:
        _, labels = pickle.load(f)
    for c in fed.clients:
        assert (c.num_train, c.num_val, c.num_test) == (30, 10, 10)  # the whole file: 75% / 25%
        assert c.y_val.tolist() == labels[30:].tolist()  # the file's last quarter, in file order
        assert sorted(c.y_train.tolist()) == sorted(labels[:30].tolist())
    whole = build_federation(compose_config(cfg.replace("partition.val_fraction=0.25", "")))
    assert [c.num_train for c in whole.clients] == [40, 40] and whole.clients[0].x_val is None
    first = build_federation(compose_config(f"{cfg} dataset.percent=0.5"))
    assert [(c.num_train, c.num_val) for c in first.clients] == [(15, 5), (15, 5)]


def test_every_preset_composes_and_lgmix_digits5_is_the_authors_setup():
    presets = available_presets()
    assert "lgmix_digits5" in presets
    for name in presets:
        compose_config(f"+experiment={name}")
    cfg = compose_config("+experiment=lgmix_digits5")
    assert (cfg.strategy.name, cfg.dataset.name, cfg.partition.name, cfg.model.name) == (
        "lgmix", "digits5", "domains", "digit_cnn")
    assert list(cfg.dataset.domains) == ["MNIST", "SVHN", "USPS", "SynthDigits", "MNIST_M"]
    assert cfg.partition.clients_per_domain == 1 and cfg.partition.val_fraction == 0.25
    assert cfg.dataset.percent is None  # the LG-Mix layout's whole train file
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (0.01, 0.0, 0.0)
    assert (cfg.batch_size, cfg.local_epochs) == (128, 1)
    assert cfg.drop_last is True and cfg.num_rounds == 100 and cfg.fraction_train == 1.0
    assert compose_config("+experiment=lgmix_digits5 num_rounds=3").num_rounds == 3  # later overrides win
    with pytest.raises(ConfigError, match="lgmix_digits5"):
        compose_config("+experiment=no_such_preset")


def _fake_job(directory: Path, rows: list[dict]) -> None:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    outputs = RunOutputs(directory)
    outputs.write_results(1.0)


def test_the_sweep_summary_uses_the_runs_selection_rule(tmp_path):
    _fake_job(tmp_path / "a0", [_row(1, 0.7, 0.2), _row(2, 0.6, 0.9)])
    _fake_job(tmp_path / "a1", [_row(1, 0.5, 0.4), _row(2, 0.9, 0.6)])
    _fake_job(tmp_path / "b0", [_row(1, None, 0.3), _row(2, None, 0.5)])
    rows = summarize({"a": [tmp_path / "a0", tmp_path / "a1"], "b": [tmp_path / "b0"]}, tmp_path)
    results = [json.loads((tmp_path / d / "results.json").read_text()) for d in ("a0", "a1")]
    assert rows[0]["best_mean"] == pytest.approx(np.mean([r["best_accuracy"]["mean"] for r in results]))
    assert rows[0]["best_mean"] == pytest.approx(0.4)  # rounds 1 and 2: test 0.2 and 0.6
    assert rows[0]["final_mean"] == pytest.approx(0.75)
    assert rows[1]["best_mean"] is None and rows[1]["final_mean"] == pytest.approx(0.5)
    table = (tmp_path / "summary.md").read_text()
    assert "0.4000 ± 0.2828" in table and "Test data never selects" in table  # sample std of 0.2, 0.6


def test_lgmix_logs_the_rounds_mean_c_beside_the_mean_cbar(tmp_path):
    rows, _ = _run(f"{TINY} strategy=lgmix num_rounds=2 output_dir={tmp_path / 'l'}")
    for row in rows:
        values = row["lgmix"].values()
        assert row["lgmix_c_mean"] == pytest.approx(np.mean([v["c"] for v in values]))
        assert row["lgmix_cbar_mean"] == pytest.approx(np.mean([v["cbar"] for v in values]))
    assert (tmp_path / "l" / "cbar.png").stat().st_size > 0
