"""CFL's geometry (Sattler, Müller, Samek 2020): update norms, cosine similarities, bipartition.

For the updates Delta_i (rows of X) of one cluster c, weights p_i:

    mean norm      ||sum_i p_i Delta_i||                      (near 0: a stationary point of c's FL)
    max norm       max_i ||Delta_i||                          (large: some client is not stationary)
    alpha_ij       <Delta_i, Delta_j> / (||Delta_i|| ||Delta_j||)
    bipartition    c1, c2 = argmin_{c1 u c2 = c} max_{i in c1, j in c2} alpha_ij
    alpha_cross    max_{i in c1, j in c2} alpha_ij;   the split is kept where
                   gamma_max < sqrt((1 - alpha_cross) / 2)

The paper's Algorithm 1 solves the bipartition exactly: merge the clusters of the most similar
pair first, until two remain (``linkage="single"``: single linkage on 1 - alpha, whose last
cut is the bipartition of least maximal cross-similarity). The authors' notebook uses
scikit-learn's complete linkage instead (``linkage="complete"``: scipy's, the same merges).
"""

from __future__ import annotations

import math

import numpy as np
import torch

LINKAGES = ("single", "complete")


def update_norms(X: torch.Tensor, weights: list[float]) -> tuple[float, float]:
    """(||sum_i p_i X_i||, max_i ||X_i||) in float64, p_i = weights_i / sum(weights)."""
    X = X.double()
    p = torch.tensor(weights, dtype=torch.float64) / float(sum(weights))
    return float((p[:, None] * X).sum(0).norm()), float(X.norm(dim=1).max())


def cosine_similarities(X: torch.Tensor) -> np.ndarray:
    """alpha_ij over the rows of X (a zero row has similarity 0 with every row)."""
    X = X.double()
    unit = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (unit @ unit.T).clamp(-1.0, 1.0).numpy()


def _single_linkage(alpha: np.ndarray) -> list[int]:
    """The paper's Algorithm 1: merge the pair of highest similarity first, until two clusters."""
    n = len(alpha)
    label = list(range(n))
    pairs = sorted(((alpha[i, j], i, j) for i in range(n) for j in range(i + 1, n)),
                   key=lambda t: (-t[0], t[1], t[2]))
    clusters = n
    for _, i, j in pairs:
        if clusters == 2:
            break
        a, b = label[i], label[j]
        if a != b:
            label = [a if x == b else x for x in label]
            clusters -= 1
    return label


def _complete_linkage(alpha: np.ndarray) -> list[int]:
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    distance = np.clip(1.0 - alpha, 0.0, None)
    np.fill_diagonal(distance, 0.0)
    tree = linkage(squareform(distance, checks=False), method="complete")
    return [int(v) for v in fcluster(tree, 2, criterion="maxclust")]


def bipartition(alpha: np.ndarray, linkage: str = "single") -> tuple[list[int], list[int]]:
    """Row indices of c1 and c2 (c1 holds row 0); ``alpha`` needs at least 2 rows."""
    if len(alpha) < 2:
        raise ValueError("a bipartition needs at least 2 updates")
    if linkage not in LINKAGES:
        raise ValueError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    label = _single_linkage(alpha) if linkage == "single" else _complete_linkage(alpha)
    c1 = [i for i, v in enumerate(label) if v == label[0]]
    return c1, [i for i, v in enumerate(label) if v != label[0]]


def cross_similarity(alpha: np.ndarray, c1: list[int], c2: list[int]) -> float:
    """alpha_cross = max_{i in c1, j in c2} alpha_ij."""
    return float(alpha[np.ix_(c1, c2)].max())


def separation_holds(alpha_cross: float, gamma_max: float) -> bool:
    """The paper's check that the split separates the clusters: gamma_max < sqrt((1 - a) / 2)."""
    return gamma_max < math.sqrt(max(0.0, 1.0 - alpha_cross) / 2.0)
