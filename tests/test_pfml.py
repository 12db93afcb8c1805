"""PFML: KL direction and detachment, the proximal inner solve, K = 0 as deep mutual learning,
the beta server step, reset_personal, and a short round loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from task.algorithms.mutual import iteration_batches, mutual_kl, mutual_loss, outer_gradient, prox_steps
from task.core.messages import TrainReply
from task.core.params import damped_step, model_state
from task.core.state import PersonalState
from task.core.training import batches, step_generator
from task.engine.rounds import Engine
from task.run.config import ConfigError

from .fake_grid import FakeGrid
from .helpers import TINY, client, make_context, server, tiny_cfg

BASE = "strategy=pfml model=mlp model.hidden=16 batch_size=64 lr=0.05 strategy.local_iterations=3"


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, summed over classes, averaged over rows (batchmean)."""
    return (p * (p.log() - q.log())).sum(1).mean()


# --- the mutual losses ---------------------------------------------------------------------
def test_mutual_kl_is_kl_of_the_peer_from_self_with_batchmean():
    torch.manual_seed(0)
    own, peer = torch.randn(5, 4) * 2, torch.randn(5, 4) * 2
    p_own, p_peer = own.softmax(1), peer.softmax(1)
    assert mutual_kl(own, peer).item() == pytest.approx(kl(p_peer, p_own).item(), rel=1e-5)
    # KL is asymmetric: the other direction is a different number on these logits.
    assert abs(kl(p_own, p_peer).item() - kl(p_peer, p_own).item()) > 1e-3
    # Temperature: softmax(z / T), scaled by T^2.
    t = 3.0
    expected = t * t * kl((peer / t).softmax(1), (own / t).softmax(1))
    assert mutual_kl(own, peer, t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert mutual_kl(own, own.clone()).item() == pytest.approx(0.0, abs=1e-7)


def test_no_gradient_flows_into_the_peer():
    torch.manual_seed(0)
    me, peer = nn.Linear(6, 3), nn.Linear(6, 3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = mutual_loss(me(x), y, peer(x), kl_weight=2.0, temperature=2.0)
    loss.backward()
    assert all(p.grad is None for p in peer.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in me.parameters())
    # ... and the gradient into ``me`` is that of CE + weight * KL against the fixed peer output.
    grads = [p.grad.clone() for p in me.parameters()]
    me.zero_grad()
    fixed = peer(x).detach()
    manual = F.cross_entropy(me(x), y) + 2.0 * 4.0 * kl((fixed / 2).softmax(1), (me(x) / 2).softmax(1))
    manual.backward()
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, me.parameters(), strict=True))


def test_prox_steps_converge_to_the_proximal_point_of_a_quadratic():
    """argmin_theta 0.5||theta - a||^2 + (lam/2)||theta - c||^2 = (a + lam c) / (1 + lam)."""
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    a, c, lam = torch.tensor([[1.0, -2.0, 3.0]]), {"weight": torch.tensor([[4.0, 0.0, -1.0]])}, 2.0
    prox_steps(model, lambda m: 0.5 * ((m.weight - a) ** 2).sum(), c, lam, lr=0.1, steps=200)
    assert torch.allclose(model.weight, (a + lam * c["weight"]) / (1 + lam), atol=1e-5)
    # K = 0 steps leave the model as it is.
    before = model.weight.clone()
    prox_steps(model, lambda m: (m.weight ** 2).sum(), c, lam, lr=0.1, steps=0)
    assert torch.equal(model.weight, before)


def test_outer_gradient_adds_the_pull_towards_theta():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    model.weight.grad = torch.tensor([[0.5, 0.5]])
    outer_gradient(model, {"weight": torch.tensor([[0.0, 4.0]])}, lam=3.0)
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    # w - eta grad - eta lam (w - theta) = [1 - .05 - .3, 2 - .05 + .6]
    assert torch.allclose(model.weight, torch.tensor([[0.65, 2.55]]))


def test_iteration_batches_cycle_through_reshuffled_epochs():
    gen = torch.Generator().manual_seed(0)
    got = list(iteration_batches(10, 4, 7, gen, torch.device("cpu")))
    assert [len(b) for b in got] == [4, 4, 2, 4, 4, 2, 4]
    assert sorted(torch.cat(got[:3]).tolist()) == list(range(10))


# --- the client half -------------------------------------------------------------------------
def dml_reference(cfg, cid: int, received: dict, iterations: int) -> tuple[dict, dict]:
    """Plain deep mutual learning by hand: simultaneous SGD on L(m) and L(w), same batches."""
    c = client(cfg, cid)
    m, w = c.model("ref_m", received), c.model("ref_w", received)
    gen = step_generator(int(cfg.seed), cid, 1, 0)
    data = c.data
    order = [idx for _ in range(iterations) for idx in batches(data.num_train, int(cfg.batch_size), gen,
                                                                 torch.device("cpu"))][:iterations]
    opts = [torch.optim.SGD(model.parameters(), lr=float(cfg.lr)) for model in (m, w)]
    for idx in order:
        x, y = data.x_train[idx], data.y_train[idx]
        z_m, z_w = m(x), w(x)
        p_m, p_w = z_m.softmax(1), z_w.softmax(1)
        loss_m = F.cross_entropy(z_m, y) + kl(p_w.detach(), p_m)
        loss_w = F.cross_entropy(z_w, y) + kl(p_m.detach(), p_w)
        for o in opts:
            o.zero_grad()
        (loss_m + loss_w).backward()
        for o in opts:
            o.step()
    return model_state(m), model_state(w)


def train_once(cfg, cid: int, received: dict, context=None, server_round: int = 1):
    """The training reply and the state as the round's later phases see it."""
    context = context or make_context(cid)
    result = client(cfg, cid, context, server_round).train(received, {"server-round": server_round})
    return result, PersonalState(context, cid, torch.device("cpu"), server_round, after_training=True)


def same(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k].double(), b[k].double(), atol=atol) for k in a)


def test_k_zero_is_plain_deep_mutual_learning():
    cfg = tiny_cfg(f"{BASE} strategy.K=0")
    received = server(cfg).global_state
    result, state = train_once(cfg, 1, received)
    ref_m, ref_w = dml_reference(cfg, 1, received, iterations=3)
    assert same(state.load("personal"), ref_m) and same(result.upload, ref_w)
    # lam = 0 switches the proximal terms off as well: K = 3 with lam = 0 is the same DML.
    result0, state0 = train_once(tiny_cfg(f"{BASE} strategy.K=3 strategy.lam=0"), 1, received)
    assert same(result0.upload, ref_w) and same(state0.load("personal"), ref_m)
    # With K > 0 and lam > 0 the inner solves change the update.
    result3, _ = train_once(tiny_cfg(f"{BASE} strategy.K=3"), 1, received)
    assert not same(result3.upload, ref_w, atol=1e-4)


def test_personal_model_persists_unless_reset_personal():
    keep, reset = tiny_cfg(BASE), tiny_cfg(f"{BASE} strategy.reset_personal=true")
    received = server(keep).global_state
    for cfg in (keep, reset):
        context = make_context(0)
        train_once(cfg, 0, received, context, server_round=1)
        _, state_after = train_once(cfg, 0, received, context, server_round=2)
        _, state_fresh = train_once(cfg, 0, received, make_context(0), server_round=2)
        # A reset m starts round 2 from w_t whatever round 1 left; a kept m starts from round 1's.
        assert same(state_after.load("personal"), state_fresh.load("personal")) == (cfg is reset)


def test_evaluate_scores_m_as_personal_and_w_t_as_global():
    cfg = tiny_cfg(BASE)
    received = server(cfg).global_state
    context = make_context(2)
    train_once(cfg, 2, received, context)
    c = client(cfg, 2, context, 1, after=True)
    scores = c.evaluate(received, {"server-round": 1})
    assert scores["accuracy"] == c.score(c.model("x", c.state.load("personal")))[1]
    assert scores["global_accuracy"] == c.score(c.model("y", received))[1]


# --- the server half -------------------------------------------------------------------------
def replies(state: dict, sizes: list[int]) -> list[TrainReply]:
    torch.manual_seed(1)
    noisy = [{k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
             for _ in sizes]
    return [TrainReply(i, arrays, n, {}) for i, (arrays, n) in enumerate(zip(noisy, sizes, strict=True))]


def test_beta_one_is_fedavgs_server_step_and_beta_extrapolates():
    cfg_avg = tiny_cfg("strategy=fedavg model=mlp model.hidden=16")
    fedavg = server(cfg_avg)
    got = replies(fedavg.global_state, [30, 10, 60])
    fedavg.aggregate_replies(1, got)
    for beta in (1.0, 2.0, 0.5):
        pfml = server(tiny_cfg(f"strategy=pfml model=mlp model.hidden=16 strategy.beta={beta}"))
        before = {k: v.clone() for k, v in pfml.global_state.items()}
        pfml.aggregate_replies(1, got)
        for k, g in pfml.global_state.items():
            assert torch.allclose(g, (1 - beta) * before[k] + beta * fedavg.global_state[k], atol=1e-6)
    ints = damped_step({"n": torch.tensor(3)}, {"n": torch.tensor(5)}, 2.0)
    assert ints["n"].dtype == torch.int64 and int(ints["n"]) == 5


def test_schema_refuses_negative_k_and_zero_temperature():
    with pytest.raises(ConfigError, match="strategy.K"):
        tiny_cfg("strategy=pfml strategy.K=-1")
    with pytest.raises(ConfigError, match="strategy.temperature"):
        tiny_cfg("strategy=pfml strategy.temperature=0")


def test_round_loop_learns_above_chance():
    run = "strategy=pfml model=mlp model.hidden=16"  # one local epoch of batch 32 a round
    overrides = f"{TINY} {run}"
    st = server(tiny_cfg(run))
    run = Engine(st)
    rows = []
    run.start(FakeGrid(4, overrides), num_rounds=2, timeout=30, on_round=rows.append)
    last = rows[-1]
    assert last["rejected_replies"] == 0 and last["bytes_up"] > 0
    assert last["personalized_accuracy"]["mean"] > 0.25 and last["global_accuracy"] is not None
