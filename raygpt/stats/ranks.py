"""Rank correlations, from scipy.stats, with raygpt's convention for undefined results.

scipy computes them (``spearmanr``, ``kendalltau``'s tau-b, ``rankdata`` with ties averaged);
this module only makes "undefined" (fewer than two values, a constant input) a quiet ``nan``
instead of a warning, and ranks many bootstrap replicates at once (``spearman_columns``):
``spearmanr`` on two 2-D inputs builds the full correlation matrix of every column against
every other, which for thousands of replicates is millions of numbers not needed.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def _correlation(statistic, x, y, name: str) -> float:
    """``statistic(x, y).statistic`` of two equally long inputs (else a ValueError naming the
    statistic); nan, without a warning, with fewer than two values or a constant input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} values against {len(y)}")
    if len(x) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(statistic(x, y).statistic)


def spearman(x, y) -> float:
    """Spearman's rho (``scipy.stats.spearmanr``); nan with fewer than two values or a constant input."""
    return _correlation(stats.spearmanr, x, y, "spearman")


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b, which corrects for ties (``scipy.stats.kendalltau``); nan where undefined."""
    return _correlation(stats.kendalltau, x, y, "kendall")


def spearman_columns(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each column of ``x`` with the same column of ``y`` (both (n, columns),
    no nan): the Pearson correlation of the ranks (``scipy.stats.rankdata``, ties averaged).
    nan for a column where either side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"spearman_columns: (n, columns) arrays of one shape needed, got {x.shape} and {y.shape}")
    rx = stats.rankdata(x, axis=0) - (x.shape[0] + 1) / 2
    ry = stats.rankdata(y, axis=0) - (y.shape[0] + 1) / 2
    denominator = np.sqrt((rx ** 2).sum(axis=0) * (ry ** 2).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(axis=0) / denominator, np.nan)
