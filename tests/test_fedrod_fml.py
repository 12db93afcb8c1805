"""FedRoD and FML: their losses and one step against hand computations, and the round loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from strategies.fedrod import balanced_softmax_loss

from .fake_grid import FakeGrid
from .helpers import TINY, client, engine, make_context, server, tiny_cfg

ONE_STEP = "strategy=fedrod model=mlp model.hidden=16 batch_size=100000 local_epochs=1"
LR = 0.05


def test_balanced_softmax_is_cross_entropy_of_logits_plus_log_counts():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    y = torch.tensor([0, 2])
    counts = torch.tensor([3, 1, 6])
    shifted = logits + torch.log(torch.tensor([3.0, 1.0, 6.0]))
    by_hand = -(shifted.log_softmax(1)[0, 0] + shifted.log_softmax(1)[1, 2]) / 2
    assert float(balanced_softmax_loss(logits, y, counts)) == pytest.approx(float(by_hand), rel=1e-6)
    # A class the client never saw drops out of the loss, which stays finite.
    assert torch.isfinite(balanced_softmax_loss(logits, y, torch.tensor([3, 0, 6])))


def test_one_step_moves_the_generic_model_by_the_bsm_gradient_and_the_personal_head_by_its_own():
    cfg = tiny_cfg(ONE_STEP)
    st, context = server(cfg), make_context(0)
    c = client(cfg, 0, context)
    x, y = c.data.x_train, c.data.y_train
    counts = torch.bincount(y, minlength=c.federation.num_classes)
    # By hand, from the initial weights: the generic model's BSM step ...
    ref = c.new_model()
    ref.load_state_dict(st.global_state)
    ref.train()
    z = ref.features(x)
    logits = ref.classifier(z)
    params = dict(ref.named_parameters())
    grads = torch.autograd.grad(balanced_softmax_loss(logits, y, counts), list(params.values()))
    generic = {k: p.detach() - LR * g for (k, p), g in zip(params.items(), grads, strict=True)}
    # ... and the personal head's (it starts as the initial head) on sg[z], sg[g(z)].
    pw = ref.classifier.weight.detach().clone().requires_grad_(True)
    pb = ref.classifier.bias.detach().clone().requires_grad_(True)
    loss_p = F.cross_entropy(logits.detach() + F.linear(z.detach(), pw, pb), y)
    gw, gb = torch.autograd.grad(loss_p, [pw, pb])
    result = c.train(st.global_state, {"server-round": 1})
    assert set(result.upload) == set(st.global_state)
    assert all(torch.allclose(result.upload[k], generic[k], atol=1e-6, rtol=1e-5) for k in generic)
    head = client(cfg, 0, context, after=True).state.load("personal_head")
    assert torch.allclose(head["weight"], pw.detach() - LR * gw, atol=1e-6)
    assert torch.allclose(head["bias"], pb.detach() - LR * gb, atol=1e-6)


def test_round_loop_learns_above_chance_and_the_personal_head_adds_to_the_generic_one():
    overrides = f"{TINY} strategy=fedrod local_epochs=2"
    cfg = tiny_cfg("strategy=fedrod local_epochs=2")
    st = engine(cfg)
    rows: list[dict] = []
    grid = FakeGrid(4, overrides)
    st.start(grid, num_rounds=2, timeout=60, on_round=rows.append)
    last = rows[-1]
    assert last["rejected_replies"] == 0 and 0.3 < last["personalized_accuracy"]["mean"] <= 1
    assert last["global_accuracy"] is not None
    # Each client's personal head trained away from the initial head it started as (the mean
    # accuracies alone may coincide: 101 of 120 both, on one machine).
    for cid in range(4):
        c = client(cfg, cid, grid.contexts[100 + cid], server_round=3)
        head, initial = c.state.load("personal_head"), c.initial_state()
        assert head, f"client {cid} saved no personal head"
        for name, value in head.items():
            start = next(v for k, v in initial.items() if k.endswith(f".{name}"))
            assert not torch.equal(value, start), f"client {cid}'s personal {name} never trained"


# --- FML (strategies/fml.py) ------------------------------------------------------------
def test_fml_losses_against_their_formula():
    from strategies.fml import fml_losses

    z_l = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], requires_grad=True)
    z_m = torch.tensor([[0.5, 0.5, 0.0], [1.0, -1.0, 0.5]], requires_grad=True)
    y = torch.tensor([0, 1])
    p_l, p_m = z_l.softmax(1), z_m.softmax(1)
    kl_m_l = float((p_m * (p_m.log() - p_l.log())).sum(1).mean())  # KL(p_meme || p_local)
    kl_l_m = float((p_l * (p_l.log() - p_m.log())).sum(1).mean())
    ce_l, ce_m = float(F.cross_entropy(z_l, y)), float(F.cross_entropy(z_m, y))
    local, meme = fml_losses(z_l, z_m, y, 0.3, 0.8)
    assert float(local) == pytest.approx(0.3 * ce_l + 0.7 * kl_m_l, rel=1e-5)
    assert float(meme) == pytest.approx(0.8 * ce_m + 0.2 * kl_l_m, rel=1e-5)
    mean_local, _ = fml_losses(z_l, z_m, y, 0.3, 0.8, "mean")  # torch's KLDivLoss() default
    assert float(mean_local) == pytest.approx(0.3 * ce_l + 0.7 * kl_m_l / 3, rel=1e-5)
    # The peer is detached: L_local sends no gradient into the meme's logits.
    local.backward()
    assert z_m.grad is None and z_l.grad is not None


def test_fml_round_loop_learns_above_chance_and_keeps_the_local_model():
    overrides = f"{TINY} strategy=fml local_epochs=2"
    st = engine(tiny_cfg("strategy=fml local_epochs=2"))
    rows: list[dict] = []
    grid = FakeGrid(4, overrides)
    st.start(grid, num_rounds=2, timeout=60, on_round=rows.append)
    last = rows[-1]
    assert last["rejected_replies"] == 0 and 0.3 < last["personalized_accuracy"]["mean"] <= 1
    assert last["global_accuracy"] is not None
    assert any(k.endswith("personal") for k in grid.contexts[100].state.array_records)
