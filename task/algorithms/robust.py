"""Robust aggregators over client uploads, as pure functions of flat vectors.

Every aggregator takes the uploads as the rows of a matrix ``X`` (n x d) and returns an
``Aggregate``: the aggregated vector and ``discarded``, how many uploads it left out or
clipped. Where an aggregator works per coordinate, ``discarded`` is the number of values cut
per coordinate. Which are Flower's own and which are written here:

- ``mean``: sum_j p_j x_j, p_j = n_j / sum n (sample-weighted); here, and
  ``task.core.params.weighted_mean`` in the base, exactly as before aggregators existed;
- ``median``: coordinate-wise median; Flower's ``flwr.server.strategy.aggregate.aggregate_median``;
- ``trimmed_mean``: coordinate-wise mean without the ``beta`` fraction of largest and of
  smallest values; Flower's ``aggregate_trimmed_avg``;
- ``krum``: the upload with the least sum of squared distances to its n - f - 2 nearest;
  Flower's ``aggregate_krum`` (``to_keep=0``);
- ``multi_krum``: sample-weighted mean of the ``m`` uploads of lowest Krum score; Flower's
  ``aggregate_krum`` (``to_keep=m``);
- ``bulyan``: Krum selects n - 2f uploads one by one, then per coordinate the mean of the
  n - 4f values nearest their median; Flower's ``aggregate_bulyan``;
- ``centered_clipping``: v <- v + mean_j clip_tau(x_j - v), ``iterations`` times, from the
  previous aggregate; here (Karimireddy, He, Jaggi, ICML 2021);
- ``threshold_clustering``: TC, v <- mean_j (x_j if ||x_j - v|| <= tau else v),
  ``iterations`` times; here (Werner et al., TMLR 2023).

Threshold clustering (TC) as in the authors' code (liehe/PRFL, ``STC``): the distances
d_j = ||x_j - v|| are sorted and tau = 0.99 * d_(k) with k = floor(n * quantile) (0-based),
so at most k uploads are kept; every other upload is replaced by v itself, which bounds the
pull of any single vector by tau / n. Here k is at least 1 (with fewer than 1 / quantile
uploads the authors' rule would keep none and v could never move).

Krum-type rules need f, the number of Byzantine uploads they tolerate; it is given as a
fraction of the uploads (``f = floor(fraction * n)``); Bulyan lowers f to floor((n - 3) / 4)
where n < 4f + 3 (Flower refuses such an f).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.server.strategy.aggregate import (
    aggregate_bulyan,
    aggregate_krum,
    aggregate_median,
    aggregate_trimmed_avg,
)

AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "centered_clipping",
               "threshold_clustering")
# Aggregators that start from the previous aggregate (the others do not depend on it).
FROM_PREVIOUS = ("centered_clipping", "threshold_clustering")
TC_SHRINK = 0.99  # tau = 0.99 x the quantile distance, as the authors' code


@dataclass
class Aggregate:
    """An aggregated vector and how many uploads were discarded or clipped to get it."""

    value: torch.Tensor
    discarded: int = 0
    kept: torch.Tensor | None = None  # TC: which rows its last iteration kept (None elsewhere)


def _results(X: torch.Tensor, weights: Sequence[float] | None) -> list[tuple[list[np.ndarray], int]]:
    """The uploads in Flower's ``(NDArrays, num_examples)`` form (one flat array each)."""
    rows = X.detach().cpu().numpy()
    counts = [1] * len(rows) if weights is None else [int(w) for w in weights]
    return [([row], n) for row, n in zip(rows, counts, strict=True)]


def _tensor(arrays: list[np.ndarray], like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(arrays[0]), dtype=like.dtype, device=like.device)


def byzantine_count(n: int, fraction: float) -> int:
    """f = floor(fraction * n): how many Byzantine uploads a Krum-type rule tolerates."""
    return int(np.floor(fraction * n + 1e-9))


def mean(X: torch.Tensor, weights: Sequence[float] | None = None) -> Aggregate:
    """sum_j p_j x_j with p_j proportional to ``weights`` (uniform if None)."""
    w = torch.ones(len(X), dtype=torch.float64) if weights is None else torch.tensor(
        weights, dtype=torch.float64)
    p = (w / w.sum()).to(X.device)
    return Aggregate((X.to(torch.float64) * p[:, None]).sum(0).to(X.dtype), 0)


def median(X: torch.Tensor) -> Aggregate:
    """Coordinate-wise median (Flower's ``aggregate_median``); per coordinate all but the
    middle one or two values are cut."""
    value = _tensor(aggregate_median(_results(X, None)), X)
    return Aggregate(value, len(X) - (1 if len(X) % 2 else 2))


def trimmed_mean(X: torch.Tensor, beta: float) -> Aggregate:
    """Coordinate-wise mean without the floor(beta n) largest and smallest values (Flower's
    ``aggregate_trimmed_avg``, beta < 0.5)."""
    value = _tensor(aggregate_trimmed_avg(_results(X, None), beta), X)
    return Aggregate(value, 2 * int(beta * len(X)))


def krum(X: torch.Tensor, fraction: float) -> Aggregate:
    """The one upload Krum selects (Flower's ``aggregate_krum``); the other n - 1 are discarded."""
    f = byzantine_count(len(X), fraction)
    value = _tensor(aggregate_krum(_results(X, None), num_malicious=f, to_keep=0), X)
    return Aggregate(value, len(X) - 1)


def multi_krum(X: torch.Tensor, weights: Sequence[float] | None, fraction: float,
               m: int | None = None) -> Aggregate:
    """Sample-weighted mean of the m uploads of lowest Krum score (m = n - f if None)."""
    f = byzantine_count(len(X), fraction)
    keep = max(1, min(len(X), len(X) - f if m is None else int(m)))
    value = _tensor(aggregate_krum(_results(X, weights), num_malicious=f, to_keep=keep), X)
    return Aggregate(value, len(X) - keep)


def bulyan(X: torch.Tensor, fraction: float) -> Aggregate:
    """Bulyan over Krum (Flower's ``aggregate_bulyan``); f lowered to floor((n-3)/4) if needed.
    Per coordinate n - beta values are cut (beta = n - 4f)."""
    n = len(X)
    f = min(byzantine_count(n, fraction), max(0, (n - 3) // 4))
    if n < 3:
        return median(X)
    value = _tensor(aggregate_bulyan(_results(X, None), num_malicious=f, aggregation_rule=aggregate_krum,
                                     to_keep=0), X)
    return Aggregate(value, 4 * f)


def centered_clipping(X: torch.Tensor, center: torch.Tensor, tau: float, iterations: int = 1) -> Aggregate:
    """v <- v + (1/n) sum_j clip_tau(x_j - v), v starting at ``center`` (the previous aggregate).

    clip_tau(z) = z * min(1, tau / ||z||): one upload moves v by at most tau / n per iteration.
    ``discarded`` counts the uploads clipped in the last iteration.
    """
    v = center.to(X.dtype).clone()
    clipped = 0
    for _ in range(iterations):
        diff = X - v
        norms = diff.norm(dim=1)
        scale = torch.clamp(tau / norms.clamp_min(1e-12), max=1.0)
        clipped = int((norms > tau).sum())
        v = v + (diff * scale[:, None]).mean(0)
    return Aggregate(v, clipped)


def collapse_near_duplicates(X: torch.Tensor, tolerance: float) -> tuple[torch.Tensor, int]:
    """One row (their mean) for every group of rows closer than ``tolerance`` x the median
    nearest-neighbour distance to the group's first row; returns the rows and how many were
    merged.

    Colluding clients that send one vector (ALIE, IPM) then count as one upload, not as a
    block that fills a quantile-based radius (FoolsGold's observation, Fung et al. 2020,
    that sybils' updates are too alike). Honest uploads differ by their SGD noise, far more
    than the tolerance, and stay separate (the nearest-neighbour distance is the scale of that
    noise even where clusters are far apart); ``tolerance=0`` merges exact copies only.
    """
    groups = near_duplicate_groups(X, tolerance)
    if len(groups) == len(X):
        return X, 0
    return torch.stack([X[g].mean(0) for g in groups]), len(X) - len(groups)


def near_duplicate_groups(X: torch.Tensor, tolerance: float) -> list[list[int]]:
    """The row groups ``collapse_near_duplicates`` merges (each group's first row is the one
    the others are within the limit of); every row alone where there are fewer than 3."""
    if len(X) < 3:
        return [[i] for i in range(len(X))]
    D = torch.cdist(X.to(torch.float64), X.to(torch.float64))
    nearest = (D + torch.diag(torch.full((len(X),), float("inf")))).min(dim=1).values
    limit = tolerance * float(nearest.median())
    groups: list[list[int]] = []
    for i in range(len(X)):
        home = next((g for g in groups if float(D[g[0], i]) <= limit), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    return groups


def tc_radius(distances: torch.Tensor, quantile: float) -> float:
    """tau = 0.99 * d_(k), k = max(1, floor(n * quantile)) (0-based; capped at n - 1)."""
    ordered = torch.sort(distances).values
    k = min(len(ordered) - 1, max(1, int(len(ordered) * quantile)))
    return TC_SHRINK * float(ordered[k])


def threshold_clustering(X: torch.Tensor, start: torch.Tensor, quantile: float | None,
                         iterations: int, tau: float | None = None) -> Aggregate:
    """TC(v0 = start, {x_j}, tau, R): v <- (1/n) sum_j (x_j if ||x_j - v|| <= tau else v).

    tau is recomputed every iteration from the distances (``tc_radius``) unless given as a
    fixed value (``tau=``; ``float('inf')`` gives the plain mean). ``discarded`` counts the
    uploads replaced by v in the last iteration.
    """
    v = start.to(X.dtype).clone()
    keep = torch.ones(len(X), dtype=torch.bool)
    for _ in range(iterations):
        d = (X - v).norm(dim=1)
        radius = tc_radius(d, float(quantile)) if tau is None else tau
        keep = d <= radius
        v = torch.where(keep[:, None], X, v).mean(0)
    return Aggregate(v, int((~keep).sum()), keep)


def aggregate_vectors(name: str, X: torch.Tensor, weights: Sequence[float], params: dict,
                      center: torch.Tensor | None = None) -> Aggregate:
    """Dispatch on the aggregator's ``name`` with its config ``params``.

    ``center`` is the previous aggregate (centered clipping's centre, TC's start); where there
    is none, the coordinate-wise median of ``X`` starts them.
    """
    if name == "mean":
        return mean(X, weights)
    if name == "median":
        return median(X)
    if name == "trimmed_mean":
        return trimmed_mean(X, float(params["beta"]))
    if name == "krum":
        return krum(X, float(params["byzantine_fraction"]))
    if name == "multi_krum":
        return multi_krum(X, weights, float(params["byzantine_fraction"]), params.get("m"))
    if name == "bulyan":
        return bulyan(X, float(params["byzantine_fraction"]))
    start = median(X).value if center is None else center
    if name == "centered_clipping":
        return centered_clipping(X, start, float(params["tau"]), int(params["iterations"]))
    if name == "threshold_clustering":
        return threshold_clustering(X, start, float(params["quantile"]), int(params["iterations"]))
    raise ValueError(f"unknown aggregator {name!r}; valid: {list(AGGREGATORS)}")


# --- state dicts ------------------------------------------------------------------------
def flatten(state: dict[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    """The floating entries ``keys`` of a state dict as one float32 vector."""
    return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in keys])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor],
              keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """``flatten``'s inverse: entries shaped and typed as ``like``'s."""
    out, start = {}, 0
    for k in keys:
        n = like[k].numel()
        out[k] = vector[start:start + n].reshape(like[k].shape).to(like[k].dtype)
        start += n
    return out


def aggregate_states(name: str, states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                     params: dict, center: dict[str, torch.Tensor] | None = None
                     ) -> tuple[dict[str, torch.Tensor], int]:
    """An aggregator over state dicts: the aggregate and the discarded/clipped count.

    ``mean`` is exactly ``task.core.params.weighted_mean`` (the p-weighted mean of every method so
    far); the others run on the floating entries flattened into one vector per upload, and
    integer entries (BatchNorm's ``num_batches_tracked``) take the maximum as in the mean.
    ``center`` (the previous aggregate, same keys) is where centered clipping and TC start.
    """
    from task.core.params import weighted_mean

    if name == "mean":
        return weighted_mean(states, weights), 0
    first = states[0]
    keys = [k for k, v in first.items() if v.is_floating_point()]
    X = torch.stack([flatten(s, keys) for s in states])
    start = None if center is None else flatten(center, keys).to(X.device)
    result = aggregate_vectors(name, X, weights, params, start)
    out = unflatten(result.value, first, keys)
    for k, v in first.items():
        if not v.is_floating_point():
            out[k] = torch.stack([s[k] for s in states]).max(0).values
    return {k: out[k] for k in first}, result.discarded
