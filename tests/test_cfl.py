"""CFL: the bipartition against brute force, the paper's split criteria on constructed updates,
a split of the two domains of the tiny federation at the round the criteria first hold, and a
resume that continues the same cluster tree."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from task.algorithms.bipartition import bipartition, cosine_similarities, cross_similarity
from task.core.messages import TrainReply
from task.data.load import load_federation

from .fake_grid import FakeGrid
from .helpers import TINY, engine, server, tiny_cfg


def _brute_force(alpha: np.ndarray) -> float:
    """min over all bipartitions of the max cross-similarity."""
    n, best = len(alpha), np.inf
    for r in range(1, n // 2 + 1):
        for c1 in itertools.combinations(range(n), r):
            c2 = [i for i in range(n) if i not in c1]
            best = min(best, cross_similarity(alpha, list(c1), c2))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_single_linkage_is_the_optimal_bipartition(seed):
    X = torch.randn(7, 5, generator=torch.Generator().manual_seed(seed))
    alpha = cosine_similarities(X)
    c1, c2 = bipartition(alpha, "single")
    assert sorted(c1 + c2) == list(range(7)) and c1 and c2 and 0 in c1
    assert cross_similarity(alpha, c1, c2) == pytest.approx(_brute_force(alpha))


def test_complete_linkage_separates_two_clear_groups():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(20, generator=gen)
    X = torch.stack([u + 0.1 * torch.randn(20, generator=gen) for _ in range(3)]
                    + [-u + 0.1 * torch.randn(20, generator=gen) for _ in range(4)])
    assert bipartition(cosine_similarities(X), "complete") == ([0, 1, 2], [3, 4, 5, 6])


# --- the criteria, on constructed updates ------------------------------------------------
def _replies(st, deltas: dict[int, float], direction: dict[int, torch.Tensor]) -> list[TrainReply]:
    """Client c uploads theta_c + deltas[c] * direction[c] (the same on every parameter entry)."""
    out = []
    for cid, scale in deltas.items():
        model = st.train_arrays(cid, 1)
        arrays = {k: v + scale * direction[cid].to(v).expand_as(v) if v.is_floating_point() else v
                  for k, v in model.items()}
        out.append(TrainReply(cid, arrays, 10, {}))
    return out


def _cfl(extra: str = ""):
    return server(tiny_cfg(f"strategy=cfl model=mlp model.hidden=16 {extra}"))


OPPOSED = {0: torch.tensor(1.0), 1: torch.tensor(1.0), 2: torch.tensor(-1.0), 3: torch.tensor(-1.0)}


def test_a_stationary_cluster_with_a_large_update_splits_into_the_opposed_groups():
    st = _cfl("strategy.eps1=0.1 strategy.eps2=1.0")
    start = {k: v.clone() for k, v in st.global_state.items()}
    st.aggregate_replies(1, _replies(st, {0: 0.01, 1: 0.03, 2: 0.01, 3: 0.03}, OPPOSED))
    assert [c.members for c in st.clusters] == [[0, 1], [2, 3]]
    (split,) = st.splits
    assert split["round"] == 1 and split["parent"] == 0 and split["children"] == [1, 2]
    assert split["mean_norm"] < 0.1 < 1.0 < split["max_norm"] and split["alpha_cross"] == pytest.approx(-1)
    # Each half's model is theta_c plus the mean of its own members' updates.
    for cluster, sign in zip(st.clusters, (1.0, -1.0), strict=True):
        k = next(k for k, v in start.items() if v.is_floating_point())
        assert torch.allclose(cluster.model[k], start[k] + sign * 0.02, atol=1e-6)
    assert st.round_metrics(1)["cfl_splits"] == [split] and st.round_metrics(1)["cfl_num_clusters"] == 2


@pytest.mark.parametrize("extra,deltas", [
    ("strategy.eps1=0.1 strategy.eps2=1e6", {0: 0.01, 1: 0.03, 2: 0.01, 3: 0.03}),  # no large update
    ("strategy.eps1=0.1 strategy.eps2=1.0", {0: 0.01, 1: 0.03, 2: 0.01, 3: 0.01}),  # mean not small
    ("strategy.eps1=0.1 strategy.eps2=1.0 strategy.warmup_rounds=1", {0: 0.01, 1: 0.03, 2: 0.01, 3: 0.03}),
    ("strategy.eps1=0.1 strategy.eps2=1.0 strategy.min_split_size=5", {0: 0.01, 1: 0.03, 2: 0.01, 3: 0.03}),
    ("strategy.eps1=0.1 strategy.eps2=1.0", {0: 0.01, 1: 0.01, 2: 0.02}),           # 3 did not reply
])
def test_no_split_unless_every_criterion_holds(extra, deltas):
    st = _cfl(extra)
    st.aggregate_replies(1, _replies(st, deltas, OPPOSED))
    assert [c.members for c in st.clusters] == [[0, 1, 2, 3]] and not st.splits
    assert st.round_metrics(1)["cfl_norms"]["0"][1] > 1.0  # every case has a large update


def test_gamma_max_keeps_a_split_of_similar_updates_from_happening():
    # Two groups u +- v / sqrt(3), |u| = |v|: alpha_cross = 0.5, sqrt((1 - 0.5) / 2) = 0.5.
    d = {0: torch.tensor(1.0), 1: torch.tensor(1.0), 2: torch.tensor(-1.0), 3: torch.tensor(-1.0)}
    for gamma, splits in ((0.4, True), (0.6, False)):
        st = _cfl(f"strategy.eps1=1e6 strategy.eps2=0 strategy.gamma_max={gamma}")
        n = sum(v.numel() for k, v in st.global_state.items() if v.is_floating_point())
        u, v = torch.zeros(n), torch.zeros(n)
        u[: n // 2], v[n // 2:] = 1.0, 1.0
        rows = {c: u + float(d[c]) * v / np.sqrt(3) for c in d}
        replies = []
        for cid, row in rows.items():
            model, offset, arrays = st.train_arrays(cid, 1), 0, {}
            for k, t in model.items():
                if t.is_floating_point():
                    arrays[k] = t + row[offset:offset + t.numel()].reshape(t.shape).to(t)
                    offset += t.numel()
                else:
                    arrays[k] = t
            replies.append(TrainReply(cid, arrays, 10, {}))
        st.aggregate_replies(1, replies)
        assert (len(st.clusters) == 2) == splits, gamma


# --- the round loop on the tiny federation (plain and inverted digits) ---------------------
CRITERIA = "strategy=cfl strategy.eps1=0.65 strategy.eps2=0.9 strategy.min_split_size=3"


def test_the_two_domains_split_at_the_first_round_the_criteria_hold():
    cfg = tiny_cfg(CRITERIA)
    run = engine(cfg)
    domains = [c.domain for c in load_federation(cfg, torch.device("cpu")).clients]
    run.method.client_groups = domains
    rows: list[dict] = []
    run.start(FakeGrid(4, f"{TINY} {CRITERIA}"), num_rounds=3, timeout=60, on_round=rows.append)
    root = [(r["round"], r["cfl_norms"]["0"]) for r in rows if "0" in r["cfl_norms"]]
    first_due = next(rnd for rnd, (mean, top) in root if mean < 0.65 and top > 0.9)
    assert [r["round"] for r in rows if r["cfl_splits"]] == [first_due]  # once, when first due
    assert rows[-1]["cfl_clusters"] == [[0, 1], [2, 3]] and domains == [0, 0, 1, 1]
    assert rows[-1]["cluster_ari"] == 1.0 and rows[-1]["global_accuracy"] is None
    assert 0.3 < rows[-1]["personalized_accuracy"]["mean"] <= 1  # chance: 0.1
    # Each cluster's model is what its clients are sent, and the two now differ.
    a, b = (run.method.train_arrays(c, 4) for c in (0, 2))
    assert run.method.train_arrays(1, 4) is a and any(not torch.equal(a[k], b[k]) for k in a)


def test_killed_then_resumed_run_continues_the_same_cluster_tree(tmp_path):
    from .test_reliability import _KilledError, _server_run

    # eps1 huge, eps2 0: the root splits in round 1; the halves (2 clients) are too small to split.
    base = (f"{TINY} strategy=cfl strategy.eps1=1e9 strategy.eps2=0 strategy.min_split_size=3 num_rounds=3 "
            "model=mlp")
    full = f"{base} output_dir={tmp_path / 'full'}"
    _server_run(full, FakeGrid(4, full))
    part = f"{base} output_dir={tmp_path / 'part'}"
    with pytest.raises(_KilledError):
        _server_run(part, FakeGrid(4, part), kill_after=2)  # round 1's checkpoint holds the split
    resumed = f"{part} resume={tmp_path / 'part'}"
    _server_run(resumed, FakeGrid(4, resumed))

    def rows(d):
        return [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("full"), rows("part")
    assert [r["round"] for r in b] == [1, 2, 3] and a[0]["cfl_splits"] and not a[1]["cfl_splits"]
    for ra, rb in zip(a, b, strict=True):
        assert ra["cfl_clusters"] == rb["cfl_clusters"] and ra["cfl_norms"] == rb["cfl_norms"]
        assert ra["per_client_accuracy"] == rb["per_client_accuracy"]
