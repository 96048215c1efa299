"""Small, numpy-only statistics for comparing models: ranks, rank correlations, bootstrap intervals.

Used by the judge (confidence intervals over items, agreement between passes) and the report
(how well the judge's scores track test loss). Undefined results (a constant input, fewer
than two values) are ``nan``, never a made-up number.
"""

from __future__ import annotations

import numpy as np


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank (scipy's ``rankdata(method="average")``)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def _paired(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long float arrays, or a ValueError naming the statistic."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"{name}: {len(x)} values against {len(y)}")
    return x, y


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: the Pearson correlation of the ranks (ties averaged)."""
    x, y = _paired(x, y, "spearman")
    if len(x) < 2:
        return float("nan")
    rx, ry = rankdata(x) - (len(x) + 1) / 2, rankdata(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx ** 2).sum() * (ry ** 2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def kendall_tau_b(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b, which corrects for ties (what scipy's ``kendalltau`` returns)."""
    x, y = _paired(x, y, "kendall")
    if len(x) < 2:
        return float("nan")
    i, j = np.triu_indices(len(x), k=1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    concordance = (dx * dy).sum()
    untied_x, untied_y = (dx != 0).sum(), (dy != 0).sum()
    if untied_x == 0 or untied_y == 0:
        return float("nan")
    return float(concordance / np.sqrt(untied_x * untied_y))


def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """``samples`` resamples (with replacement) of ``range(n)``, shape (samples, n), seeded."""
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates (nans ignored)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean_ci(per_item: np.ndarray, samples: int, seed: int, level: float = 0.95) -> list[tuple[float, float]]:
    """Percentile interval of each column's mean when items (rows) are resampled.

    ``per_item`` is (items, models) with nan where an item has no score for a model. All
    columns share the same resamples (a paired bootstrap), so the intervals of models judged
    on the same items are comparable.
    """
    per_item = np.asarray(per_item, dtype=float)
    if per_item.ndim != 2 or per_item.shape[0] == 0:
        return [(float("nan"), float("nan"))] * (per_item.shape[1] if per_item.ndim == 2 else 0)
    index = bootstrap_indices(per_item.shape[0], samples, seed)
    # One column at a time keeps memory at (samples, items).
    return [percentile_interval(resampled_means(column, index), level) for column in per_item.T]


def resampled_means(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The mean of ``scores[index[s]]`` for each resample ``s`` (nans left out): shape (samples,),
    nan where a resample drew only items without a score."""
    resampled = np.asarray(scores, dtype=float)[index]
    counts = (~np.isnan(resampled)).sum(axis=1)
    sums = np.nansum(resampled, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` as a JSON-ready float rounded to ``digits``; None for None and nan (no score, no mean)."""
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else round(value, digits)
