"""Small, numpy-only statistics for comparing models: ranks, rank correlations, bootstrap intervals.

Used by the judge (confidence intervals over items, agreement between passes, which models
can be told apart, position and length effects) and the report (how well the judge's scores
track test loss, whether a difference survives fine-tuning noise). Undefined results (a
constant input, fewer than two values) are ``nan`` in arrays and ``None`` in the JSON-ready
dicts and dataclasses, never a made-up number. A failed judgement is ``nan`` in the score
arrays and is left out, never averaged in as a zero.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

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


def bootstrap_indices(n: int, samples: int, seed: int | Sequence[int]) -> np.ndarray:
    """``samples`` resamples (with replacement) of ``range(n)``, shape (samples, n), seeded.

    ``seed`` may be a sequence (``[seed, k]``) to draw independent streams from one seed.
    """
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


def _finite(value) -> float | None:
    """A float for JSON, ``None`` where the value is undefined (nan, inf or None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _interval(low, high) -> list[float | None]:
    return [_finite(low), _finite(high)]


def holm_adjust(pvalues: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of ``pvalues`` for testing them all at once.

    The k-th smallest of m p-values is multiplied by (m - k + 1), then a running maximum makes
    the adjusted values monotone in the raw ones, capped at 1. It controls the family-wise
    error rate (any false "different" among all pairs) under any dependence between the tests,
    and is never less powerful than Bonferroni. nan entries (tests that could not be made) stay
    nan and do not count in m.
    """
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="mergesort")]
    m = len(order)
    running = 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (m - k) * p[index]))
        adjusted[index] = running
    return adjusted


@dataclass
class PairedDifference:
    """The mean score difference ``a - b`` over the items both models have a score for."""

    a: str | int
    b: str | int
    mean: float | None
    ci: list[float | None]
    """Paired bootstrap interval of the mean difference at ``level``."""
    p_value: float | None
    """Two-sided bootstrap p-value of "no difference", before adjustment."""
    p_holm: float | None
    """Holm-adjusted across all pairs of the comparison."""
    different: bool
    """``p_holm < 1 - level``: the two models can be told apart."""
    items: int
    """Items with a score for both models."""


def paired_differences(per_item: np.ndarray, samples: int, seed: int, level: float = 0.95,
                       names: Sequence[str] | None = None) -> list[PairedDifference]:
    """Every pair of models (columns ``i < j`` of ``per_item``, (items, models), nan where an
    item has no score): the mean of ``score_i - score_j`` over the items both have, its paired
    bootstrap interval and a Holm-adjusted p-value.

    Paired: each resample draws item indices once and uses them for every model (and every
    pair), so the variation of item difficulty, which both models share, cancels in the
    difference instead of swamping it. The p-value is two-sided from the same resamples,
    ``2 * min(share of differences <= 0, share >= 0)`` with the +1 correction of
    ``(count + 1) / (samples + 1)``: the smallest error level at which the percentile interval
    would leave out 0. Its resolution is ``2 / (samples + 1)``, so with m pairs Holm needs
    ``samples >= 2 * m / (1 - level)`` for the closest pair to be able to come out different.
    ``a``/``b`` are ``names[i]``/``names[j]`` if given, else the column indices.
    """
    per_item = np.asarray(per_item, dtype=float)
    if per_item.ndim != 2:
        raise ValueError(f"paired_differences: per_item must be (items, models), got shape {per_item.shape}")
    n_items, n_models = per_item.shape
    labels = list(names) if names is not None else list(range(n_models))
    if len(labels) != n_models:
        raise ValueError(f"paired_differences: {len(labels)} names for {n_models} models")
    index = bootstrap_indices(n_items, samples, seed) if n_items else np.zeros((samples, 0), dtype=int)
    rows = []
    for i, j in itertools.combinations(range(n_models), 2):
        difference = per_item[:, i] - per_item[:, j]
        both = int((~np.isnan(difference)).sum())
        mean = float(np.nanmean(difference)) if both else math.nan
        low = high = p_value = math.nan
        if both >= 2:
            replicates = resampled_means(difference, index)
            replicates = replicates[~np.isnan(replicates)]
            low, high = percentile_interval(replicates, level)
            count = len(replicates)
            below, above = (replicates <= 0).sum(), (replicates >= 0).sum()
            p_value = min(1.0, 2 * min((below + 1) / (count + 1), (above + 1) / (count + 1)))
        rows.append((labels[i], labels[j], mean, low, high, p_value, both))
    adjusted = holm_adjust([row[5] for row in rows])
    return [PairedDifference(a, b, _finite(mean), _interval(low, high), _finite(p), _finite(p_holm),
                             bool(p_holm < 1 - level), both)
            for (a, b, mean, low, high, p, both), p_holm in zip(rows, adjusted)]


def _letters(count: int) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    if count > len(alphabet):
        raise ValueError(f"compact_letter_display: {count} letters needed, at most {len(alphabet)} exist")
    return list(alphabet[:count])


def compact_letter_display(order: Sequence[Hashable], not_different: Iterable[tuple[Hashable, Hashable]]) -> dict:
    """Letters for a ranking: two models share a letter if and only if they cannot be told apart.

    ``order`` lists the models best first; ``not_different`` holds the pairs (either way round)
    that are not significantly different; every other pair is. Piepho's (2004) insert-and-absorb
    algorithm: start with one letter shared by all; for each different pair, split every letter
    column holding both into one without the first and one without the second; drop columns
    contained in another (absorb). A sweep then drops a model from a column when every pair
    that column gives it is given by another column, and absorbs again, so no letter is
    redundant. Letters go to columns in the order of their best model, so the best model has
    "a". Deterministic: pairs are processed in ranking order. Returns ``{model: letters}`` in
    ``order``.
    """
    models = list(order)
    rank = {model: k for k, model in enumerate(models)}
    if len(rank) != len(models):
        raise ValueError("compact_letter_display: a model appears twice in order")
    same = {frozenset(pair) for pair in not_different}
    for pair in same:
        if not pair <= rank.keys():
            raise ValueError(f"compact_letter_display: pair {sorted(map(str, pair))} names a model not in order")
    different = [(a, b) for a, b in itertools.combinations(models, 2) if frozenset((a, b)) not in same]

    def absorb(columns: list[frozenset]) -> list[frozenset]:
        unique = list(dict.fromkeys(columns))
        return [c for c in unique if c and not any(c < other for other in unique)]

    columns = [frozenset(models)] if models else []
    for a, b in different:
        split = []
        for column in columns:
            split += [column - {a}, column - {b}] if a in column and b in column else [column]
        columns = absorb(split)
    columns = sorted(columns, key=lambda c: sorted(rank[m] for m in c))
    for k in range(len(columns)):
        for model in sorted(columns[k], key=rank.get):
            others = [c for n, c in enumerate(columns) if n != k]
            if any(model in c for c in others) and all(any({model, partner} <= c for c in others)
                                                       for partner in columns[k] - {model}):
                columns[k] = columns[k] - {model}
    columns = sorted(absorb(columns), key=lambda c: sorted(rank[m] for m in c))
    letters = _letters(len(columns))
    return {model: "".join(letter for letter, column in zip(letters, columns) if model in column) for model in models}
