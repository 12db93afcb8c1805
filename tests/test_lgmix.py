"""LG-Mix: feature trace, update mixing, cbar bookkeeping, BN mixing, full-NTK reference, a run."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from torch import nn

from strategies.lgmix import (
    FeatureRecorder,
    feature_trace,
    float_entries,
    mix,
    mixing_coefficient,
    ntk_trace,
    plot_cbar,
)
from task.core.messages import ARRAYS, CONFIG, METRICS
from task.core.params import from_record, to_record
from task.core.state import PersonalState
from task.core.training import train_epochs
from task.engine.rounds import Engine

from .fake_grid import FakeGrid
from .helpers import TINY, server, tiny_cfg

OVERRIDES = "strategy=lgmix fraction_train=0.5"


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-5)


# --- pure functions ---------------------------------------------------------------------
def test_feature_trace_equals_numpy_covariance_trace():
    rng = np.random.default_rng(0)
    for n, d in [(200, 17), (5, 40), (64, 1)]:
        f = rng.normal(3.0, 2.0, size=(n, d)) * rng.uniform(0.1, 5.0, size=d)
        expected = np.trace(np.atleast_2d(np.cov(f.T, bias=True)))
        assert feature_trace(torch.from_numpy(f).float()) == pytest.approx(expected, rel=1e-5)
    assert feature_trace(torch.ones(10, 3)) == 0.0


def test_mixing_coefficient():
    assert mixing_coefficient(3.0, 1.0) == 0.75
    assert mixing_coefficient(0.0, 0.0) == 0.5


def test_mix_identity_on_toy_state_dicts():
    old = {"w": torch.tensor([1.0, 2.0]), "bn.running_var": torch.tensor([1.0]),
           "bn.num_batches_tracked": torch.tensor(7)}
    delta = {"w": torch.tensor([0.5, -1.0]), "bn.running_var": torch.tensor([0.2])}
    dbar = {"w": torch.tensor([-2.0, 4.0]), "bn.running_var": torch.tensor([-0.4])}
    pending = {k: old[k] + delta[k] if k in delta else old[k].clone() for k in old}
    local = mix(pending, dbar, delta, cbar=1.0)
    glob = mix(pending, dbar, delta, cbar=0.0)
    assert all(torch.equal(local[k], pending[k]) for k in old)  # purely local update
    assert all(close(glob[k], old[k] + dbar[k]) for k in delta)  # purely global update
    part = mix(pending, dbar, delta, cbar=0.3)
    assert all(close(part[k], old[k] + 0.7 * dbar[k] + 0.3 * delta[k]) for k in delta)
    assert int(part["bn.num_batches_tracked"]) == 7 and part["bn.num_batches_tracked"].dtype == torch.int64


# --- client half, through client_app's handlers: BN entries are mixed like every other ---
def latest(context, cid: int, name: str):
    """The newest saved version of a client's state entry ``name`` (None if never saved)."""
    try:  # PersonalState with round-tagged versions: a late round sees every save
        state = PersonalState(context, cid, torch.device("cpu"), 10**6)
    except TypeError:  # PersonalState without versions
        state = PersonalState(context, cid, torch.device("cpu"))
    return state.load(name)


def send(grid: FakeGrid, cid: int, kind: str, arrays: dict, config: dict) -> Message:
    msg = Message(RecordDict({ARRAYS: to_record(arrays), CONFIG: ConfigRecord(config)}),
                  dst_node_id=100 + cid, message_type=kind)
    [reply] = grid.pull_messages(grid.push_messages([msg]))
    return reply


def test_bn_running_statistics_are_uploaded_and_mixed():
    cfg = tiny_cfg("strategy=lgmix")
    received = server(cfg).global_state
    grid = FakeGrid(4, f"{TINY} strategy=lgmix")
    reply = send(grid, 0, MessageType.TRAIN, received, {"server-round": 1})
    assert not reply.has_error()
    delta = from_record(reply.content.array_records[ARRAYS])
    metrics = reply.content.metric_records[METRICS]
    assert set(delta) == set(float_entries(received))
    stats = [k for k in delta if k.endswith(("running_mean", "running_var"))]
    assert stats and all(delta[k].abs().sum() > 0 for k in stats)
    assert not any(k.endswith("num_batches_tracked") for k in delta)
    assert 0.0 < metrics["c_i"] < 1.0 and metrics["t_local"] > 0 and metrics["t_global"] > 0

    dbar = {k: torch.full_like(v, 0.5) for k, v in delta.items()}
    personalize = f"{MessageType.TRAIN}.personalize"
    assert not send(grid, 0, personalize, dbar, {"server-round": 1, "cbar": 0.25}).has_error()
    theta = latest(grid.contexts[100], 0, "personal")
    for k in delta:  # old = received on first participation
        assert close(theta[k], received[k] + 0.75 * dbar[k] + 0.25 * delta[k]), k
    counters = [k for k in theta if k.endswith("num_batches_tracked")]
    assert counters and all(int(theta[k]) > int(received[k]) for k in counters)  # the client's own
    # The pending update is mixed once only; a second personalize is refused.
    assert send(grid, 0, personalize, dbar, {"server-round": 1, "cbar": 0.25}).has_error()
    assert all(torch.equal(latest(grid.contexts[100], 0, "personal")[k], v) for k, v in theta.items())


def test_server_expects_float_entries_only():
    st = server(tiny_cfg("strategy=lgmix"))
    spec = st.expected_upload(0, st.global_state)
    assert set(spec) == set(float_entries(st.global_state))
    assert len(spec) < len(st.global_state)  # num_batches_tracked is not part of Delta


# --- a run through the in-process grid --------------------------------------------------
@pytest.fixture(scope="module")
def run():
    """3 rounds, 4 clients, half sampled each round; personal and global states per round."""
    cfg = tiny_cfg(OVERRIDES)
    st = server(cfg)
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} {OVERRIDES}")
    globals_ = [{k: v.clone() for k, v in st.global_state.items()}]
    personal: list[dict] = [{cid: None for cid in range(4)}]
    deltas: list[dict] = []
    rows: list[dict] = []

    def on_round(row):
        rows.append(row)
        globals_.append({k: v.clone() for k, v in st.global_state.items()})
        personal.append({cid: latest(grid.contexts[100 + cid], cid, "personal") for cid in range(4)})
        deltas.append({cid: latest(grid.contexts[100 + cid], cid, "delta") for cid in range(4)})

    run.start(grid, num_rounds=3, timeout=10, on_round=on_round)
    return st, rows, globals_, personal, deltas


def test_run_reports_accuracies_and_mixing_coefficients(run):
    _, rows, *_ = run
    assert len(rows) == 3
    for row in rows:
        assert row["rejected_replies"] == 0 and len(row["lgmix"]) == 2
        pers = row["personalized_accuracy"]
        assert all(0.0 <= pers[k] <= 1.0 for k in ("mean", "weighted", "worst"))
        assert 0.0 <= row["global_accuracy"] <= 1.0
        for values in row["lgmix"].values():
            assert 0.0 < values["c"] < 1.0 and 0.0 < values["cbar"] < 1.0
            assert values["c"] == pytest.approx(values["t_local"] / (values["t_local"] + values["t_global"]))


def test_partial_participation_bookkeeping(run):
    st, rows, globals_, personal, deltas = run
    sampled = [{int(c) for c in row["lgmix"]} for row in rows]
    assert all(len(s) < 4 for s in sampled)  # every round has a client that was not sampled
    counts = {cid: sum(cid in s for s in sampled) for cid in range(4)}
    assert max(counts.values()) >= 2  # some client took part twice: a real running mean
    history: dict[int, list[float]] = {cid: [] for cid in range(4)}
    for r, row in enumerate(rows, start=1):
        dbar = {k: globals_[r][k] - globals_[r - 1][k] for k in float_entries(globals_[r])}
        for cid in range(4):
            before, after = personal[r - 1][cid], personal[r][cid]
            if cid not in sampled[r - 1]:  # not sampled: theta_i unchanged
                if before is None:
                    assert after is None, (r, cid)
                else:
                    assert all(torch.equal(after[k], v) for k, v in before.items()), (r, cid)
                continue
            values = row["lgmix"][str(cid)]
            history[cid].append(values["c"])
            # cbar_i counts only the rounds client i took part in
            assert values["cbar"] == pytest.approx(float(np.mean(history[cid])))
            old, cbar, delta = before or globals_[r - 1], values["cbar"], deltas[r - 1][cid]
            for k in delta:  # theta_i <- old + (1 - cbar) Dbar + cbar Delta_i, BN stats too
                assert close(after[k], old[k] + (1 - cbar) * dbar[k] + cbar * delta[k]), (r, cid, k)
    assert st.c_count == {cid: n for cid, n in counts.items() if n}


def test_plot_cbar_writes_a_png(run, tmp_path):
    _, rows, *_ = run
    path = plot_cbar(rows, tmp_path / "cbar.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the full-NTK reference and the feature-trace proxy -------------------------------
def test_ntk_trace_is_exact_on_a_linear_model():
    # f(x) = W x + b: d f_k / d(W, b) = (e_k x^T, e_k), so trace = K * sum_n (||x_n||^2 + 1)
    torch.manual_seed(0)
    lin, x = nn.Linear(7, 5), torch.randn(11, 7)
    assert ntk_trace(lin, x) == pytest.approx(5 * (float((x.double() ** 2).sum()) + 11), rel=1e-6)


def eval_feature_trace(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    recorder = FeatureRecorder(model)
    with torch.no_grad():
        model(x)
    recorder.remove()
    return recorder.trace()


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(), nn.Linear(32, 10))


def trained(model: nn.Module, data, epochs: int, seed: int) -> nn.Module:
    model = copy.deepcopy(model)
    train_epochs(model, data.x_train, data.y_train, epochs=epochs, batch_size=32, lr=0.05,
                 gen=torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(scope="module")
def federation():
    from task.data.load import load_federation

    return load_federation(tiny_cfg(), torch.device("cpu"))


def test_feature_trace_lower_bounds_the_ntk_trace(federation):
    # The last layer's share of the NTK trace is K * sum_n (||phi_n||^2 + 1) and
    # sum_n ||phi_n||^2 = N (trace(C) + ||mean phi||^2) >= N trace(C).
    x = federation.clients[0].x_train[:64]
    for model in (mlp(0), trained(mlp(0), federation.clients[0], 3, 0)):
        assert ntk_trace(model, x) >= 10 * len(x) * (eval_feature_trace(model, x) + 1)


def test_proxy_and_full_ntk_trace_order_models_alike(federation):
    """Where one model is clearly better trained on the client's data, both traces agree.

    (i) untrained < 1 epoch < 10 epochs on the client's data; (ii) a model trained on the
    client's own domain vs one trained as long on another domain, scored on the client's
    data (LG-Mix's local-vs-global situation). Checked on several seeds.
    """
    own, other = federation.clients[0], federation.clients[2]
    assert own.domain != other.domain
    x = own.x_train[:64]
    for seed in range(3):
        models = [mlp(seed), trained(mlp(seed), own, 1, seed), trained(mlp(seed), own, 10, seed)]
        ntk = [ntk_trace(m, x) for m in models]
        proxy = [eval_feature_trace(m, x) for m in models]
        assert ntk == sorted(ntk) and proxy == sorted(proxy)
        local, foreign = trained(mlp(seed), own, 3, seed), trained(mlp(seed), other, 3, seed)
        assert ntk_trace(local, x) > ntk_trace(foreign, x)
        assert eval_feature_trace(local, x) > eval_feature_trace(foreign, x)


def test_checkpoint_keeps_the_running_means(run, tmp_path):
    st, *_ = run
    Engine(st).save_checkpoint(tmp_path / "checkpoint.npz", 3)
    again = server(tiny_cfg(OVERRIDES))
    assert Engine(again).load_checkpoint(tmp_path / "checkpoint.npz") == 3
    assert again.cbar == st.cbar and again.c_count == st.c_count
    assert all(torch.equal(again.global_state[k], v) for k, v in st.global_state.items())
