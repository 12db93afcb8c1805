"""FedCLUP: lam -> 0 is Local, large lam ties the personal models to the global one, the server
step, the adaptive lam; and the lam sweep's trade-off report on hand-written run directories."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from strategies.fedclup import adaptive_lam, distance, server_step
from task.algorithms.tradeoff import first_reach, short_labels, tradeoff_rows, write_report
from task.core.messages import TrainReply
from task.core.state import PersonalState
from task.engine.rounds import Engine
from task.run.config import compose_config
from task.run.sweep import job_name
from task.run.sweep import main as sweep_main

from .fake_grid import FakeGrid
from .helpers import TINY, client, make_context, server, tiny_cfg

BASE = "strategy=fedclup model=mlp model.hidden=16"


def latest_personal(context, cid: int, server_round: int) -> dict:
    state = PersonalState(context, cid, torch.device("cpu"), server_round, after_training=True)
    return state.load("personal")


def same(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in a)


# --- the client half ---------------------------------------------------------------------------
def test_lam_to_zero_is_local_training():
    """Two rounds with lam = 1e-12 give Local's personal model, whatever w_g the server sends."""
    clup_cfg, local_cfg = tiny_cfg(BASE), tiny_cfg("strategy=local model=mlp model.hidden=16")
    torch.manual_seed(5)
    far_away = {k: v + torch.randn_like(v) for k, v in server(clup_cfg).global_state.items()}
    clup_ctx, local_ctx = make_context(1), make_context(1)
    for rnd in (1, 2):
        client(clup_cfg, 1, clup_ctx, rnd).train(far_away, {"server-round": rnd, "lam": 1e-12})
        client(local_cfg, 1, local_ctx, rnd).train({}, {"server-round": rnd})
    assert same(latest_personal(clup_ctx, 1, 2), latest_personal(local_ctx, 1, 2))
    # ... while a lam > 0 pulls w_i towards that w_g, away from the Local model.
    pulled_ctx = make_context(1)
    client(clup_cfg, 1, pulled_ctx, 1).train(far_away, {"server-round": 1, "lam": 5.0})
    local_1 = PersonalState(local_ctx, 1, torch.device("cpu"), 10**6).load("personal")
    assert distance(latest_personal(pulled_ctx, 1, 1), far_away) < distance(local_1, far_away)


def test_w_i_persists_and_starts_as_the_initial_model():
    cfg = tiny_cfg(BASE)
    init = server(cfg).global_state
    torch.manual_seed(3)
    other = {k: v + torch.randn_like(v) for k, v in init.items()}
    ctx_a, ctx_b = make_context(0), make_context(0)
    # First participation: w_i = the run's initial model, whatever w_g arrives (lam ~ 0).
    a = client(cfg, 0, ctx_a, 1).train(other, {"server-round": 1, "lam": 1e-12}).upload
    b = client(cfg, 0, ctx_b, 1).train(init, {"server-round": 1, "lam": 1e-12}).upload
    assert same(a, b)
    # Round 2 continues from the kept w_i, not from the received w_g.
    r2 = client(cfg, 0, ctx_a, 2).train(init, {"server-round": 2, "lam": 1e-12}).upload
    fresh = client(cfg, 0, make_context(0), 2).train(init, {"server-round": 2, "lam": 1e-12}).upload
    assert not same(r2, fresh, atol=1e-4)


def run_rounds(lam: float, rounds: int = 3) -> tuple[list[dict], object]:
    extra = f"{BASE} strategy.lam={lam}"
    st = server(tiny_cfg(extra))
    run = Engine(st)
    rows: list[dict] = []
    run.start(FakeGrid(4, f"{TINY} {extra}"), num_rounds=rounds, timeout=60, on_round=rows.append)
    return rows, st


def test_large_lam_approaches_fedavg_small_lam_local():
    """lam -> inf ties every w_i to w_g (one FedAvg model): the distances R^ shrink with lam,
    and at a large lam each client's personal accuracy is the global model's."""
    runs = {lam: run_rounds(lam) for lam in (0.01, 1.0, 15.0)}
    r_hat = [runs[lam][0][-1]["fedclup_R"] for lam in (0.01, 1.0, 15.0)]
    assert r_hat[0] > r_hat[1] > r_hat[2]
    assert r_hat[2] < 0.1 * r_hat[0]
    assert all(row["rejected_replies"] == 0 for rows, _ in runs.values() for row in rows)
    gap = [runs[lam][0][-1]["personalized_accuracy"]["mean"] - runs[lam][0][-1]["global_accuracy"]
           for lam in (0.01, 1.0, 15.0)]
    # Local-like: personal models far better than the mean of them on these two domains ...
    assert gap[0] > 0.2
    # ... and the personal-global accuracy gap closes as lam grows. (Not an absolute bound at a
    # large lam: after 3 rounds both are near chance, and one test image is 1/360 of the mean.)
    assert gap[0] > gap[1] > abs(gap[2])
    assert abs(gap[2]) < 0.25 * gap[0]


# --- the server half ---------------------------------------------------------------------------
def fake_replies(state: dict, sizes: list[int]) -> list[TrainReply]:
    torch.manual_seed(1)
    return [TrainReply(i, {k: v + torch.randn_like(v) for k, v in state.items()}, n, {})
            for i, n in enumerate(sizes)]


@pytest.mark.parametrize("lam,eta_g", [(0.5, None), (0.5, 0.4), (2.5, 0.1), (0.2, 10.0)])
def test_server_step_matches_its_formula(lam, eta_g):
    eta = "null" if eta_g is None else eta_g
    st = server(tiny_cfg(f"{BASE} strategy.lam={lam} strategy.eta_g={eta}"))
    before = {k: v.clone() for k, v in st.global_state.items()}
    sizes = [30, 10, 60]
    got = fake_replies(before, sizes)
    st.aggregate_replies(1, got)
    c = lam * (1 / lam if eta_g is None else eta_g)
    for k, g in st.global_state.items():
        mean = sum(r.arrays[k].double() * n / sum(sizes) for r, n in zip(got, sizes, strict=True))
        expected = (1 - c) * before[k].double() + c * mean
        assert torch.allclose(g.double(), expected, atol=1e-5), k
    assert st.round_metrics(1)["fedclup_eta_g"] == pytest.approx(1 / lam if eta_g is None else eta_g)
    # R^: the mean distance of the replies' w_i to the new w_g.
    expected_r = np.mean([distance(r.arrays, st.global_state) for r in got])
    assert st.round_metrics(1)["fedclup_R"] == pytest.approx(expected_r)
    ints = server_step({"n": torch.tensor(2)}, {"n": torch.tensor(9)}, 0.5, 0.4)
    assert ints["n"].dtype == torch.int64 and int(ints["n"]) == 9


def test_adaptive_lam_formula():
    n = 200
    # R^ >= 1/sqrt(n): rho / (n R^2); below: rho / sqrt(n R^2).
    assert adaptive_lam(0.5, n) == pytest.approx(5 / (200 * 0.25))
    assert adaptive_lam(0.01, n) == pytest.approx(5 / math.sqrt(200 * 1e-4))
    edge = 1 / math.sqrt(n)
    assert adaptive_lam(edge, n) == pytest.approx(5.0)  # both branches meet at R^ = 1/sqrt(n)
    assert adaptive_lam(2.0, 50, rho=1.0) == pytest.approx(1 / 200)
    with pytest.raises(ValueError):
        adaptive_lam(0.0, n)


def test_server_adapts_lam_once_at_its_round_and_logs_it():
    st = server(tiny_cfg(f"{BASE} strategy.adaptive=true strategy.adapt_at=0.5 num_rounds=4"))
    st.distances = {0: 0.3, 1: 0.5}
    n = float(np.mean([n_train for n_train, _ in st.partition_sizes]))
    assert st.train_config(0, 1)["lam"] == 0.5 and st.train_config(0, 2)["lam"] == 0.5
    assert st.train_config(0, 3)["lam"] == pytest.approx(adaptive_lam(0.4, n))  # round floor(0.5 * 4) + 1
    st.distances = {0: 9.0}
    assert st.train_config(0, 4)["lam"] == pytest.approx(adaptive_lam(0.4, n))  # set once only
    assert st.round_metrics(4)["fedclup_lam"] == pytest.approx(adaptive_lam(0.4, n))
    assert st.round_metrics(4)["fedclup_eta_g"] == pytest.approx(1 / adaptive_lam(0.4, n))
    # Checkpointed and restored.
    again = server(tiny_cfg(f"{BASE} strategy.adaptive=true strategy.adapt_at=0.5 num_rounds=4"))
    again.load_state(st.state_arrays(), json.loads(json.dumps(st.state_scalars())))
    assert again.lam == st.lam and again.adapted and again.distances == {0: 9.0}


def test_fedclup_mnist_preset_is_the_authors_cnn_setup():
    cfg = compose_config("+experiment=fedclup_mnist")
    assert (cfg.strategy.name, cfg.model.name, cfg.partition.name) == ("fedclup", "cnn", "pathological")
    assert (cfg.partition.num_clients, cfg.batch_size, cfg.lr, cfg.num_rounds) == (10, 16, 0.01, 20)
    assert cfg.strategy.lam == 0.5 and cfg.strategy.eta_g is None and cfg.momentum == 0.0
    pfml = compose_config("+experiment=pfml_mnist")
    assert (pfml.strategy.name, pfml.model.name, pfml.model.hidden) == ("pfml", "mlp", 100)
    assert (pfml.partition.num_clients, pfml.partition.classes_per_client) == (20, 2)
    assert (pfml.batch_size, pfml.lr, pfml.strategy.local_iterations) == (200, 0.01, 10)
    assert (pfml.strategy.K, pfml.strategy.lam, pfml.strategy.beta) == (3, 15.0, 2.0)
    assert pfml.dataset.test_fraction == 0.25


# --- the trade-off report ----------------------------------------------------------------------
def fake_run(directory, accs: list[float], bytes_per_round: int = 1000) -> None:
    """metrics.jsonl and results.json as a run writes them (round 2 not evaluated)."""
    directory.mkdir(parents=True)
    rows = []
    for i, a in enumerate(accs, 1):
        acc = None if i == 2 else {"mean": a, "weighted": a, "worst": a / 2}
        rows.append({"round": i, "personalized_accuracy": acc, "global_accuracy": 0.3,
                     "bytes_up": bytes_per_round // 2, "bytes_down": bytes_per_round // 2})
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    last = [r for r in rows if r["personalized_accuracy"]][-1]
    (directory / "results.json").write_text(json.dumps({
        "last_evaluated_round": last, "best_round": last, "bytes_up": bytes_per_round * len(accs) / 2,
        "bytes_down": bytes_per_round * len(accs) / 2, "wall_seconds": 1.0}))


def test_first_reach_counts_bytes_through_that_round(tmp_path):
    fake_run(tmp_path / "a", [0.5, 0.99, 0.85, 0.9])
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert first_reach(rows, 0.8) == (3, 3000.0)  # round 2 was not evaluated
    assert first_reach(rows, 0.5) == (1, 1000.0)
    assert first_reach(rows, 0.95) is None


def test_tradeoff_report_rows_per_lam(tmp_path):
    groups = {
        "strategy=fedclup strategy.lam=0.2": [tmp_path / "l02s0", tmp_path / "l02s1"],
        "strategy=fedclup strategy.lam=0.5": [tmp_path / "l05s0", tmp_path / "l05s1"],
        "strategy=fedclup strategy.lam=2.5": [tmp_path / "l25s0", tmp_path / "l25s1"],
    }
    fake_run(tmp_path / "l02s0", [0.81, 0.85, 0.9, 0.92], 100)
    fake_run(tmp_path / "l02s1", [0.6, 0.7, 0.82, 0.9], 100)
    fake_run(tmp_path / "l05s0", [0.5, 0.6, 0.7, 0.85], 200)
    fake_run(tmp_path / "l05s1", [0.5, 0.6, 0.7, 0.75], 200)
    fake_run(tmp_path / "l25s0", [0.3, 0.4, 0.5, 0.6], 200)
    fake_run(tmp_path / "l25s1", [0.3, 0.4, 0.5, 0.7], 200)
    rows = write_report(groups, tmp_path, 0.8)
    assert [r["run"] for r in rows] == ["strategy.lam=0.2", "strategy.lam=0.5", "strategy.lam=2.5"]
    low, mid, high = rows
    assert (low["reached"], low["rounds_to_target"]) == (2, 2.0)
    assert low["mbytes_to_target"] == pytest.approx(2e-4)  # mean of 100 B (round 1) and 300 B (round 3)
    assert low["final_mean"] == pytest.approx(0.91)
    assert (mid["reached"], mid["rounds_to_target"]) == (1, 4.0)
    assert mid["mbytes_to_target"] == pytest.approx(8e-4)
    assert high["reached"] == 0 and high["rounds_to_target"] is None
    table = (tmp_path / "tradeoff.md").read_text().splitlines()
    # sample std (ddof=1) over the seeds: 0.92 and 0.90 -> 0.0141; rounds 1 and 3 -> 1.4
    assert table[2].startswith("| strategy.lam=0.2 | 2 | 0.9100 ± 0.0141 | 2.0 ± 1.4 |")
    assert "| 4.0 (1/2 seeds) |" in table[3]  # one seed reached it: no spread to show
    assert table[4].count("not reached") == 2
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert len((tmp_path / "tradeoff.csv").read_text().splitlines()) == 4
    assert tradeoff_rows({"x": [tmp_path / "missing"]}, 0.8) == []


def test_short_labels_drop_the_shared_overrides():
    assert short_labels(["a=1 b=2", "a=1 b=3"]) == ["b=2", "b=3"]
    assert short_labels(["a=1 b=2"]) == ["a=1 b=2"]


def test_sweep_target_option_writes_the_report(tmp_path):
    args = ["strategy=fedclup", "strategy.lam=0.2,2.5", "seed=0,1"]
    for lam, accs in (("0.2", [0.9, 0.9, 0.9]), ("2.5", [0.1, 0.2, 0.3])):
        for seed in (0, 1):
            fake_run(tmp_path / job_name(["strategy=fedclup", f"strategy.lam={lam}", f"seed={seed}"]), accs)
    assert sweep_main([*args, "--out", str(tmp_path), "--summarize-only", "--target", "0.8"]) == 0
    table = (tmp_path / "tradeoff.md").read_text()
    assert "| strategy.lam=0.2 | 2 | 0.9000 ± 0.0000 | 1.0 ± 0.0 |" in table
    assert "| strategy.lam=2.5 | 2 |" in table and "not reached" in table
    assert (tmp_path / "summary.md").exists()


def test_adaptive_lam_options_follow_the_authors_code_when_asked():
    """adapt_distance=current: R^ over every client's latest w_i (the initial model if it never
    trained) against the current w_g; eta_rule=authors: eta_g = 1/lam + 1/9.13."""
    extra = f"{BASE} strategy.adaptive=true strategy.adapt_distance=current strategy.eta_rule=authors"
    st = server(tiny_cfg(extra))
    init = {k: v.clone() for k, v in st.global_state.items()}
    assert st.eta_g == pytest.approx(1 / 0.5 + 1 / 9.13)
    got = fake_replies(init, [30, 10])
    st.aggregate_replies(1, got)
    expected = np.mean([distance(got[0].arrays, st.global_state), distance(got[1].arrays, st.global_state),
                        distance(init, st.global_state), distance(init, st.global_state)])
    assert st.r_hat() == pytest.approx(expected)
    again = server(tiny_cfg(extra))
    again.load_state(st.state_arrays(), json.loads(json.dumps(st.state_scalars())))
    assert again.r_hat() == pytest.approx(expected)
