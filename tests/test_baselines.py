"""Every baseline's client step and server aggregation, without Flower's runtime."""

from __future__ import annotations

import pytest
import torch

from task.core.messages import TrainReply
from task.core.models import batchnorm_keys
from task.core.params import weighted_mean

from .fake_grid import FakeGrid
from .helpers import TINY, client, engine, make_context, server, tiny_cfg


def _distance(a: dict, b: dict) -> float:
    """Euclidean distance over trainable entries (BN running statistics are not parameters)."""
    keys = [k for k in a if a[k].is_floating_point() and "running_" not in k]
    return sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys) ** 0.5


def test_fedavg_aggregate_is_the_sample_weighted_mean():
    st = server(tiny_cfg("strategy=fedavg"))
    keys = list(st.global_state)[:2]
    a = {k: torch.zeros_like(st.global_state[k]) for k in keys}
    b = {k: torch.ones_like(st.global_state[k]) for k in keys}
    st.aggregate_replies(1, [TrainReply(0, a, 10, {}), TrainReply(1, b, 30, {})])
    for k in keys:
        assert torch.allclose(st.global_state[k], torch.full_like(a[k], 0.75))


def test_fedavg_client_trains_from_the_received_model_and_uploads_all_entries():
    cfg = tiny_cfg("strategy=fedavg")
    st = server(cfg)
    result = client(cfg, 0).train(st.global_state, {"server-round": 1})
    assert set(result.upload) == set(st.global_state)
    assert result.num_examples == client(cfg, 0).data.num_train
    assert _distance(result.upload, st.global_state) > 0


def test_fedprox_penalty_keeps_the_model_closer_to_the_global_one():
    cfg_avg, cfg_prox = tiny_cfg("strategy=fedavg local_epochs=2"), tiny_cfg(
        "strategy=fedprox strategy.mu=10.0 local_epochs=2")
    start = server(cfg_avg).global_state
    far = client(cfg_avg, 0).train(start, {"server-round": 1}).upload
    near = client(cfg_prox, 0).train(start, {"server-round": 1}).upload
    assert _distance(near, start) < 0.8 * _distance(far, start)


def test_fedbn_keeps_batchnorm_local_and_never_sends_it():
    cfg = tiny_cfg("strategy=fedbn")
    st = server(cfg)
    context = make_context(1)
    c = client(cfg, 1, context)
    bn = batchnorm_keys(c.model("main"))
    assert bn and not bn & set(st.global_state)
    result = c.train(st.global_state, {"server-round": 1})
    assert not bn & set(result.upload)
    saved = client(cfg, 1, context, after=True).state.load("bn")
    assert set(saved) == bn
    # The running statistics moved away from their initial values during local training.
    assert not torch.equal(saved[next(k for k in bn if k.endswith("running_mean"))],
                           c.initial_state()[next(k for k in bn if k.endswith("running_mean"))])


def test_local_sends_nothing_and_its_personal_model_persists():
    cfg = tiny_cfg("strategy=local")
    st = server(cfg)
    assert st.train_arrays(0, 1) == {}
    context = make_context(0)
    first = client(cfg, 0, context, server_round=1).train({}, {"server-round": 1})
    assert first.upload == {}
    after_one = client(cfg, 0, context, server_round=2).state.load("personal")
    assert after_one is not None
    client(cfg, 0, context, server_round=2).train({}, {"server-round": 2})
    after_two = client(cfg, 0, context, server_round=2, after=True).state.load("personal")
    assert _distance(after_two, after_one) > 0


def test_ditto_personal_model_is_kept_and_pulled_towards_the_global_one():
    start = server(tiny_cfg("strategy=ditto")).global_state
    personal = {}
    for lam in (0.001, 5.0):
        cfg, context = tiny_cfg(f"strategy=ditto strategy.lam={lam}"), make_context(0)
        result = client(cfg, 0, context).train(start, {"server-round": 1})
        assert set(result.upload) == set(start)
        personal[lam] = client(cfg, 0, context, after=True).state.load("personal")
    assert _distance(personal[5.0], start) < _distance(personal[0.001], start)


def test_proximal_step_after_momentum_matches_its_formula():
    """Two SGD steps with momentum on a linear model: v <- v - lr (m + lam (v - w)), the pull
    outside the buffer (PRFL's Ditto); in the loss it passes through the buffer and differs."""
    import torch.nn.functional as F

    from task.core.training import batches, proximal_penalty, train_epochs

    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    anchor = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    lr, beta, lam = 0.1, 0.9, 1.0

    def trained(**pull) -> dict:
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(0.5)
            model.bias.fill_(-0.2)
        train_epochs(model, x, y, epochs=1, batch_size=2, lr=lr, momentum=beta,
                     gen=torch.Generator().manual_seed(7), **pull)
        return {k: v.detach() for k, v in model.state_dict().items()}

    v = {"weight": torch.full((2, 3), 0.5), "bias": torch.full((2,), -0.2)}
    m = {k: torch.zeros_like(t) for k, t in v.items()}
    for idx in batches(4, 2, torch.Generator().manual_seed(7), x.device):
        w = {k: t.clone().requires_grad_(True) for k, t in v.items()}
        loss = F.cross_entropy(x[idx] @ w["weight"].T + w["bias"], y[idx])
        grads = dict(zip(w, torch.autograd.grad(loss, list(w.values())), strict=True))
        m = {k: beta * m[k] + grads[k] for k in v}
        v = {k: v[k] - lr * (m[k] + lam * (v[k] - anchor[k])) for k in v}
    after = trained(proximal_step=(anchor, lam))
    assert all(torch.allclose(after[k], v[k], atol=1e-6) for k in v)
    in_loss = trained(penalty=proximal_penalty(anchor, lam))
    assert not torch.allclose(in_loss["weight"], v["weight"], atol=1e-4)


def test_ditto_proximal_modes_agree_without_momentum_and_v_starts_at_the_initial_model():
    start = server(tiny_cfg("strategy=ditto")).global_state
    received = {k: v + 0.05 if v.is_floating_point() else v for k, v in start.items()}
    personal = {}
    for mode in ("after_momentum", "in_loss"):
        cfg, context = tiny_cfg(f"strategy=ditto strategy.proximal={mode} momentum=0.0"), make_context(0)
        client(cfg, 0, context).train(received, {"server-round": 1})
        personal[mode] = client(cfg, 0, context, after=True).state.load("personal")
    assert all(torch.allclose(personal["after_momentum"][k], personal["in_loss"][k], atol=1e-5)
               for k in personal["in_loss"] if personal["in_loss"][k].is_floating_point())
    # Before its first personal step v is the initial model (authors'), or the received w_g.
    for init, expected in (("initial", start), ("received", received)):
        cfg = tiny_cfg(f"strategy=ditto strategy.personal_init={init}")
        c = client(cfg, 0)
        assert all(torch.equal(c.personal_start(received)[k], expected[k]) for k in expected)


def test_fedavg_ft_fine_tunes_before_scoring_without_touching_state():
    cfg = tiny_cfg("strategy=fedavg_ft strategy.ft_epochs=3")
    c = client(cfg, 0)
    start = server(cfg).global_state
    scores = c.evaluate(start, {"server-round": 1})
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["global_accuracy"] <= 1
    assert scores["accuracy"] > scores["global_accuracy"]  # an untrained model gains from 3 epochs
    assert c.state.load("personal") is None


def test_sampling_sequence_is_the_same_for_every_strategy():
    seqs = []
    for name in ("fedavg", "ditto", "local"):
        st = engine(tiny_cfg(f"strategy={name} fraction_train=0.5"))
        seqs.append([st.sample(r) for r in range(1, 6)])
    assert seqs[0] == seqs[1] == seqs[2]
    assert all(len(s) == 2 for s in seqs[0]) and len({tuple(s) for s in seqs[0]}) > 1


def test_weighted_mean_rejects_empty_input():
    with pytest.raises(ValueError):
        weighted_mean([], [])


@pytest.mark.parametrize("name", ["fedavg", "fedavg_ft", "fedprox", "fedbn", "local", "ditto"])
def test_round_loop_learns_above_chance(name):
    overrides = f"{TINY} strategy={name} local_epochs=2"
    st = engine(tiny_cfg(f"strategy={name} local_epochs=2"))
    rows = []
    st.start(FakeGrid(4, overrides), num_rounds=2, timeout=30, on_round=rows.append)
    last = rows[-1]
    assert last["rejected_replies"] == 0 and last["sampled_clients"] == 4
    acc = last["personalized_accuracy"]
    assert 0.3 < acc["mean"] <= 1 and acc["worst"] <= acc["weighted"] <= 1
    assert len(last["per_client_accuracy"]) == 4
    if st.method.has_global_model:
        assert 0.2 < last["global_accuracy"] <= 1
    else:
        assert last["global_accuracy"] is None


@pytest.mark.parametrize("name", ["ditto", "lgmix"])
def test_fewer_supernodes_than_clients_each_host_several(name):
    overrides = f"{TINY} strategy={name}"
    st = engine(tiny_cfg(f"strategy={name}"))
    grid = FakeGrid(4, overrides, num_nodes=2)
    rows = []
    st.start(grid, num_rounds=2, timeout=30, on_round=rows.append)
    assert {c.node_id for c in st.clients.values()} == {100, 101}
    assert {cid: st.clients[cid].node_id for cid in st.clients} == {0: 100, 1: 101, 2: 100, 3: 101}
    last = rows[-1]
    assert last["rejected_replies"] == 0 and sorted(last["per_client_accuracy"]) == [0, 1, 2, 3]
    # Each hosted client keeps its own personal state in its node's context.
    keys = set(grid.contexts[100].state.array_records.keys())
    assert any(k.startswith("client-0.") for k in keys) and any(k.startswith("client-2.") for k in keys)


def test_a_node_refuses_a_message_for_a_client_it_does_not_serve():
    from flwr.app import ConfigRecord, Message, RecordDict

    import client_app

    grid = FakeGrid(4, TINY, num_nodes=2)
    msg = Message(RecordDict({"config": ConfigRecord({"client-id": 1, "server-round": 1})}),
                  dst_node_id=100, message_type="train")
    with pytest.raises(ValueError, match="serves clients c with c % 2 == 0"):
        client_app.client_id(grid.contexts[100], msg)
