"""Bootstrap intervals that resample the judged items (and seeds), shared across models.

Written here rather than taken from ``scipy.stats.bootstrap``: every model's interval and
every pair's difference use the same item resamples (a paired bootstrap, so an item's
difficulty, which all models share, cancels in a difference), a failed judgement is masked
as nan and left out of each resample's mean rather than dropped from the item list, and the
Spearman interval resamples items once for all models and each model's seeds apart, at two
levels. scipy's bootstrap draws its own resamples per call and takes no masks.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from raygpt.stats.multiple_comparisons import holm_adjust
from raygpt.stats.nesting import by_pretraining_seed
from raygpt.stats.ranks import spearman_columns
from raygpt.stats.values import finite, interval


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
    return [PairedDifference(a, b, finite(mean), interval(low, high), finite(p), finite(p_holm),
                             bool(p_holm < 1 - level), both)
            for (a, b, mean, low, high, p, both), p_holm in zip(rows, adjusted)]


def spearman_interval(losses: Sequence[float | Sequence[float]], scores: Sequence, samples: int, seed: int,
                      level: float = 0.95) -> dict:
    """Spearman's rho between test loss and judged score across models, with an interval that
    resamples the items and each model's seeds, at both seed levels.

    ``scores[k]`` is model k's per-item scores (mean over passes), nan where none, the same
    items for every model: (items,) for one run, (seeds, items) for a base model fine-tuned
    several times, or a list with one (fine-tuning seeds, items) array per pretraining seed
    for a pool of base models that differ only in their pretraining seed. ``losses[k]`` is
    model k's test loss, or for a pool a list with one loss per pretraining seed (in the order
    of its ``scores[k]`` list). A model's score is the mean over its pretraining seeds of the
    mean over their fine-tuning seeds of each run's mean over items; its loss, the mean of its
    losses. A single loss is taken as exact (a test set of many tokens measures it far more
    precisely than the judge measures the score); per-seed losses vary with the pretraining
    seed as the scores do, so they are resampled with it.

    Each bootstrap replicate draws items once for all models (they answered the same
    questions) and, for each model apart, its pretraining seeds with replacement and, within
    each, its fine-tuning seeds with replacement. With few seeds the seed resampling is a
    little narrow ((S - 1) / S of the seed variance) and resampling both levels counts the
    seed-by-item noise twice (a little wide); for a rank correlation no analytic interval does
    better. Replicates in which a model has no score, or the scores tie so rho is undefined,
    are left out. Negative rho: lower loss, higher score. ``resampled`` names what was.
    """
    models = [by_pretraining_seed(s, 1, "spearman_interval") for s in scores]
    if len(models) != len(losses):
        raise ValueError(f"spearman_interval: {len(losses)} losses for {len(models)} models")
    seed_losses = [np.atleast_1d(np.asarray(loss, dtype=float)) for loss in losses]
    for k, (loss, groups) in enumerate(zip(seed_losses, models)):
        if len(loss) not in (1, len(groups)):
            raise ValueError(f"spearman_interval: model {k} has {len(loss)} losses for {len(groups)} pretraining seeds")
    if len({g.shape[1] for groups in models for g in groups}) > 1:
        raise ValueError(f"spearman_interval: models scored on different numbers of items "
                         f"{sorted({g.shape[1] for groups in models for g in groups})}")
    n_items = models[0][0].shape[1] if models else 0
    pretraining = max((len(groups) for groups in models), default=1) > 1
    finetuning = any(len(g) > 1 for groups in models for g in groups)
    resampled = ("items, pretraining and fine-tuning seeds" if pretraining and finetuning
                 else "items and pretraining seeds" if pretraining else "items and seeds" if finetuning else "items")
    result = {"spearman": None, "ci": [None, None], "models": len(models), "items": n_items,
              "seeds": [sum(len(g) for g in groups) for groups in models],
              "pretraining_seeds": [len(groups) for groups in models], "resampled": resampled,
              "bootstrap_samples": samples, "seed": seed}
    if len(models) < 2 or n_items == 0:
        return result
    item_index = bootstrap_indices(n_items, samples, seed)
    columns = np.arange(samples)[:, None]
    point_scores, point_losses, score_replicates, loss_replicates = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no scores is nan, as intended
        for k, (groups, loss) in enumerate(zip(models, seed_losses)):
            point_scores.append(np.nanmean([np.nanmean(np.nanmean(g, axis=1)) for g in groups]))
            point_losses.append(loss.mean())
            per_seed = []  # (pretraining seeds, samples): each one's fine-tuning seeds resampled
            for p, runs in enumerate(groups):
                per_run = np.array([resampled_means(row, item_index) for row in runs])  # (runs, samples)
                # A single pretraining seed keeps the stream of the one-level bootstrap.
                picks = bootstrap_indices(len(runs), samples, [seed, k + 1] if len(groups) == 1 else [seed, k + 1, p + 1])
                per_seed.append(np.nanmean(per_run[picks, columns], axis=1))
            per_seed = np.array(per_seed)
            if len(groups) == 1:
                score_replicates.append(per_seed[0])
                loss_replicates.append(np.full(samples, loss.mean()))
                continue
            picks = bootstrap_indices(len(groups), samples, [seed, k + 1, 0])
            score_replicates.append(np.nanmean(per_seed[picks, columns], axis=1))
            loss_replicates.append(loss[picks].mean(axis=1) if len(loss) > 1 else np.full(samples, loss[0]))
    point_scores, score_replicates = np.array(point_scores), np.array(score_replicates)  # (models, samples)
    loss_replicates = np.array(loss_replicates)
    rho = (spearman_columns(np.array(point_losses)[:, None], point_scores[:, None])[0]
           if not np.isnan(point_scores).any() else math.nan)
    complete = ~np.isnan(score_replicates).any(axis=0)
    rhos = spearman_columns(loss_replicates[:, complete], score_replicates[:, complete])
    result.update(spearman=finite(rho), ci=interval(*percentile_interval(rhos, level)))
    return result
