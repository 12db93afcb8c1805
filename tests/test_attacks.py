"""Byzantine attacks (task/threat/attacks.py): each produces what it claims, on the client (a
Byzantine ClientApp's reply) and in the server-side adversary step."""

from __future__ import annotations

import pytest
import torch

from task.core.messages import TrainReply
from task.core.params import model_state, subtract
from task.threat import attacks
from task.threat.byzantine import choose_byzantine
from task.threat.clients import train_as_told

from .helpers import client, engine, tiny_cfg


def test_gaussian_has_the_claimed_mean_and_std():
    out = attacks.gaussian(torch.zeros(20000), torch.Generator().manual_seed(0))
    assert abs(float(out.mean()) - 1e6) < 10 and abs(float(out.std()) - 200) < 10


def test_signflip_and_bitflip_negate():
    u = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(attacks.signflip(u, 2.0), torch.tensor([-2.0, 4.0, -6.0]))
    assert torch.equal(attacks.bitflip(u), -u)


def test_labelflip_changes_every_label_and_is_an_involution():
    y = torch.arange(10)
    flipped = attacks.labelflip(y, 10)
    assert bool((flipped != y).all()) and torch.equal(attacks.labelflip(flipped, 10), y)
    assert int(flipped.min()) == 0 and int(flipped.max()) == 9


def test_alie_is_mean_minus_z_sigma_with_baruchs_z():
    # n = 50, b = 10: s = floor(26) - 10 = 16, z = Phi^-1(34 / 50) ~ 0.4677
    assert attacks.alie_z(50, 10) == pytest.approx(0.4677, abs=1e-3)
    H = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    out = attacks.alie(H, 10)
    expected = H.mean(0) - attacks.alie_z(50, 10) * H.std(0, unbiased=False)
    assert torch.allclose(out, expected)


def test_alie_prfl_rule_is_over_the_honest_clients_with_the_unbiased_std():
    # n = 50, b = 10: s = 16, z = Phi^-1((50 - 10 - 16) / 40) = Phi^-1(0.6) ~ 0.2533
    assert attacks.alie_z(50, 10, "prfl") == pytest.approx(0.2533, abs=1e-3)
    H = torch.randn(40, 7, generator=torch.Generator().manual_seed(0))
    out = attacks.alie(H, 10, rule="prfl")
    assert torch.allclose(out, H.mean(0) - attacks.alie_z(50, 10, "prfl") * H.std(0, unbiased=True))
    assert not torch.allclose(out, attacks.alie(H, 10))


def test_ipm_has_a_negative_inner_product_with_the_honest_mean():
    H = 1.0 + torch.randn(10, 5, generator=torch.Generator().manual_seed(0))
    out = attacks.ipm(H, 0.5)
    assert torch.allclose(out, -0.5 * H.mean(0)) and float(out @ H.mean(0)) < 0


def test_byzantine_clients_are_seeded_and_excluded():
    cfg = tiny_cfg("strategy=fedavg attack=gaussian attack.fraction=0.5")
    chosen = choose_byzantine(4, cfg)
    assert len(chosen) == 2 and chosen == choose_byzantine(4, cfg)
    st = engine(cfg)
    assert st.byzantine == chosen and st.method.excluded_clients == set(chosen)
    config = st.threat.message_config(chosen[0], st.method.upload_is_update)
    assert config == {"byzantine": True, "attack": "gaussian", "upload-kind": "model"}
    honest = next(c for c in range(4) if c not in chosen)
    assert st.threat.message_config(honest, st.method.upload_is_update) == {}
    assert engine(tiny_cfg()).byzantine == []


def _trained(cfg, cid: int, config: dict):
    method = client(cfg, cid)
    received = method.initial_state()
    return received, train_as_told(method, received, {"server-round": 1, **config})


@pytest.mark.parametrize("attack", ["gaussian", "signflip", "labelflip"])
def test_a_byzantine_client_really_sends_its_attack(attack):
    cfg = tiny_cfg(f"strategy=fedavg attack={attack}")
    received, honest = _trained(cfg, 0, {})
    _, bad = _trained(cfg, 0, {"byzantine": True, "attack": attack, "upload-kind": "model"})
    key = next(k for k, v in received.items() if v.is_floating_point())
    honest_update = honest.upload[key] - received[key]
    bad_update = bad.upload[key] - received[key]
    if attack == "gaussian":
        assert abs(float(bad_update.mean()) - 1e6) < 1e3
    elif attack == "signflip":
        assert torch.allclose(bad_update, -honest_update, atol=1e-5)
    else:
        assert not torch.allclose(bad_update, honest_update)
    assert set(bad.upload) == set(honest.upload)


def test_a_client_that_is_not_told_is_honest():
    cfg = tiny_cfg("strategy=fedavg attack=gaussian")
    received, plain = _trained(cfg, 0, {})
    method = client(cfg, 0)
    direct = method.train(received, {"server-round": 1})
    assert all(torch.equal(plain.upload[k], direct.upload[k]) for k in plain.upload)


@pytest.mark.parametrize("attack", ["bitflip", "alie", "ipm"])
def test_server_side_adversary_replaces_byzantine_replies(attack):
    cfg = tiny_cfg(f"strategy=fedavg attack={attack} attack.fraction=0.25")
    st = engine(cfg)
    bad = st.byzantine[0]
    sent = st.method.global_state
    replies = []
    for cid in range(4):
        method = client(cfg, cid)
        replies.append(TrainReply(cid, method.train(sent, {"server-round": 1}).upload, 10, {}))
    key = next(k for k, v in sent.items() if v.is_floating_point())
    honest = torch.stack([(r.arrays[key] - sent[key]).reshape(-1) for r in replies if r.cid != bad])
    out = st.threat.server_attack(1, replies, st.method.excluded_clients,
                                  lambda r: st.method.upload_reference(r, sent))
    got = (out[bad].arrays[key] - sent[key]).reshape(-1)
    if attack == "bitflip":
        assert any(torch.allclose(got, -h, atol=1e-5) for h in honest)
    elif attack == "alie":
        assert torch.allclose(got, attacks.alie(honest, 1), atol=1e-5)
    else:
        assert torch.allclose(got, attacks.ipm(honest, 0.1), atol=1e-6)
    for r in out:
        if r.cid != bad:  # honest replies untouched
            assert torch.equal(r.arrays[key], replies[r.cid].arrays[key])


def test_update_uploading_strategy_gets_the_attack_as_an_update():
    """LG-Mix uploads Delta_i: a signflip client sends -Delta_i, not a flipped model."""
    cfg = tiny_cfg("strategy=lgmix attack=signflip")
    method = client(cfg, 0)
    received = method.initial_state()
    honest = method.train(received, {"server-round": 1})
    bad = train_as_told(client(cfg, 0), received, {"server-round": 1, "byzantine": True,
                                                    "attack": "signflip", "upload-kind": "update"})
    assert all(torch.allclose(bad.upload[k], -honest.upload[k], atol=1e-5) for k in honest.upload)
    assert subtract(model_state(method.model("main", received)), received)  # sanity: keys align


def test_bitflip_can_negate_the_first_honest_client_as_prfl():
    cfg = tiny_cfg("strategy=fedavg attack=bitflip attack.fraction=0.25 attack.honest=first")
    st = engine(cfg)
    bad = st.byzantine[0]
    sent = st.method.global_state
    replies = [TrainReply(cid, client(cfg, cid).train(sent, {"server-round": 1}).upload, 10, {})
               for cid in range(4)]
    first = min(c for c in range(4) if c != bad)
    key = next(k for k, v in sent.items() if v.is_floating_point())
    want = -(replies[first].arrays[key] - sent[key])
    out = st.threat.server_attack(1, replies, st.method.excluded_clients,
                                  lambda r: st.method.upload_reference(r, sent))
    assert torch.allclose(out[bad].arrays[key] - sent[key], want, atol=1e-6)
