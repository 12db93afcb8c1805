"""Federated clustering (strategies/clustered.py) and IFCA (strategies/ifca.py)."""

from __future__ import annotations

import torch

from strategies.clustered import debiased, worker_momentum
from strategies.ifca import bundle, is_bundle, unbundle
from task.algorithms import robust
from task.algorithms.cluster_metrics import cluster_ari
from task.algorithms.clustering import (
    components,
    initial_clusters,
    nearest_centre,
    seed_centres,
    tc_groups,
    typical,
)
from task.core.messages import TrainReply
from task.data.load import load_federation
from task.engine.rounds import Engine
from task.run.config import compose_config

from .fake_grid import FakeGrid
from .helpers import TINY, client, make_context, server, tiny_cfg

RELABEL = ("dataset=mnist5k partition=relabel partition.num_clients=8 partition.num_clusters=2 "
           "model=mlp model.hidden=32 lr=0.01 momentum=0.9")


def separable(k: int = 4, per: int = 10, d: int = 30, outliers: int = 0, seed: int = 0):
    """``per`` rows around each of k well-separated centres, then ``outliers`` rows at 1e6."""
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(k, d, generator=gen)
    rows = [centres[c] + 0.3 * torch.randn(d, generator=gen) for c in range(k) for _ in range(per)]
    rows += [torch.full((d,), 1e6) + 200 * torch.randn(d, generator=gen) for _ in range(outliers)]
    truth = [c for c in range(k) for _ in range(per)] + [k] * outliers
    return torch.stack(rows), truth


def test_seeding_reaches_ari_1_on_separable_clusters_despite_gaussian_outliers():
    X, truth = separable(outliers=8)
    seeds = seed_centres(X, 4, 0.2)
    assert all(truth[s] < 4 for s in seeds) and len({truth[s] for s in seeds}) == 4
    labels = nearest_centre(X, X[seeds])
    honest = {i: labels[i] for i in range(40)}
    assert cluster_ari(honest, truth) == 1.0


def test_seeding_leaves_out_mirrored_attackers_and_lloyd_finds_the_clusters():
    """8 sign-flipped copies of honest rows (-x_i: each alone, mirrored pairs at most) are not
    dense, win no seed, and the honest rows are grouped exactly."""
    X, truth = separable()
    bad = -X[torch.arange(0, 40, 5)]
    labels, centres = initial_clusters(torch.cat([X, bad]), 4, 0.2)
    assert len(centres) == 4
    assert cluster_ari(dict(enumerate(labels[:40])), truth) == 1.0
    for s in seed_centres(torch.cat([X, bad]), 4, 0.2):
        assert s < 40


def test_a_block_of_colluding_copies_does_not_drag_its_groups_seed_centre():
    """8 identical uploads (IPM's -eps mu) nearest cluster 0: merged, they are one row of that
    group's median instead of half of it."""
    X, truth = separable()
    own = X[:10].mean(0)
    copies = (0.6 * own).expand(8, -1)
    labels, centres = initial_clusters(torch.cat([X, copies]), 4, 0.2, tolerance=0.1)
    assert cluster_ari(dict(enumerate(labels[:40])), truth) == 1.0
    home = centres[labels[0]]
    assert float((home - own).norm()) < 0.2 * float((copies[0] - own).norm())
    dragged = robust.median(torch.cat([X[:10], copies])).value  # the group's median, unmerged
    assert float((dragged - own).norm()) > 3 * float((home - own).norm())


def test_worker_momentum_debiased_is_a_weighted_mean_of_the_updates():
    beta = 0.9
    delta = {"w": torch.tensor([1.0, -2.0])}
    m = worker_momentum(None, delta, beta)
    assert torch.allclose(debiased(m, beta, 1)["w"], delta["w"])  # the first upload is the update
    for t in range(2, 6):
        m = worker_momentum(m, delta, beta)
        assert torch.allclose(debiased(m, beta, t)["w"], delta["w"])  # equal updates: their mean
    other = worker_momentum(worker_momentum(None, delta, beta), {"w": torch.zeros(2)}, beta)
    assert torch.allclose(debiased(other, beta, 2)["w"], delta["w"] * beta / (1 + beta))


def test_per_client_tc_groups_are_the_clusters():
    X, truth = separable(per=10)
    G, kept = tc_groups(X, 0.2, 10)
    assert cluster_ari(dict(enumerate(components(kept))), truth) == 1.0
    # Each client's aggregate is near its own cluster's mean, far from the others.
    for i in range(len(X)):
        own = X[[j for j in range(len(X)) if truth[j] == truth[i]]].mean(0)
        assert float((G[i] - own).norm()) < 1.0


def test_ari_ignores_excluded_clients():
    assert cluster_ari({0: 1, 1: 1, 2: 0, 3: 0, 4: 0}, [0, 0, 1, 1, 0], exclude=[4]) == 1.0
    assert cluster_ari({0: 0}, [0]) is None


ROBUST = "strategy=clustered strategy.mode=robust"


def _clustered_server(extra: str = "", mode: str = "robust"):
    overrides = f"{RELABEL} strategy=clustered strategy.mode={mode} strategy.num_clusters=2 {extra}"
    cfg = compose_config(overrides.strip())
    st = server(cfg)
    fed = load_federation(cfg, torch.device("cpu"))
    st.client_groups = [c.domain for c in fed.clients]
    st.group_names = list(fed.domain_names)
    return cfg, st


def _synthetic_replies(st, truth: list[int], scale: float = 1.0) -> list[TrainReply]:
    """One update per client: its true cluster's direction plus a little noise."""
    gen = torch.Generator().manual_seed(3)
    keys = list(st.global_state)
    directions = [{k: torch.randn(v.shape, generator=gen) for k, v in st.global_state.items()}
                  for _ in range(2)]
    replies = []
    for cid, c in enumerate(truth):
        st._trained_on[cid] = st.cluster_of(cid)
        arrays = {k: scale * directions[c][k] + 0.01 * torch.randn(st.global_state[k].shape, generator=gen)
                  for k in keys}
        replies.append(TrainReply(cid, arrays, 10, {}))
    return replies


def test_clustered_assigns_by_update_and_moves_each_centre_by_its_tc():
    _, st = _clustered_server()
    truth = st.client_groups
    replies = _synthetic_replies(st, truth)
    before = [dict(m) for m in st.models]
    st.aggregate_replies(1, replies)
    assert st.round_metrics(1)["cluster_ari"] == 1.0
    key = next(iter(st.global_state))
    for k in range(2):
        members = [r for r in replies if st.assignment[r.cid] == k]
        moved = st.models[k][key] - before[k][key]
        assert torch.allclose(moved, st.centres[k][key])
        mean = torch.stack([r.arrays[key] for r in members]).mean(0)
        assert float((moved - mean).norm()) < 0.1 * float(mean.norm())


def test_oracle_fixes_the_true_assignment():
    _, st = _clustered_server("strategy.oracle=true")
    replies = _synthetic_replies(st, [0, 1, 0, 1, 0, 1, 0, 1])  # updates that disagree with truth
    st.aggregate_replies(1, replies)
    assert [st.cluster_of(c) for c in range(8)] == st.client_groups
    assert st.round_metrics(1)["cluster_ari"] == 1.0


def test_checkpoint_restores_assignment_and_centres(tmp_path):
    cfg, st = _clustered_server()
    st.aggregate_replies(1, _synthetic_replies(st, st.client_groups))
    Engine(st).save_checkpoint(tmp_path / "c.npz", 1)
    again = server(cfg)
    assert Engine(again).load_checkpoint(tmp_path / "c.npz") == 1
    assert again.assignment == st.assignment and again.started
    for k in range(2):
        assert all(torch.equal(again.models[k][n], st.models[k][n]) for n in st.models[k])
        assert all(torch.equal(again.centres[k][n], st.centres[k][n]) for n in st.centres[k])


def test_clustered_client_uploads_its_update_and_scores_the_cluster_model():
    cfg = compose_config(f"{RELABEL} strategy=clustered strategy.num_clusters=2")
    method = client(cfg, 0)
    received = method.initial_state()
    result = method.train(received, {"server-round": 1})
    assert set(result.upload) == {k for k, v in received.items() if v.is_floating_point()}
    assert float(sum((v ** 2).sum() for v in result.upload.values())) > 0  # an update, not a model
    assert max(float(v.abs().max()) for v in result.upload.values()) < 5.0
    scores = method.evaluate(received, {"server-round": 1})
    assert 0.0 <= scores["accuracy"] <= 1.0 and "global_accuracy" not in scores


def test_clustered_client_uploads_its_worker_momentum_and_starts_afresh_when_told():
    cfg = compose_config(f"{RELABEL} {ROBUST} strategy.num_clusters=2")
    context = make_context(0)
    received = client(cfg, 0, context).initial_state()

    def upload(server_round: int, **config):
        method = client(cfg, 0, context, server_round)
        result = method.train(received, {"server-round": server_round, **config}).upload
        after = client(cfg, 0, context, server_round, after=True)
        return result, after.state.load("momentum"), after.state.scalars("momentum-steps")["steps"]

    first, m1, steps = upload(1)
    assert steps == 1 and all(torch.allclose(first[k], m1[k] / 0.1) for k in first)  # m_1 = 0.1 delta_1
    second, m2, steps = upload(2)
    assert steps == 2 and all(torch.allclose(second[k], m2[k] / (1 - 0.9 ** 2)) for k in second)
    delta2 = {k: (m2[k] - 0.9 * m1[k]) / 0.1 for k in m2}  # this round's update alone
    assert not all(torch.allclose(second[k], delta2[k], atol=1e-6) for k in second)
    fresh, m3, steps = upload(3, **{"reset-momentum": True})
    assert steps == 1 and all(torch.allclose(fresh[k], m3[k] / 0.1) for k in fresh)


def test_clustered_round_loop_under_gaussian_attack_finds_the_clusters():
    """8 relabel clients in 2 clusters, 2 of them Gaussian attackers: ARI 1 on the honest
    ones, no non-finite model, and the honest clients learn."""
    overrides = f"{RELABEL} {ROBUST} strategy.num_clusters=2 attack=gaussian attack.fraction=0.25"
    cfg, st = _clustered_server("attack=gaussian attack.fraction=0.25")
    rows = []
    run = Engine(st)
    run.start(FakeGrid(8, overrides), num_rounds=3, timeout=60, on_round=rows.append)
    last = rows[-1]
    assert last["cluster_ari"] == 1.0 and last["byzantine_clients"] == run.byzantine
    assert last["excluded_clients"] == run.byzantine and last["discarded_uploads"] > 0
    assert last["personalized_accuracy"]["mean"] > 0.5
    assert all(torch.isfinite(v).all() for m in st.models for v in m.values())


def test_ifca_bundles_all_k_models_and_the_client_picks_the_lowest_loss():
    cfg = tiny_cfg("strategy=ifca strategy.num_clusters=2")
    st = server(cfg)
    assert not all(torch.equal(st.models[0][k], st.models[1][k]) for k in st.models[0])
    sent = st.train_arrays(0, 1)
    assert is_bundle(sent) and len(sent) == 2 * len(st.models[0])
    assert all(torch.equal(a[k], b[k]) for a, b in zip(unbundle(sent), st.models, strict=True) for k in a)
    method = client(cfg, 0)
    trained = method.model("main", st.models[1])
    method.fit(trained, 1, epochs=3)
    good = {k: v.detach().clone() for k, v in trained.state_dict().items()}
    result = method.train(bundle([st.models[0], good]), {"server-round": 2})
    assert result.metrics["cluster"] == 1


def test_ifca_aggregates_per_chosen_cluster_and_rejects_a_bad_choice():
    st = server(tiny_cfg("strategy=ifca strategy.num_clusters=2"))
    key = next(k for k, v in st.models[0].items() if v.is_floating_point())
    ones = {k: torch.ones_like(v) if v.is_floating_point() else v for k, v in st.models[0].items()}
    replies = [TrainReply(0, ones, 10, {"cluster": 1}), TrainReply(1, ones, 10, {"cluster": 7})]
    before = st.models[0][key].clone()
    st.aggregate_replies(1, replies)
    assert torch.equal(st.models[1][key], torch.ones_like(before)) and torch.equal(st.models[0][key], before)
    assert st.stats.rejected_replies == 1 and st.assignment == {0: 1}


def test_ifca_sends_k_models_and_counts_their_bytes():
    overrides = f"{TINY} strategy=ifca"
    st = server(tiny_cfg("strategy=ifca"))
    rows = []
    Engine(st).start(FakeGrid(4, overrides), num_rounds=1, timeout=60, on_round=rows.append)
    model_bytes = sum(v.numel() * v.element_size() for v in st.models[0].values())
    assert rows[0]["bytes_down"] >= 4 * st.K * model_bytes  # every sampled client got K models


def test_per_client_variant_applies_its_own_aggregate():
    """Train uploads u_i and leaves x_i as it was; personalize sets x_i <- x_i(before) + g_i."""
    cfg = compose_config(f"{RELABEL} strategy=clustered_per_client")
    context = make_context(0)
    method = client(cfg, 0, context=context)
    before = method.initial_state()
    result = method.train({}, {"server-round": 1})
    assert set(result.upload) == {k for k, v in before.items() if v.is_floating_point()}
    g = {k: 0.5 * v for k, v in result.upload.items()}
    client(cfg, 0, context=context, after=True).personalize(g, {"server-round": 1})
    personal = client(cfg, 0, context=context, server_round=2).state.load("personal")
    assert all(torch.allclose(personal[k], before[k] + g[k]) for k in g)


def test_prfl_mnist_preset_is_the_papers_table_1_setup():
    cfg = compose_config("+experiment=prfl_mnist")
    assert cfg.strategy.name == "clustered" and cfg.strategy.num_clusters == 4
    assert cfg.partition.name == "relabel" and cfg.partition.num_clients == 300
    assert cfg.partition.num_clusters == 4
    assert cfg.model.name == "mlp" and cfg.model.hidden == 200
    # run.sh's relabel_fc_all: lr 0.1, batch 1000 (a client's whole split), 50 epochs, the
    # momentum 0.9 after TC (the workers' own SGD is plain), fc-grad-3-quantile0.2
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.num_rounds) == (0.1, 0.0, 1000, 50)
    assert cfg.strategy.mode == "paper" and cfg.strategy.tc_momentum == 0.9
    assert (cfg.strategy.tc_iterations, cfg.strategy.quantile) == (3, 0.2)
    assert cfg.attack.name == "none"
    attacked = compose_config("+experiment=prfl_mnist attack=gaussian")
    assert attacked.attack.name == "gaussian" and attacked.attack.fraction == 0.2


def test_typical_clients_stay_and_atypical_ones_move_to_the_nearest_centre():
    X, truth = separable(k=2, per=5, d=20)
    centres = {k: X[[i for i in range(10) if truth[i] == k]].mean(0) for k in range(2)}
    flags = typical(X, truth, centres, 2.0)
    assert all(flags)  # every row is typical of its own cluster
    wrong = [1 - t for t in truth[:1]] + truth[1:]  # row 0 claims to have trained cluster 1
    assert typical(X, wrong, centres, 2.0)[0] is False
    _, st = _clustered_server()
    st.assign(X, list(range(10)), wrong, centres, first=False)
    assert [st.assignment[i] for i in range(10)] == truth  # row 0 moved home, the rest stayed
