"""pFedMe and Per-FedAvg: each client update against a hand computation (one full-batch local
iteration of the paper's equations, on the MLP), the server steps, and the round loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from task.algorithms.meta import hessian_vector
from task.core.messages import TrainReply

from .fake_grid import FakeGrid
from .helpers import TINY, client, engine, make_context, server, tiny_cfg

# One batch (the whole training split) per local iteration: every step is a full-batch step.
ONE_BATCH = "model=mlp model.hidden=16 batch_size=100000"
LR = 0.05  # conf/config.yaml's lr


def _grad(c, params: dict, batch=None) -> dict:
    """grad CE at ``params`` on c's whole training split, by autograd on a fresh model."""
    model = c.new_model()
    model.load_state_dict({**model.state_dict(), **params})
    live = dict(model.named_parameters())
    x, y = batch or (c.data.x_train, c.data.y_train)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(live.values()))
    return {k: g for k, g in zip(live, grads, strict=True)}


def _close(a: dict, b: dict, atol: float = 1e-6) -> bool:
    return all(torch.allclose(a[k], b[k], atol=atol, rtol=1e-5) for k in b)


def _params(c) -> dict:
    return {k: v.clone() for k, v in c.initial_state().items() if k in dict(c.new_model().named_parameters())}


# --- pFedMe -------------------------------------------------------------------------------
def test_pfedme_inner_steps_and_the_local_w_step_against_their_formula():
    lam, nu, mu, K = 2.0, 0.03, 0.1, 3
    cfg = tiny_cfg(f"strategy=pfedme {ONE_BATCH} strategy.local_iterations=1 strategy.K={K} "
                   f"strategy.lam={lam} strategy.personal_lr={nu} strategy.inner_l2={mu}")
    st, context = server(cfg), make_context(0)
    c = client(cfg, 0, context)
    w0 = _params(c)
    theta = {k: v.clone() for k, v in w0.items()}
    for _ in range(K):  # theta <- theta - nu (grad f(theta) + lam (theta - w) + mu theta)
        g = _grad(c, theta)
        theta = {k: theta[k] - nu * (g[k] + lam * (theta[k] - w0[k]) + mu * theta[k]) for k in theta}
    w1 = {k: w0[k] - LR * lam * (w0[k] - theta[k]) for k in w0}  # w <- w - eta lam (w - theta)
    result = c.train(st.global_state, {"server-round": 1})
    assert set(result.upload) == set(st.global_state) and _close(result.upload, w1)
    kept = client(cfg, 0, context, after=True).state.load("personal")
    assert _close(kept, theta)
    # The personal model scored is theta_i; the global one w_t.
    scores = client(cfg, 0, context, after=True).evaluate(st.global_state, {"server-round": 1})
    assert {"accuracy", "global_accuracy"} <= set(scores)


def test_pfedme_server_mixes_the_previous_model_and_the_mean_by_beta():
    cfg = tiny_cfg("strategy=pfedme model=mlp model.hidden=16 strategy.beta=2.0")
    st = server(cfg)
    w = {k: v.clone() for k, v in st.global_state.items()}
    ups = [{k: v + 1.0 for k, v in w.items()}, {k: v + 4.0 for k, v in w.items()}]
    st.aggregate_replies(1, [TrainReply(0, ups[0], 10, {}), TrainReply(1, ups[1], 30, {})])
    for k in w:  # (1 - beta) w + beta (0.25 (w + 1) + 0.75 (w + 4)) = w + 2 * 3.25
        assert torch.allclose(st.global_state[k], w[k] + 6.5, atol=1e-5)


# --- Per-FedAvg ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant,hessian", [("fo", "autograd"), ("hf", "autograd"),
                                             ("hf", "finite_difference")])
def test_perfedavg_step_against_its_formula(variant, hessian):
    alpha, beta = 0.1, 0.07
    cfg = tiny_cfg(f"strategy=perfedavg {ONE_BATCH} strategy.local_steps=1 strategy.variant={variant} "
                   f"strategy.hessian={hessian} strategy.alpha={alpha} strategy.beta={beta}")
    st, c = server(cfg), client(cfg, 0)
    w = _params(c)
    g = _grad(c, w)
    w_tilde = {k: w[k] - alpha * g[k] for k in w}
    direction = _grad(c, w_tilde)                             # FO: grad f(w~; D')
    if variant == "hf" and hessian == "finite_difference":    # HF, the paper's d_i
        delta = 1e-3
        plus = _grad(c, {k: w[k] + delta * direction[k] for k in w})
        minus = _grad(c, {k: w[k] - delta * direction[k] for k in w})
        direction = {k: direction[k] - alpha * (plus[k] - minus[k]) / (2 * delta) for k in w}
    elif variant == "hf":                                     # HF: (I - alpha H(w)) grad f(w~)
        flat = [w[k] for k in w]

        def loss_of(*params):
            model = c.new_model()
            named = dict(zip(w, params, strict=True))
            out = torch.func.functional_call(model, named, (c.data.x_train,))
            return F.cross_entropy(out, c.data.y_train)

        _, hv = torch.autograd.functional.hvp(loss_of, tuple(flat), tuple(direction[k] for k in w))
        direction = {k: direction[k] - alpha * h for k, h in zip(w, hv, strict=True)}
    expected = {k: w[k] - beta * direction[k] for k in w}
    result = c.train(st.global_state, {"server-round": 1})
    assert _close(result.upload, expected, atol=1e-5)
    assert not _close(result.upload, {k: w[k] - beta * g[k] for k in w})  # not FedAvg's step


def test_finite_difference_hessian_vector_equals_autograd_on_a_smooth_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    batch = (torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,)))
    w = {n: p.detach() for n, p in model.named_parameters()}
    v = {n: torch.randn_like(p) for n, p in w.items()}
    exact = hessian_vector(model, w, batch, v, "autograd")
    approx = hessian_vector(model, w, batch, v, "finite_difference", 1e-4)
    assert all(torch.allclose(exact[n], approx[n], atol=1e-7) for n in w)


def test_perfedavg_scores_w_t_after_its_alpha_steps_on_training_data():
    alpha = 0.5
    base = f"strategy=perfedavg {ONE_BATCH} strategy.alpha={alpha}"
    st, c = server(tiny_cfg(base)), client(tiny_cfg(base), 0)
    w = _params(c)
    g = _grad(c, w)
    adapted = c.new_model()
    adapted.load_state_dict({**adapted.state_dict(), **{k: w[k] - alpha * g[k] for k in w}})
    adapted.eval()
    with torch.no_grad():
        by_hand = float((adapted(c.data.x_test).argmax(1) == c.data.y_test).float().mean())
    scores = c.evaluate(st.eval_arrays(0), {"server-round": 1})
    assert scores["accuracy"] == pytest.approx(by_hand) and scores["accuracy"] != scores["global_accuracy"]
    unadapted = client(tiny_cfg(f"{base} strategy.adapt_steps=0"), 0)
    none = unadapted.evaluate(st.eval_arrays(0), {"server-round": 1})
    assert none["accuracy"] == none["global_accuracy"]


# --- the round loop on the tiny federation --------------------------------------------------
RUNS = {"pfedme": "strategy=pfedme strategy.K=2 strategy.local_iterations=4",
        "perfedavg": "strategy=perfedavg",
        "perfedavg_hf": "strategy=perfedavg strategy.variant=hf model=mlp"}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_round_loop_learns_above_chance(name):
    st = engine(tiny_cfg(RUNS[name]))
    rows: list[dict] = []
    st.start(FakeGrid(4, f"{TINY} {RUNS[name]}"), num_rounds=2, timeout=60, on_round=rows.append)
    last = rows[-1]
    assert last["rejected_replies"] == 0 and len(last["per_client_accuracy"]) == 4
    acc = last["personalized_accuracy"]
    assert 0.3 < acc["mean"] <= 1 and last["global_accuracy"] is not None  # chance: 0.1


def test_pfedme_killed_then_resumed_ends_like_an_uninterrupted_run(tmp_path):
    """theta_i is client state on disk: a resumed run scores the same personal models."""
    from .test_reliability import killed_and_resumed

    a, b = killed_and_resumed(tmp_path, f"{TINY} strategy=pfedme strategy.K=2 model=mlp num_rounds=3 "
                                        "fraction_train=0.5")
    assert [r["round"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b, strict=True):
        assert ra["per_client_accuracy"] == rb["per_client_accuracy"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6, abs=1e-9)
