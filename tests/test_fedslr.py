"""FedSLR: server's proximal step, factorised downlink through the round loop, client stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from strategies.fedslr import (
    GlobalPlusPersonal,
    feddyn_penalty,
    initial_personal_part,
    threshold_layers,
)
from task.algorithms.lowrank import rebuild, svt, to_matrix
from task.core.messages import ARRAYS, METRICS, TrainReply
from task.engine.rounds import Engine
from task.run.config import compose_config

from .fake_grid import FakeGrid
from .helpers import TINY, client, make_context, server, tiny_cfg

# lam / alpha = 0.3: large enough on the tiny model that most layers lose rank in round 1.
LOW_RANK = "strategy=fedslr strategy.lam=0.03"


def _round(overrides: str, rounds: int = 1, tamper=None, evaluate: bool = False):
    st = server(tiny_cfg(overrides))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} {overrides}", tamper=tamper)
    run.discover(grid, 10)
    rows = [run.run_round(grid, r, timeout=60, evaluate=evaluate) for r in range(1, rounds + 1)]
    return st, grid, rows


# --- server ----------------------------------------------------------------------------------
def test_threshold_layers_thresholds_matrices_and_convs_and_leaves_1d_alone():
    gen = torch.Generator().manual_seed(0)
    state = {"conv": torch.randn(6, 3, 3, 3, generator=gen), "fc": torch.randn(5, 7, generator=gen),
             "bias": torch.randn(5, generator=gen), "count": torch.tensor(3)}
    out, factors = threshold_layers(state, 1.0)
    assert set(factors) == {"conv", "fc"}
    assert torch.equal(out["bias"], state["bias"]) and torch.equal(out["count"], state["count"])
    assert torch.allclose(out["fc"], svt(state["fc"], 1.0), atol=1e-5)
    expected_conv = svt(to_matrix(state["conv"]), 1.0)
    assert torch.allclose(to_matrix(out["conv"]), expected_conv, atol=1e-5)
    for key, (a, b) in factors.items():
        assert torch.equal(out[key], rebuild(a, b, state[key].shape))


def test_aggregate_is_feddyn_corrected_mean_then_svt():
    st = server(tiny_cfg("strategy=fedslr strategy.lam=0.01 strategy.alpha=0.5"))
    w_s = {k: v.clone() for k, v in st.global_state.items()}
    gen = torch.Generator().manual_seed(1)
    uploads = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                for k, v in w_s.items()} for _ in range(3)]
    st.aggregate_replies(1, [TrainReply(i, u, 10 + i, {"p_sparsity": 0.1 * i})
                             for i, u in enumerate(uploads)])
    n, alpha = st.num_clients, 0.5
    for key in st.h:
        drift = sum(u[key] - w_s[key] for u in uploads)
        h = -alpha / n * drift
        assert torch.allclose(st.h[key], h, atol=1e-6), key
        corrected = sum(u[key] for u in uploads) / 3 - h / alpha  # plain mean, not sample-weighted
        if corrected.dim() < 2:
            assert torch.allclose(st.global_state[key], corrected, atol=1e-6), key
        else:  # SVT with threshold lam / alpha = 0.02 of the conv-reshaped layer
            expected = svt(to_matrix(corrected), 0.02)
            assert torch.allclose(to_matrix(st.global_state[key]), expected, atol=1e-5), key
    buffers = [k for k in w_s if k not in st.h and w_s[k].is_floating_point()]
    assert buffers  # the tiny model has BatchNorm statistics: plainly averaged, no dual
    for key in buffers:
        assert torch.allclose(st.global_state[key], sum(u[key] for u in uploads) / 3)
    assert st.p_sparsity == pytest.approx(0.1)


def test_checkpoint_restores_h_and_the_factors(tmp_path):
    st, _, _ = _round(LOW_RANK)
    Engine(st).save_checkpoint(tmp_path / "ck.npz", 1)
    fresh = server(tiny_cfg(LOW_RANK))
    assert Engine(fresh).load_checkpoint(tmp_path / "ck.npz") == 1
    for key in st.h:
        assert torch.equal(fresh.h[key], st.h[key])
    sent, again = st.transport(), fresh.transport()
    assert set(sent) == set(again) and all(torch.equal(sent[k], again[k]) for k in sent)


# --- downlink through the real round loop ----------------------------------------------------
def test_low_rank_global_travels_factorised_one_record_per_round_and_dense_replies_pass():
    st = server(tiny_cfg(LOW_RANK))
    run = Engine(st)
    grid = FakeGrid(4, f"{TINY} {LOW_RANK}")
    run.discover(grid, 10)
    first = run.run_round(grid, 1, timeout=60, evaluate=False)
    w_s = {k: v.clone() for k, v in st.global_state.items()}  # what round 2 sends
    second = run.run_round(grid, 2, timeout=60, evaluate=False)
    assert first["rejected_replies"] == second["rejected_replies"] == 0
    ranks, full = first["fedslr"]["rank"], first["fedslr"]["full_rank"]
    assert any(ranks[k] < full[k] for k in ranks)
    # Round 2's training messages carry factors, all four the same ArrayRecord object.
    train2 = [m for m in grid.pushed if m.metadata.message_type == "train"][4:]
    records = [m.content.array_records[ARRAYS] for m in train2]
    assert len(records) == 4 and all(r is records[0] for r in records)
    assert [k for k in records[0] if k.endswith("@U")]
    assert second["bytes_down"] == 4 * records[0].count_bytes() < first["bytes_down"]
    assert first["fedslr"]["model_bytes"] < first["fedslr"]["dense_model_bytes"]
    # The client rebuilds exactly the server's w_s.
    c = client(tiny_cfg(LOW_RANK), 0, server_round=2)
    rebuilt = c.global_weights({k: torch.from_numpy(a.numpy()) for k, a in records[0].items()})
    assert set(rebuilt) == set(w_s)
    assert all(torch.equal(rebuilt[k], v) for k, v in w_s.items())


def _replace_upload(change):
    def tamper(msg, reply):
        if msg.metadata.message_type != "train" or msg.metadata.dst_node_id != 100:
            return reply
        arrays = {k: a.numpy() for k, a in reply.content.array_records[ARRAYS].items()}
        sent = {k: a.numpy() for k, a in msg.content.array_records[ARRAYS].items()}
        content = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in change(arrays, sent).items()}),
                              METRICS: MetricRecord(dict(reply.content.metric_records[METRICS]))})
        from flwr.app import Message

        out = Message(content, reply_to=msg)
        out.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
        return out
    return tamper


@pytest.mark.parametrize("kind", ["echo_factors", "one_factor_shape", "dense_wrong_shape"])
def test_replies_in_factor_shapes_or_wrong_shapes_are_rejected(kind):
    """After a factorised downlink, a reply must still be the dense model: one that carries the
    factors it was sent (or a factor's shape in place of a layer) is dropped."""
    def change(arrays, sent):
        if kind == "echo_factors":
            return sent
        layer = next(k[:-2] for k in sent if k.endswith("@U"))
        if kind == "one_factor_shape":
            return {**arrays, layer: sent[layer + "@U"]}
        return {**arrays, layer: np.zeros(arrays[layer].size + 1, arrays[layer].dtype)}

    def tamper(msg, reply):
        round_two = msg.content.config_records["config"].get("server-round") == 2
        return _replace_upload(change)(msg, reply) if round_two else reply

    _, _, rows = _round(LOW_RANK, rounds=2, tamper=tamper)
    assert rows[0]["rejected_replies"] == 0 and rows[1]["rejected_replies"] == 1
    assert rows[1]["train_loss"] is not None  # the other three were aggregated


# --- client -----------------------------------------------------------------------------------
def test_initial_p_copies_conv_and_linear_weights_and_zeros_norm_layers():
    c = client(tiny_cfg("strategy=fedslr"), 0)
    model, initial = c.model("layout"), c.initial_state()
    p = initial_personal_part(model, initial, "weights")
    assert set(p) == {n for n, _ in model.named_parameters()}
    norms = {f"{prefix}.{n}" for prefix, m in model.named_modules()
             if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d) for n, _ in m.named_parameters()}
    assert norms
    for key, value in p.items():
        assert torch.equal(value, torch.zeros_like(value) if key in norms else initial[key]), key
    assert all(not v.any() for v in initial_personal_part(model, initial, "zeros").values())


def test_personal_model_is_w_s_plus_p_and_only_p_trains():
    c = client(tiny_cfg("strategy=fedslr"), 0)
    base = c.model("base", c.initial_state())
    gen = torch.Generator().manual_seed(2)
    p = {n: 0.01 * torch.randn(q.shape, generator=gen) for n, q in base.named_parameters()}
    personal = GlobalPlusPersonal(base, p).eval()
    summed = c.model("check", {k: c.initial_state()[k] + p.get(k, 0) for k in c.initial_state()}).eval()
    x = c.data.x_test[:5]
    assert torch.allclose(personal(x), summed(x), atol=1e-5)
    assert [q.requires_grad for q in personal.parameters()].count(True) == len(p)


def test_feddyn_penalty_gradient_is_alpha_drift_minus_mu():
    layer = torch.nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(3)
    w_s = {n: torch.randn(q.shape, generator=gen) for n, q in layer.named_parameters()}
    mu = {n: torch.randn(q.shape, generator=gen) for n, q in layer.named_parameters()}
    feddyn_penalty(w_s, mu, 0.1)(layer).backward()
    for n, q in layer.named_parameters():
        assert torch.allclose(q.grad, 0.1 * (q.detach() - w_s[n]) - mu[n], atol=1e-6)


def test_client_rounds_keep_p_local_sparse_and_update_the_dual():
    cfg = tiny_cfg("strategy=fedslr strategy.mu_sp=0.5 lr=0.1")
    ctx = make_context(0)
    c = client(cfg, 0, ctx, server_round=1)
    w_s = c.initial_state()
    result = c.train(w_s, {"server-round": 1})
    assert set(result.upload) == set(w_s)  # the dense w_i only: p never leaves the client
    p = client(cfg, 0, ctx, 1, after=True).state.load("p")
    assert 0.0 < result.metrics["p_sparsity"] <= 1.0
    zeros = sum(int((v == 0).sum()) for v in p.values()) / sum(v.numel() for v in p.values())
    assert result.metrics["p_sparsity"] == pytest.approx(zeros)
    mu = client(cfg, 0, ctx, 1, after=True).state.load("mu")
    for key, value in mu.items():  # mu_1 = 0 + alpha (w_s - w_1)
        assert torch.allclose(value, 0.1 * (w_s[key] - result.upload[key]), atol=1e-6), key
    scores = client(cfg, 0, ctx, 1, after=True).evaluate(w_s, {"server-round": 1})
    assert {"accuracy", "global_accuracy", "loss"} <= set(scores)


def test_fedslr_preset_has_the_papers_cifar10_setup():
    cfg = compose_config("+experiment=fedslr_cifar10")
    assert cfg.strategy.name == "fedslr" and cfg.dataset.name == "cifar10" and cfg.model.name == "resnet18_gn"
    assert (cfg.partition.name, cfg.partition.num_clients, cfg.partition.alpha) == ("dirichlet", 100, 0.1)
    assert (cfg.fraction_train, cfg.local_epochs, cfg.batch_size, cfg.num_rounds) == (0.1, 2, 20, 1000)
    assert (cfg.lr, cfg.lr_decay) == (0.1, 0.998)
    s = cfg.strategy
    assert (s.alpha, s.lam, s.mu_sp, s.weight_decay, s.personal_epochs) == (0.1, 1e-4, 1e-3, 1e-3, 1)

