"""task.algorithms.lowrank: the proximal operators, the conv reshape, the factorised transport, FedDyn."""

from __future__ import annotations

import pytest
import torch

from task.algorithms.lowrank import (
    decode_transport,
    dual_update,
    encode_transport,
    factors_are_smaller,
    feddyn_aggregate,
    feddyn_correction,
    from_matrix,
    full_rank,
    rebuild,
    soft_threshold,
    sparsity,
    svt,
    svt_factors,
    to_matrix,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- soft thresholding = prox of tau ||.||_1 ----------------------------------------------
def test_soft_threshold_satisfies_the_l1_prox_optimality_condition():
    x = torch.randn(500, generator=_gen(), dtype=torch.float64)
    tau = 0.3
    y = soft_threshold(x, tau)
    # 0 in y - x + tau d|y|: x - y = tau sign(y) where y != 0, |x| <= tau where y == 0.
    nz = y != 0
    assert torch.allclose((x - y)[nz], tau * torch.sign(y[nz]))
    assert bool((x[~nz].abs() <= tau).all())
    assert 0 < int((~nz).sum()) < len(x)  # both cases occur


def test_soft_threshold_minimises_the_prox_objective_against_perturbations():
    x = torch.randn(40, generator=_gen(1), dtype=torch.float64)
    tau = 0.5

    def objective(z):
        return 0.5 * ((z - x) ** 2).sum() + tau * z.abs().sum()

    best = objective(soft_threshold(x, tau))
    gen = _gen(2)
    for _ in range(200):
        other = soft_threshold(x, tau) + 1e-2 * torch.randn(40, generator=gen, dtype=torch.float64)
        assert objective(other) >= best
    assert torch.equal(soft_threshold(torch.tensor([2.0, -2.0, 0.1]), 1.0), torch.tensor([1.0, -1.0, 0.0]))


# --- SVT = prox of tau ||.||_* --------------------------------------------------------------
def _nuclear_objective(z, m, tau):
    return 0.5 * ((z - m) ** 2).sum() + tau * torch.linalg.svdvals(z).sum()


def test_svt_shrinks_every_singular_value_by_tau():
    m = torch.randn(12, 7, generator=_gen(3), dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    tau = float(s[2] + s[3]) / 2  # keeps exactly the three largest
    x = svt(m, tau)
    got = torch.linalg.svdvals(x)
    assert torch.allclose(got[:3], s[:3] - tau, atol=1e-10)
    assert torch.allclose(got[3:], torch.zeros(4, dtype=torch.float64), atol=1e-10)
    assert int(torch.linalg.matrix_rank(x)) == 3


def test_svt_is_the_minimiser_of_the_nuclear_norm_prox_objective():
    m = torch.randn(8, 6, generator=_gen(4), dtype=torch.float64)
    tau = 1.0
    x = svt(m, tau)
    best = _nuclear_objective(x, m, tau)
    gen = _gen(5)
    for _ in range(300):
        other = x + 1e-2 * torch.randn(8, 6, generator=gen, dtype=torch.float64)
        assert _nuclear_objective(other, m, tau) >= best - 1e-12
    # Optimality: M - X = tau (U_r V_r^T + W) with U_r^T W = 0, W V_r = 0, ||W||_2 <= 1.
    u, s, vh = torch.linalg.svd(x)
    r = int((s > 1e-9).sum())
    w = (m - x) / tau - u[:, :r] @ vh[:r]
    assert torch.allclose(u[:, :r].T @ w, torch.zeros(r, 6, dtype=torch.float64), atol=1e-9)
    assert torch.allclose(w @ vh[:r].T, torch.zeros(8, r, dtype=torch.float64), atol=1e-9)
    assert float(torch.linalg.matrix_norm(w, ord=2)) <= 1 + 1e-9


def test_svt_factors_give_the_thresholded_matrix_and_its_rank():
    m = torch.randn(10, 30, generator=_gen(6))
    s = torch.linalg.svdvals(m)
    tau = float(s[3] + s[4]) / 2
    a, b = svt_factors(m, tau)
    assert a.shape == (10, 4) and b.shape == (4, 30)
    assert torch.allclose(rebuild(a, b), svt(m, tau), atol=1e-5)
    zero_a, zero_b = svt_factors(m, float(s[0]) + 1.0)  # everything thresholded away
    assert zero_a.shape == (10, 0) and torch.equal(rebuild(zero_a, zero_b), torch.zeros(10, 30))


# --- conv reshape ----------------------------------------------------------------------------
def test_conv_reshape_swaps_in_and_kernel_rows_and_round_trips():
    w = torch.randn(5, 3, 2, 4, generator=_gen(7))
    m = to_matrix(w)
    assert m.shape == (5 * 2, 3 * 4)
    for o, c, i, j in [(0, 0, 0, 0), (4, 2, 1, 3), (2, 1, 0, 2)]:
        assert m[o * 2 + i, c * 4 + j] == w[o, c, i, j]
    assert torch.equal(from_matrix(m, w.shape), w)
    lin = torch.randn(6, 9, generator=_gen(8))
    assert torch.equal(to_matrix(lin), lin) and torch.equal(from_matrix(lin, lin.shape), lin)
    assert full_rank(w.shape) == 10 and full_rank((64, 3, 3, 3)) == 9 and full_rank((6, 9)) == 6


# --- factorised transport ------------------------------------------------------------------
def _thresholded(state, tau):
    factors, out = {}, {}
    for k, v in state.items():
        if v.dim() >= 2:
            factors[k] = svt_factors(to_matrix(v), tau)
            out[k] = rebuild(*factors[k], v.shape)
        else:
            out[k] = v
    return out, factors


def test_transport_rebuilds_the_thresholded_weights_exactly_and_factorises_only_where_smaller():
    gen = _gen(9)
    low = (torch.randn(64, 2, generator=gen) @ torch.randn(2, 48, generator=gen))  # rank 2
    conv = torch.randn(16, 8, 3, 3, generator=gen)                                 # full rank 24
    state = {"fc.weight": low, "fc.bias": torch.randn(64, generator=gen), "conv.weight": conv}
    thresholded, factors = _thresholded(state, 1e-3)
    sent = encode_transport(thresholded, factors)
    # fc: 2 * (64 + 48) < 64 * 48 -> factors; conv: 16 * (48 + 24) > 48 * 24 -> dense.
    assert set(sent) == {"fc.weight@U", "fc.weight@V", "fc.bias", "conv.weight"}
    assert sent["fc.weight@U"].shape == (64, 2) and sent["fc.weight@V"].shape == (2, 48)
    assert factors_are_smaller(*factors["fc.weight"], low)
    assert not factors_are_smaller(*factors["conv.weight"], conv)
    got = decode_transport(sent, {k: v.shape for k, v in state.items()})
    assert set(got) == set(state)
    for key in state:
        assert torch.equal(got[key], thresholded[key]), key
    assert torch.allclose(got["fc.weight"], low, atol=1e-4)


def test_a_low_rank_conv_travels_as_factors_and_comes_back_in_conv_shape():
    gen = _gen(10)
    conv = from_matrix(torch.randn(32 * 3, 1, generator=gen) @ torch.randn(1, 16 * 3, generator=gen),
                       (32, 16, 3, 3))
    thresholded, factors = _thresholded({"c": conv}, 1e-4)
    sent = encode_transport(thresholded, factors)
    assert sent["c@U"].shape == (96, 1) and sent["c@V"].shape == (1, 48)
    got = decode_transport(sent, {"c": conv.shape})["c"]
    assert got.shape == conv.shape and torch.equal(got, thresholded["c"])


def test_decode_refuses_a_factor_without_its_partner():
    with pytest.raises(KeyError):
        decode_transport({"w@U": torch.ones(3, 1)}, {"w": torch.Size([3, 2])})
    with pytest.raises(KeyError):
        decode_transport({"w@V": torch.ones(1, 2)}, {"w": torch.Size([3, 2])})


# --- FedDyn -----------------------------------------------------------------------------------
def test_feddyn_correction_and_aggregate_match_their_formula_on_toy_tensors():
    w_s = {"a": torch.tensor([1.0, 2.0]), "buf": torch.tensor([0.0])}
    uploads = [{"a": torch.tensor([2.0, 2.0]), "buf": torch.tensor([1.0])},
               {"a": torch.tensor([0.0, 5.0]), "buf": torch.tensor([3.0])}]
    h = {"a": torch.tensor([0.5, -0.5])}
    alpha, n = 0.1, 10
    # h - alpha/N sum (w_i - w_s) = [0.5, -0.5] - 0.01 * ([1, 0] + [-1, 3]) = [0.5, -0.53]
    new_h = feddyn_correction(h, uploads, w_s, alpha, n)
    assert set(new_h) == {"a"}
    assert torch.allclose(new_h["a"], torch.tensor([0.5, -0.53]))
    mean = {"a": torch.tensor([1.0, 3.5]), "buf": torch.tensor([2.0])}
    agg = feddyn_aggregate(mean, new_h, alpha)
    assert torch.allclose(agg["a"], torch.tensor([1.0 - 5.0, 3.5 + 5.3]))
    assert torch.equal(agg["buf"], mean["buf"])  # no dual: plain mean


def test_h_is_the_mean_of_the_clients_duals():
    """h = (1/N) sum_i mu_i when every mu_i follows mu_i += alpha (w_s - w_i) (all start at 0)."""
    gen = _gen(11)
    n, alpha = 5, 0.1
    mus = [{"a": torch.zeros(3, dtype=torch.float64)} for _ in range(n)]
    h = {"a": torch.zeros(3, dtype=torch.float64)}
    w_s = {"a": torch.zeros(3, dtype=torch.float64)}
    for sampled in ([0, 1], [1, 3, 4], [2]):
        uploads = {i: {"a": torch.randn(3, generator=gen, dtype=torch.float64)} for i in sampled}
        for i in sampled:
            mus[i] = dual_update(mus[i], w_s, uploads[i], alpha)
        h = feddyn_correction(h, list(uploads.values()), w_s, alpha, n)
        w_s = {"a": torch.randn(3, generator=gen, dtype=torch.float64)}
    assert torch.allclose(h["a"], sum(m["a"] for m in mus) / n)


def test_sparsity_counts_exact_zeros():
    assert sparsity([torch.tensor([0.0, 1.0]), torch.zeros(2, 1)]) == 0.75
    assert sparsity([torch.tensor([1e-30])]) == 0.0
