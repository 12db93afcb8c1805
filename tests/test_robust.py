"""Robust aggregators (task/algorithms/robust.py): breakdown properties on synthetic vectors, and their
use by every strategy's averaging (strategies/base.py)."""

from __future__ import annotations

import pytest
import torch

from task.algorithms import robust
from task.core.messages import TrainReply
from task.core.params import weighted_mean
from task.engine.rounds import Engine

from .helpers import server, tiny_cfg


def honest_and_byzantine(n_honest: int = 8, n_bad: int = 2, d: int = 50, seed: int = 0):
    """Honest rows around 1.0 (spread 0.1), Byzantine rows at 1e6."""
    gen = torch.Generator().manual_seed(seed)
    honest = 1.0 + 0.1 * torch.randn(n_honest, d, generator=gen)
    bad = torch.full((n_bad, d), 1e6)
    return honest, torch.cat([honest, bad])


def test_mean_is_the_sample_weighted_mean():
    X = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    out = robust.mean(X, [1, 3])
    assert torch.allclose(out.value, torch.tensor([0.75, 1.5])) and out.discarded == 0


def test_tc_with_infinite_tau_is_the_mean():
    honest, X = honest_and_byzantine()
    out = robust.threshold_clustering(X, torch.zeros(X.shape[1]), None, 1, tau=float("inf"))
    assert torch.allclose(out.value, X.mean(0)) and out.discarded == 0


def test_tc_replaces_a_far_outlier_by_the_centre():
    honest, X = honest_and_byzantine(n_bad=1)
    out = robust.threshold_clustering(X, robust.median(X).value, 0.2, 10)
    assert out.discarded >= 1
    assert (out.value - honest.mean(0)).norm() < 0.5  # the 1e6 row left no trace


def test_tc_radius_is_0_99_of_the_quantile_distance_and_keeps_at_least_one():
    d = torch.tensor([5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    assert robust.tc_radius(d, 0.2) == pytest.approx(0.99 * 3.0)  # sorted[floor(10 * 0.2)]
    assert robust.tc_radius(torch.tensor([1.0, 2.0]), 0.2) == pytest.approx(0.99 * 2.0)


@pytest.mark.parametrize("bad_value", [1e9, -1e9, 3.0, 0.0])
def test_tc_moves_a_bounded_distance_whatever_one_byzantine_vector_is(bad_value):
    """One TC step with radius tau: a single vector changes the output by at most 2 tau / n."""
    honest, _ = honest_and_byzantine(n_bad=0)
    start = honest.mean(0)
    tau = 1.0
    reference = robust.threshold_clustering(torch.cat([honest, start[None]]), start, None, 1, tau=tau)
    bad = torch.full((1, honest.shape[1]), bad_value)
    attacked = robust.threshold_clustering(torch.cat([honest, bad]), start, None, 1, tau=tau)
    assert float((attacked.value - reference.value).norm()) <= 2 * tau / (len(honest) + 1) + 1e-6


@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_coordinate_wise_rules_ignore_a_minority_of_huge_vectors(name):
    honest, X = honest_and_byzantine()
    out = robust.aggregate_vectors(name, X, [1] * len(X), {"beta": 0.2})
    assert float(out.value.max()) < 2.0 and float(out.value.min()) > 0.0
    assert out.discarded == (len(X) - 2 if name == "median" else 2 * int(0.2 * len(X)))


def test_krum_picks_an_honest_upload():
    honest, X = honest_and_byzantine()
    out = robust.krum(X, 0.2)
    assert any(torch.equal(out.value, row) for row in honest) and out.discarded == len(X) - 1


def test_multi_krum_averages_honest_uploads_only():
    honest, X = honest_and_byzantine()
    out = robust.multi_krum(X, [1] * len(X), 0.2)
    assert out.discarded == 2 and float(out.value.max()) < 2.0


def test_bulyan_stays_in_the_honest_range():
    honest, X = honest_and_byzantine(n_honest=9, n_bad=2)
    out = robust.bulyan(X, 0.2)
    assert float(out.value.max()) < 2.0 and out.discarded == 8


def test_centered_clipping_bounds_the_step():
    honest, X = honest_and_byzantine()
    center = torch.zeros(X.shape[1])
    out = robust.centered_clipping(X, center, tau=0.5, iterations=3)
    assert float((out.value - center).norm()) <= 3 * 0.5 + 1e-5
    assert out.discarded == len(X)  # every upload is farther than 0.5 from the centre


def _states(n: int = 5):
    gen = torch.Generator().manual_seed(1)
    return [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen),
             "count": torch.tensor(i, dtype=torch.int64)} for i in range(n)]


def test_aggregate_states_mean_is_exactly_weighted_mean():
    states = _states()
    merged, discarded = robust.aggregate_states("mean", states, [1, 2, 3, 4, 5], {})
    expected = weighted_mean(states, [1, 2, 3, 4, 5])
    assert discarded == 0 and all(torch.equal(merged[k], expected[k]) for k in expected)


def test_aggregate_states_keeps_shapes_dtypes_and_takes_the_max_counter():
    states = _states()
    merged, _ = robust.aggregate_states("median", states, [1] * 5, {})
    assert merged["w"].shape == (3, 4) and merged["count"].dtype == torch.int64
    assert int(merged["count"]) == 4
    assert torch.allclose(merged["w"], torch.stack([s["w"] for s in states]).median(0).values)


def test_fedavg_aggregates_through_the_configured_aggregator():
    """FedAvg with aggregator=median: the coordinate median, and the discarded count is kept."""
    st = server(tiny_cfg("strategy=fedavg aggregator=median"))
    keys = list(st.global_state)[:2]
    uploads = [{k: torch.full_like(st.global_state[k], v) for k in keys} for v in (0.0, 1.0, 1e6)]
    st.aggregate_replies(1, [TrainReply(i, u, 10, {}) for i, u in enumerate(uploads)])
    assert all(torch.allclose(st.global_state[k], torch.ones_like(st.global_state[k])) for k in keys)
    assert st.stats.discarded == 2


def test_default_aggregator_is_the_weighted_mean():
    st = server(tiny_cfg("strategy=fedavg"))
    assert st.cfg.aggregator.name == "mean"
    keys = list(st.global_state)[:1]
    uploads = [{k: torch.full_like(st.global_state[k], v) for k in keys} for v in (0.0, 1.0)]
    st.aggregate_replies(1, [TrainReply(0, uploads[0], 10, {}), TrainReply(1, uploads[1], 30, {})])
    assert torch.equal(st.global_state[keys[0]], weighted_mean(uploads, [10, 30])[keys[0]])


def test_collapse_merges_colluding_copies_and_keeps_noisy_honest_rows_apart():
    honest, _ = honest_and_byzantine(n_bad=0)
    copies = torch.full((8, honest.shape[1]), 0.5)
    rows, merged = robust.collapse_near_duplicates(torch.cat([honest, copies]), 0.1)
    assert merged == 7 and len(rows) == len(honest) + 1
    assert torch.equal(rows[: len(honest)], honest) and torch.allclose(rows[-1], copies[0])
    rows, merged = robust.collapse_near_duplicates(honest, 0.1)
    assert merged == 0 and torch.equal(rows, honest)


def test_tc_over_collapsed_rows_is_not_captured_by_a_block_of_copies():
    """8 honest rows and 8 identical rows nearer the start than any honest one: TC over the
    raw rows stays at the copies' side; over the collapsed rows the honest mean wins."""
    honest, _ = honest_and_byzantine(n_bad=0)
    start = honest.mean(0) + 0.3
    copies = (start + 0.05).expand(8, -1)
    X = torch.cat([honest, copies])
    raw = robust.threshold_clustering(X, start, 0.5, 10).value
    rows, _ = robust.collapse_near_duplicates(X, 0.1)
    collapsed = robust.threshold_clustering(rows, start, 0.5, 10).value
    to_honest = lambda v: float((v - honest.mean(0)).norm())  # noqa: E731
    assert to_honest(collapsed) < 0.5 * to_honest(raw)


def test_centered_clipping_starts_from_the_previous_aggregate_update(tmp_path):
    """Every client moves w_g by the same u, ||u|| = 1.5 tau. Round 1 starts at w_g (no earlier
    aggregate): the step is clipped to tau. Round 2 starts at w_g + that step (Karimireddy et
    al.'s momentum), so u - step (0.5 tau) is inside the radius: the step is u itself. Centred
    at w_g, i.e. at a zero update, every round would shrink u to tau."""
    st = server(tiny_cfg("strategy=fedavg aggregator=centered_clipping aggregator.tau=1.0"))
    keys = [k for k, v in st.global_state.items() if v.is_floating_point()]
    direction = {k: torch.ones_like(st.global_state[k]) for k in keys}
    norm = float(torch.cat([d.reshape(-1) for d in direction.values()]).norm())
    u = {k: 1.5 * d / norm for k, d in direction.items()}

    def round_step(server_round: int) -> dict:
        before = {k: v.clone() for k, v in st.global_state.items()}
        uploads = [{**before, **{k: before[k] + u[k] for k in keys}} for _ in range(3)]
        st.aggregate_replies(server_round, [TrainReply(i, s, 10, {}) for i, s in enumerate(uploads)])
        return {k: st.global_state[k] - before[k] for k in keys}

    first = round_step(1)
    assert all(torch.allclose(first[k], u[k] / 1.5, atol=1e-6) for k in keys)  # clipped to tau
    assert st.stats.discarded == 3
    again = server(tiny_cfg("strategy=fedavg aggregator=centered_clipping aggregator.tau=1.0"))
    Engine(st).save_checkpoint(tmp_path / "c.npz", 1)
    Engine(again).load_checkpoint(tmp_path / "c.npz")
    second = round_step(2)
    assert all(torch.allclose(second[k], u[k], atol=1e-5) for k in keys)  # from the last step
    assert again.aggregate_steps["global"].keys() == set(keys)
    assert all(torch.allclose(again.aggregate_steps["global"][k], first[k]) for k in keys)
