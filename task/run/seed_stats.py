"""Summaries over seeds: the mean, the sample standard deviation (ddof=1) and the n they are over.

A paper's "mean ± std over n seeds" is the sample standard deviation; numpy's ``np.std``
defaults to the population one (ddof=0), smaller by sqrt((n-1)/n) (0.82 for 3 seeds). With
one seed there is no spread to estimate: the std is None and tables print the mean alone.
"""

from __future__ import annotations

import numpy as np


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std, n) of the values that are not None; (None, None, 0) if none are."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None, 0
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std, len(present)


def band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of a seeds x points array: the mean and the sample std (zeros for one seed)."""
    mean = curves.mean(0)
    std = curves.std(0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
    return mean, std


def format_mean_std(mean: float | None, std: float | None, digits: int = 4) -> str:
    """``mean ± std``, the mean alone for one seed, ``—`` for none."""
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"
