"""Clustering steps of federated clustering (strategies/clustered*.py), as pure functions.

The paper's own steps (Werner et al., TMLR 2023): ``nearest_centre`` (assignment),
``momentum_after_tc`` (the heavy-ball step on a TC aggregate), ``random_seeds`` (the worker
updates as initial centres, the authors' ``init="lazy"``), ``tc_groups`` (per-client TC).

pflower's defences, not the paper's (each switched by a ``strategy.*`` key, see
strategies/clustered.py): ``main_body`` / ``seed_centres`` / ``initial_clusters`` (density-
filtered farthest-first seeding refined by Lloyd's iterations with coordinate medians),
``robust.near_duplicate_groups`` (near-duplicate merging), ``typical`` (the stay radius), and
``components`` (the per-client form's grouping for its ARI).
"""

from __future__ import annotations

import torch

from . import robust


def pairwise_distances(X: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j|| for the rows of X, in float64."""
    X = X.to(torch.float64)
    return torch.cdist(X, X)


def nearest_centre(X: torch.Tensor, centres: torch.Tensor) -> list[int]:
    """For each row of X, the index of the nearest row of ``centres``."""
    return torch.cdist(X.to(torch.float64), centres.to(torch.float64)).argmin(dim=1).tolist()


def momentum_after_tc(previous: torch.Tensor | None, estimate: torch.Tensor, beta: float) -> torch.Tensor:
    """m <- beta m + v (m = v the first time, as torch's SGD buffer): the authors apply
    momentum to the TC estimate, after clustering; the model then moves by m."""
    return estimate.clone() if previous is None else beta * previous + estimate


def random_seeds(n: int, k: int, seed: int) -> list[int]:
    """K distinct row indices drawn by ``seed``: the round's worker updates as the K initial
    centres (the paper's lazy initialisation), without any filtering."""
    gen = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=gen)[:min(n, k)].tolist())


def main_body(X: torch.Tensor, k: int) -> list[int]:
    """Rows within twice the median distance to the coordinate-wise median: the bulk of the
    population. A group of like uploads far from it (sign- or bit-flipped updates, Gaussian
    noise) is left out, as long as it is a minority. Every row where that leaves at most k."""
    centre = robust.median(X).value.to(torch.float64)
    d = (X.to(torch.float64) - centre).norm(dim=1)
    body = [i for i in range(len(X)) if d[i] <= 2 * d.median()]
    return body if len(body) > k else list(range(len(X)))


def seed_centres(X: torch.Tensor, k: int, quantile: float, body: list[int] | None = None) -> list[int]:
    """Row indices of K seed updates: farthest-first over the dense rows of the main body.

    A row is dense where its distance to its m-th nearest other row, m = max(1, floor(n q / 2)),
    is at most the median of that distance over the body: a lone outlier, or a group of
    fewer than m + 1 like uploads, is not (half the q-share of the population that TC assumes
    of a cluster, so that an honest cluster that lost some clients to Byzantine ones stays dense).
    The traversal starts at the dense row farthest from the coordinate-wise median. ``body``:
    ``main_body(X, k)`` where the caller has it already.
    """
    n = len(X)
    if n <= k:
        return list(range(n))
    body = main_body(X, k) if body is None else body
    D = pairwise_distances(X)
    m = min(len(body) - 1, max(1, int(n * quantile / 2)))
    radius = torch.sort(D[body][:, body], dim=1).values[:, m]  # column 0 is the row itself
    dense = [i for i, r in zip(body, radius, strict=True) if r <= radius.median()]
    centre = robust.median(X).value.to(torch.float64)
    from_median = (X.to(torch.float64) - centre).norm(dim=1)
    seeds = [max(dense, key=lambda i: float(from_median[i]))]
    while len(seeds) < k:
        nearest = D[:, seeds].min(dim=1).values
        candidates = [i for i in dense if i not in seeds] or [i for i in body if i not in seeds]
        seeds.append(max(candidates, key=lambda i: float(nearest[i])))
    return seeds


def initial_clusters(X: torch.Tensor, k: int, quantile: float, tolerance: float | None = 0.0,
                     iterations: int = 20) -> tuple[list[int], torch.Tensor]:
    """Round-1 grouping: K seeds (``seed_centres``), refined by Lloyd's iterations over the main
    body with coordinate-wise medians as centres (a seed is an extreme row of its group, so
    nearest-seed groups cut clusters; the medians move to the groups' middles). Both run on the
    rows with near-duplicates merged (``tolerance``, as in TC; None: not merged): a block of
    colluding copies would otherwise be half of the group it joins and drag that group's median
    onto itself. Returns every row's nearest centre and the K centres (fewer where there are at
    most K)."""
    rows = X if tolerance is None else robust.collapse_near_duplicates(X, tolerance)[0]
    body = main_body(rows, k)
    centres = rows[seed_centres(rows, k, quantile, body)].clone()
    for _ in range(iterations):
        labels = nearest_centre(rows[body], centres)
        groups = [[i for i, lab in zip(body, labels, strict=True) if lab == j] for j in range(len(centres))]
        moved = torch.stack([robust.median(rows[g]).value if g else centres[j] for j, g in enumerate(groups)])
        if torch.equal(moved, centres):
            break
        centres = moved
    return nearest_centre(X, centres), centres


def typical(X: torch.Tensor, trained: list[int], centres: dict[int, torch.Tensor],
            radius: float) -> list[bool]:
    """Whether each row is within ``radius`` times the median distance of its cluster's rows
    (the rows that ``trained`` the same cluster) to that cluster's centre."""
    d = torch.stack([(X[i] - centres[k]).norm() for i, k in enumerate(trained)])
    spread = {k: float(d[[i for i, t in enumerate(trained) if t == k]].median()) for k in set(trained)}
    return [float(d[i]) <= radius * spread[k] for i, k in enumerate(trained)]


def tc_groups(X: torch.Tensor, quantile: float, iterations: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Per-client TC: row i's aggregate TC(x_i, X) and, for each i, the rows kept in its last
    iteration (tau from the distances to the current v, as robust.threshold_clustering)."""
    out, kept = [], []
    for i in range(len(X)):
        v = X[i].clone()
        keep = torch.ones(len(X), dtype=torch.bool)
        for _ in range(iterations):
            d = (X - v).norm(dim=1)
            keep = d <= robust.tc_radius(d, quantile)
            v = torch.where(keep[:, None], X, v).mean(0)
        out.append(v)
        order = torch.argsort((X - X[i]).norm(dim=1)).tolist()  # nearest first: itself, then the next
        kept.append([j for j in order if bool(keep[j]) and j != i])
    return torch.stack(out), kept


def components(kept: list[list[int]]) -> list[int]:
    """Connected components of the graph with an edge i -- j where each kept the other in its
    TC, plus i -- its nearest kept update (``kept[i]`` is ordered nearest first). One-sided
    edges for every kept update, late in training when updates are mostly noise, chain every
    cluster into one component. Returns component ids."""
    sets = [set(js) for js in kept]
    parent = list(range(len(kept)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, js in enumerate(kept):
        for j in js:
            if i in sets[j] or j == js[0]:  # mutual, or i's first kept (its nearest) other
                parent[root(i)] = root(j)
    return [root(i) for i in range(len(kept))]
