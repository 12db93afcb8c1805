"""clustered's paper mode, the papers' oracle, the discarded count and each defence switch."""

from __future__ import annotations

import pytest
import torch

from strategies.clustered import MODES, setting
from strategies.clustered_per_client import random_groups, tc_momentum
from strategies.ifca import bundle
from task.algorithms import clustering, robust
from task.core.messages import TrainReply
from task.core.training import evaluate
from task.data.load import load_federation
from task.run.config import compose_config

from .helpers import client, make_context, server

RELABEL = ("dataset=mnist5k partition=relabel partition.num_clients=8 partition.num_clusters=2 "
           "model=mlp model.hidden=32 lr=0.01")


def make_server(extra: str):
    cfg = compose_config(f"{RELABEL} strategy=clustered strategy.num_clusters=2 {extra}")
    st = server(cfg)
    st.client_groups = [c.domain for c in load_federation(cfg, torch.device("cpu")).clients]
    return st


def directions(st, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=gen) for k, v in st.models[0].items()} for _ in range(count)]


def scaled_round(st, server_round: int, scalars: list[float], dirs) -> list[TrainReply]:
    """Client i's update: scalars[its rank in its true cluster] x its cluster's direction."""
    replies, rank = [], {0: 0, 1: 0}
    for cid, c in enumerate(st.client_groups):
        st.train_arrays(cid, server_round)
        s = scalars[rank[c]]
        rank[c] += 1
        replies.append(TrainReply(cid, {k: s * v for k, v in dirs[c].items()}, 10, {}))
    return replies


def test_paper_mode_is_tc_on_the_clusters_raw_updates_then_momentum_by_hand():
    """q 0.5, R 1, the true clusters fixed (oracle=tc), updates s x d_c. Round 1 starts at the
    median 1.15: distances .15 .05 .05 7.85, tau .99 x .15, 1.1 and 1.2 kept: v1 = 1.15.
    Round 2 from 1.15: distances .85 .95 1.05 10.15, tau .99 x 1.05, 2.0 and 2.1 kept:
    v2 = (2.0 + 2.1 + 1.15 + 1.15) / 4 = 1.6; m2 = .9 x 1.15 + 1.6; x = x0 + (1.15 + m2) d."""
    st = make_server("strategy.mode=paper strategy.oracle=tc strategy.quantile=0.5 strategy.tc_iterations=1")
    assert st.client_groups.count(0) == 4
    x0 = {k: v.clone() for k, v in st.models[0].items()}
    dirs = directions(st, 2)
    st.aggregate_replies(1, scaled_round(st, 1, [1.0, 1.1, 1.2, 9.0], dirs))
    assert st.stats.discarded == 4  # 1.0 and 9.0 replaced, in each cluster
    st.stats.discarded = 0
    st.aggregate_replies(2, scaled_round(st, 2, [2.0, 2.1, 2.2, -9.0], dirs))
    assert st.stats.discarded == 4
    for k in range(2):
        expected = 1.15 + (0.9 * 1.15 + 1.6)
        for key in x0:
            assert torch.allclose(st.models[k][key], x0[key] + expected * dirs[k][key], atol=1e-4)
        assert all(torch.allclose(st.centres[k][key], 1.6 * dirs[k][key], atol=1e-4) for key in x0)


def test_oracle_true_is_per_cluster_fedavg_without_momentum():
    st = make_server("strategy.oracle=true")
    x0 = {k: v.clone() for k, v in st.models[0].items()}
    gen = torch.Generator().manual_seed(1)
    replies = []
    for cid in range(8):
        st.train_arrays(cid, 1)
        replies.append(TrainReply(cid, {k: torch.randn(v.shape, generator=gen) for k, v in x0.items()},
                                  10 + 5 * cid, {}))
    st.aggregate_replies(1, replies)
    for k in range(2):
        members = [r for r in replies if st.client_groups[r.cid] == k]
        total = sum(r.num_examples for r in members)
        for key in x0:
            mean = sum(r.num_examples * r.arrays[key] for r in members) / total
            assert torch.allclose(st.models[k][key], x0[key] + mean, atol=1e-5)
    assert st.stats.discarded == 0 and st.round_metrics(1)["cluster_ari"] == 1.0
    assert setting(st.cfg.strategy, "worker_momentum") == 0.0 == setting(st.cfg.strategy, "tc_momentum")


def test_robust_discarded_counts_each_upload_once_and_not_the_other_clusters():
    """tc_over=all: each centre's TC runs over all 8 uploads and replaces the other cluster's
    4; those are not discarded. 3 exact copies in cluster 0 merge once, not once per centre."""
    st = make_server("strategy.mode=robust")
    dirs = directions(st, 2)
    gen = torch.Generator().manual_seed(2)
    replies = scaled_round(st, 1, [1.0, 1.0, 1.0, 1.0], dirs)
    for r in replies[3:]:
        r.arrays.update({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in r.arrays.items()})
    st.aggregate_replies(1, replies)
    copies = sum(1 for r in replies[:3]
                 if all(torch.equal(r.arrays[k], replies[0].arrays[k]) for k in dirs[0]))
    assert copies >= 2  # clients 0..2 include copies of one vector
    assert 1 <= st.stats.discarded <= len(replies)


@pytest.mark.parametrize("key", sorted(MODES["paper"]))
def test_each_defence_follows_the_mode_unless_set(key):
    for mode in ("paper", "robust"):
        cfg = compose_config(f"strategy=clustered strategy.mode={mode}")
        assert setting(cfg.strategy, key) == MODES[mode][key]
    other = {"worker_momentum": 0.5, "tc_momentum": 0.5, "seeding": "dense", "merge_duplicates": True,
             "tc_over": "all", "stay_radius": 3.0}[key]
    cfg = compose_config(f"strategy=clustered strategy.mode=paper strategy.{key}={other}")
    assert setting(cfg.strategy, key) == other


def test_merge_switch_and_seeding_switch():
    st = make_server("strategy.mode=robust strategy.merge_duplicates=false")
    X = torch.cat([torch.ones(3, 5), torch.randn(5, 5)])
    rows, groups = st.merged_pool(X)
    assert torch.equal(rows, X) and len(groups) == 8
    on = make_server("strategy.mode=robust")
    rows, groups = on.merged_pool(X)
    assert len(rows) == 6 and groups[0] == [0, 1, 2]
    paper = make_server("strategy.mode=paper")
    labels, starts = paper.initial_grouping(X, 1)
    seeds = clustering.random_seeds(8, 2, int(paper.cfg.seed) * 7919 + 1)
    assert all(torch.equal(starts[k], X[i]) for k, i in enumerate(seeds))
    assert labels == clustering.nearest_centre(X, X[seeds])
    dense = make_server("strategy.mode=paper strategy.seeding=dense")
    assert dense.initial_grouping(X, 1)[0] == clustering.initial_clusters(X, 2, 0.2, None)[0]


def test_stay_radius_zero_moves_everyone_to_the_nearest_centre():
    """Row 0 trained cluster 0 and is typical of it but a little nearer centre 1: with the
    stay radius it stays, with 0 (paper) it moves."""
    centres = {0: torch.zeros(4), 1: torch.tensor([2.0, 0, 0, 0])}
    X = torch.tensor([[1.1, 0, 0, 0], [0.0, 1, 0, 0], [0.0, -1, 0, 0], [2.0, 1, 0, 0], [2.0, -1, 0, 0]])
    trained = [0, 0, 0, 1, 1]
    for radius, expected in ((2.0, 0), (0.0, 1)):
        st = make_server(f"strategy.mode=robust strategy.stay_radius={radius}")
        st.assign(X, list(range(5)), trained, centres, first=False)
        assert st.assignment[0] == expected and [st.assignment[i] for i in range(1, 5)] == [0, 0, 1, 1]


def test_paper_client_uploads_its_raw_update_without_state():
    cfg = compose_config(f"{RELABEL} strategy=clustered strategy.mode=paper strategy.num_clusters=2")
    context = make_context(0)
    method = client(cfg, 0, context)
    received = method.initial_state()
    upload = method.train(received, {"server-round": 1, "reset-momentum": True}).upload
    assert client(cfg, 0, context, after=True).state.load("momentum") is None
    again = client(cfg, 0, make_context(0)).train(received, {"server-round": 1}).upload
    assert all(torch.equal(upload[k], again[k]) for k in upload)  # the round's update alone


def test_never_replied_client_is_scored_on_the_model_of_lowest_training_loss():
    st = make_server("strategy.mode=paper")
    assert "k0/" in next(iter(st.eval_arrays(5)))  # not assigned yet: all K models
    cfg = st.cfg
    method = client(cfg, 0)
    good = method.model("main", st.models[0])
    method.fit(good, 1, epochs=3)
    trained = {k: v.detach().clone() for k, v in good.state_dict().items()}
    scores = method.evaluate(bundle([st.models[1], trained]), {"server-round": 1})
    direct = method.report(method.model("main", trained))
    assert scores == direct
    losses = [evaluate(method.model("main", m), method.data.x_train, method.data.y_train)[0]
              for m in (st.models[1], trained)]
    assert losses[1] < losses[0]


def test_per_client_paper_mode_applies_momentum_after_tc():
    for mode, beta in (("paper", 0.9), ("robust", 0.0)):
        cfg = compose_config(f"{RELABEL} strategy=clustered_per_client strategy.mode={mode}")
        assert tc_momentum(cfg.strategy) == beta
        context = make_context(0)
        before = client(cfg, 0, context).initial_state()
        client(cfg, 0, context).train({}, {"server-round": 1})
        g1 = {k: torch.full_like(v, 0.1) for k, v in before.items() if v.is_floating_point()}
        g2 = {k: torch.full_like(v, -0.3) for k, v in g1.items()}
        client(cfg, 0, context, after=True).personalize(g1, {"server-round": 1})
        client(cfg, 0, context, server_round=2, after=True).personalize(g2, {"server-round": 2})
        personal = client(cfg, 0, context, server_round=3).state.load("personal")
        step = 0.1 + (beta * 0.1 - 0.3)
        assert all(torch.allclose(personal[k], before[k] + step) for k in g1)


def test_random_groups_split_the_round_like_the_authors():
    split = random_groups(10, 3, seed=4)
    assert sorted(i for g in split for i in g) == list(range(10)) and [len(g) for g in split] == [4, 4, 2]
    assert random_groups(10, None, seed=4) == [list(range(10))]


def test_tc_reports_which_rows_it_kept():
    X = torch.tensor([[0.0], [0.1], [0.2], [5.0]])
    result = robust.threshold_clustering(X, torch.tensor([0.1]), 0.5, 1)
    assert result.kept.tolist() == [False, True, False, False] and result.discarded == 3  # tau .99 x .1


def test_prfl_mnist_fc_preset_is_the_authors_fc_row():
    cfg = compose_config("+experiment=prfl_mnist_fc")
    assert cfg.strategy.name == "clustered_per_client" and cfg.strategy.groups == 15
    assert (cfg.strategy.tc_iterations, cfg.strategy.quantile, cfg.strategy.tc_momentum) == (3, 0.2, 0.9)
    assert (cfg.lr, cfg.momentum, cfg.batch_size, cfg.num_rounds) == (0.1, 0.0, 1000, 50)
