"""FedPer, FedRep, FedBABU, LG-FedAvg, APFL: each update rule against a hand computation (one
full-batch SGD step of the paper's equations, on the MLP), then the round loop, bytes, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from strategies.apfl import apfl_step, mixed_state
from task.core.params import to_record
from task.core.split import split_model

from .fake_grid import FakeGrid
from .helpers import TINY, client, engine, make_context, server, tiny_cfg

# One batch per epoch (the whole training split), one epoch: every phase is a single SGD step.
ONE_STEP = "model=mlp model.hidden=16 batch_size=100000 local_epochs=1"
LR = 0.05  # conf/config.yaml's lr


def _step(c, state: dict, keys: set[str]) -> dict:
    """state after w <- w - lr grad CE(w) on c's whole training split, for the parameters in keys."""
    model = c.new_model()
    model.load_state_dict(state)
    model.train()
    params = dict(model.named_parameters())
    names = [k for k in params if k in keys]
    loss = F.cross_entropy(model(c.data.x_train), c.data.y_train)
    grads = torch.autograd.grad(loss, [params[k] for k in names])
    out = {k: v.clone() for k, v in state.items()}
    for k, g in zip(names, grads, strict=True):
        out[k] = params[k].detach() - LR * g
    return out


def _close(a: dict, b: dict, keys) -> bool:
    return all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in keys)


def _setup(name: str, extra: str = "", base: str = ONE_STEP):
    cfg = tiny_cfg(f"strategy={name} {base} {extra}")
    st, context = server(cfg), make_context(0)
    c = client(cfg, 0, context)
    return cfg, st, context, c, split_model(c.new_model())


def test_fedper_shares_the_body_trains_both_parts_keeps_the_head():
    cfg, st, context, c, split = _setup("fedper")
    assert set(st.global_state) == split.body and set(st.eval_arrays(0)) == split.body
    full = {**c.initial_state(), **st.global_state}
    result = c.train(st.global_state, {"server-round": 1})
    expected = _step(c, full, split.body | split.head)  # one step of the whole model
    assert set(result.upload) == split.body and _close(result.upload, expected, split.body)
    kept = client(cfg, 0, context, after=True).state.load("personal")
    assert set(kept) == split.head and _close(kept, expected, split.head)


def test_lgfedavg_shares_the_head_keeps_the_body():
    cfg, st, context, c, split = _setup("lgfedavg")
    assert set(st.global_state) == split.head
    full = {**c.initial_state(), **st.global_state}
    result = c.train(st.global_state, {"server-round": 1})
    expected = _step(c, full, split.body | split.head)
    assert set(result.upload) == split.head and _close(result.upload, expected, split.head)
    kept = client(cfg, 0, context, after=True).state.load("personal")
    assert set(kept) == split.body and _close(kept, expected, split.body)


def test_fedrep_fits_the_head_first_then_the_body_under_the_new_head():
    cfg, st, context, c, split = _setup("fedrep", "strategy.head_epochs=1")
    start = {**c.initial_state(), **st.global_state}
    result = c.train(st.global_state, {"server-round": 1})
    after_head = _step(c, start, split.head)       # 1. head step, body fixed
    assert _close(after_head, start, split.body)
    after_body = _step(c, after_head, split.body)   # 2. body step from the new head, head fixed
    kept = client(cfg, 0, context, after=True).state.load("personal")
    assert set(kept) == split.head and _close(kept, after_head, split.head)
    assert set(result.upload) == split.body and _close(result.upload, after_body, split.body)
    # The body step saw the new head, not the initial one: the order matters.
    wrong = _step(c, start, split.body)
    assert not _close(result.upload, wrong, split.body)


def test_fedbabu_trains_the_body_under_the_frozen_initial_head_and_keeps_nothing():
    cfg, st, context, c, split = _setup("fedbabu", "strategy.ft_epochs=1 strategy.ft_part=head")
    start = {**c.initial_state(), **st.global_state}
    result = c.train(st.global_state, {"server-round": 1})
    expected = _step(c, start, split.body)
    assert set(result.upload) == split.body and _close(result.upload, expected, split.body)
    # The head that trained is the initial one, untouched: the model slot still holds it.
    assert _close(c.model("main", result.upload).state_dict(), start, split.head)
    scores = c.evaluate(result.upload, {"server-round": 1})
    assert {"accuracy", "global_accuracy"} <= set(scores)
    assert client(cfg, 0, context, after=True).state.load("personal") is None
    assert st.has_global_model and not st.keeps_client_state


def test_apfl_step_against_its_formula():
    torch.manual_seed(0)
    w, v = nn.Linear(3, 2), nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    w0 = {k: p.detach().clone() for k, p in w.named_parameters()}
    v0 = {k: p.detach().clone() for k, p in v.named_parameters()}
    alpha, lr, alpha_lr, rho = 0.3, 0.1, 0.5, 0.02
    # By hand: g_w = grad f(w), g = grad f(vbar), vbar = alpha v + (1 - alpha) w.
    ref = nn.Linear(3, 2)
    with torch.no_grad():
        ref.weight.copy_(w0["weight"])
        ref.bias.copy_(w0["bias"])
    g_w = torch.autograd.grad(F.cross_entropy(ref(x), y), [ref.weight, ref.bias])
    with torch.no_grad():
        ref.weight.copy_(alpha * v0["weight"] + (1 - alpha) * w0["weight"])
        ref.bias.copy_(alpha * v0["bias"] + (1 - alpha) * w0["bias"])
    g = dict(zip(("weight", "bias"), torch.autograd.grad(F.cross_entropy(ref(x), y),
                                                          [ref.weight, ref.bias]), strict=True))
    grad_alpha = sum(float(((v0[k] - w0[k]) * g[k]).sum()) for k in g)
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in (w, v)]
    _, _, new_alpha = apfl_step(w, v, alpha, x, y, *opts, alpha_lr, rho)
    assert new_alpha == pytest.approx(alpha - alpha_lr * (grad_alpha + rho * alpha), abs=1e-6)
    for k, gw in zip(("weight", "bias"), g_w, strict=True):
        assert torch.allclose(dict(w.named_parameters())[k], w0[k] - lr * gw, atol=1e-6)
        assert torch.allclose(dict(v.named_parameters())[k], v0[k] - lr * alpha * g[k], atol=1e-6)
    # alpha stays in [0, 1]; fixed alpha (adaptive=false) does not move.
    assert apfl_step(w, v, alpha, x, y, *opts, 1e6, 0.0)[2] in (0.0, 1.0)
    assert apfl_step(w, v, alpha, x, y, *opts, alpha_lr, rho, adaptive=False)[2] == alpha


def test_apfl_client_keeps_v_and_alpha_and_scores_the_mixture():
    # Two steps: v_i starts as w_g, so alpha's gradient <v - w, g> is 0 on the first step.
    cfg, st, context, c, _ = _setup("apfl", "strategy.alpha=0.5", ONE_STEP.replace("epochs=1", "epochs=2"))
    result = c.train(st.global_state, {"server-round": 1})
    assert set(result.upload) == set(st.global_state) and 0.0 <= result.metrics["alpha"] <= 1.0
    after = client(cfg, 0, context, after=True)
    assert after.alpha() == result.metrics["alpha"] != 0.5
    v = after.state.load("personal")
    mixed = mixed_state(v, result.upload, 0.25, set(v))
    assert all(torch.allclose(mixed[k], 0.25 * v[k] + 0.75 * result.upload[k]) for k in v)
    scores = after.evaluate(st.global_state, {"server-round": 1})
    assert scores["accuracy"] != scores["global_accuracy"]


# --- the round loop on the tiny federation ------------------------------------------------
FAST = {"fedrep": "strategy.head_epochs=1", "fedbabu": "strategy.ft_epochs=1"}
METHODS = ["fedper", "fedrep", "fedbabu", "lgfedavg", "apfl"]


@pytest.fixture(scope="module")
def runs():
    """metrics rows of 2 rounds of each method (and FedAvg) on the tiny federation."""
    out = {}
    for name in ["fedavg", *METHODS]:
        overrides = f"{TINY} strategy={name} {FAST.get(name, '')}"
        st = engine(tiny_cfg(f"strategy={name} {FAST.get(name, '')}"))
        rows: list[dict] = []
        st.start(FakeGrid(4, overrides), num_rounds=2, timeout=60, on_round=rows.append)
        out[name] = (st.method, rows)
    return out


@pytest.mark.parametrize("name", METHODS)
def test_round_loop_learns_above_chance(runs, name):
    method, rows = runs[name]
    last = rows[-1]
    assert last["rejected_replies"] == 0 and last["sampled_clients"] == 4
    acc = last["personalized_accuracy"]
    assert 0.3 < acc["mean"] <= 1 and acc["worst"] <= acc["weighted"] <= 1  # chance: 0.1
    assert len(last["per_client_accuracy"]) == 4
    assert (last["global_accuracy"] is None) != method.has_global_model


@pytest.mark.parametrize("name", ["fedper", "fedrep", "fedbabu", "lgfedavg"])
def test_partial_methods_send_only_what_they_share(runs, name):
    """bytes_up and bytes_down are FedAvg's less exactly the kept part's record, per message."""
    method, rows = runs[name]
    fedavg_rows = runs["fedavg"][1]
    model = client(tiny_cfg(f"strategy={name}"), 0).new_model()
    full = {k: v for k, v in model.state_dict().items()}
    kept = {k: v for k, v in full.items() if k not in method.global_state}
    assert kept and set(method.global_state) | set(kept) == set(full)
    kept_bytes = to_record(kept).count_bytes()
    for row, avg in zip(rows, fedavg_rows, strict=True):
        assert avg["bytes_up"] - row["bytes_up"] == 4 * kept_bytes  # 4 uploads
        assert avg["bytes_down"] - row["bytes_down"] == 4 * kept_bytes  # 4 train messages
        evaluated = 4 * kept_bytes if avg["eval_bytes_down"] else 0  # 4 evaluate messages
        assert avg["eval_bytes_down"] - row["eval_bytes_down"] == evaluated


@pytest.mark.parametrize("name", ["fedrep", "apfl"])
def test_killed_then_resumed_run_ends_like_an_uninterrupted_one(tmp_path, name):
    from .test_reliability import killed_and_resumed

    a, b = killed_and_resumed(tmp_path, f"{TINY} strategy={name} num_rounds=3 fraction_train=0.5 "
                                        f"{FAST.get(name, '')}")
    assert [r["round"] for r in b] == [1, 2, 3]
    assert set(b[-1]["group_accuracy"]) == {"plain", "inverted"}  # per-group accuracy, via server_app
    for ra, rb in zip(a, b, strict=True):
        assert ra["per_client_accuracy"] == rb["per_client_accuracy"]
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", ["fedper", "lgfedavg"])
def test_a_signflip_client_flips_its_update_of_the_shared_part_only(name):
    from task.threat.clients import train_as_told

    cfg = tiny_cfg(f"strategy={name} attack=signflip")
    sent = server(cfg).global_state
    honest = client(cfg, 0).train(sent, {"server-round": 1})
    bad = train_as_told(client(cfg, 0), sent, {"server-round": 1, "byzantine": True,
                                                "attack": "signflip", "upload-kind": "model"})
    assert set(bad.upload) == set(honest.upload) == set(sent)
    floats = [k for k in sent if sent[k].is_floating_point()]
    assert all(torch.allclose(bad.upload[k] - sent[k], sent[k] - honest.upload[k], atol=1e-5) for k in floats)


@pytest.mark.parametrize(("name", "attack", "aggregator"), [("fedrep", "alie", "median"),
                                                            ("apfl", "ipm", "trimmed_mean")])
def test_server_side_attacks_and_robust_aggregators_run_on_the_shared_part(name, attack, aggregator):
    extra = (f"strategy={name} attack={attack} attack.fraction=0.25 aggregator={aggregator} "
             f"{FAST.get(name, '')}")
    st = engine(tiny_cfg(extra))
    rows: list[dict] = []
    st.start(FakeGrid(4, f"{TINY} {extra}"), num_rounds=1, timeout=60, on_round=rows.append)
    row = rows[-1]
    assert row["rejected_replies"] == 0 and row["byzantine_clients"] == st.byzantine and st.byzantine
    assert len(row["per_client_accuracy"]) == 4 and 0.0 <= row["personalized_accuracy"]["mean"] <= 1.0


@pytest.mark.parametrize("name", ["fedper", "fedbabu", "apfl"])
def test_a_validation_split_is_scored_for_the_reported_round_selection(name):
    cfg = tiny_cfg(f"strategy={name} partition.val_fraction=0.25 {FAST.get(name, '')}")
    scores = client(cfg, 0).evaluate(server(cfg).eval_arrays(0), {"server-round": 1})
    assert 0.0 <= scores["validation_accuracy"] <= 1.0
