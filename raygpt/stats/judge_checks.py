"""The judge's own checks: is it consistent, biased by position, swayed by length?

- ``item_agreement``: do the passes order the same answers alike (per item), and how reliable
  is one judgement (ICC)?
- ``position_bias``: how much the position an answer is shown in moves its score, with its
  interval and the noise floor a range of effects has when there is no bias at all.
- ``length_controlled``: each model's score with its answers' length regressed out, with an
  interval, refused where the fit cannot be trusted.

Written here: these are models of the judge's design (passes that rotate a shuffled order,
answers compared with a reference answer), which no statistics library knows; the
rank correlations and resampling they use come from ``ranks`` (scipy) and ``resampling``.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from raygpt.stats.ranks import spearman
from raygpt.stats.resampling import bootstrap_indices, percentile_interval
from raygpt.stats.values import finite, interval


def _position_statistics(scores: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per-item sufficient statistics of the position-effect fit (see ``position_bias``).

    scores (passes, items, models) with nan where missing; slots the same shape, int position
    or -1. Returns ``(gram, moment, within)``: gram (items, K, K) and moment (items, K), whose
    sums over items give the normal equations ``gram @ effect = moment``, and whether the fit is
    the within-answer one (some answer seen in two passes) or, with one pass, raw means.
    """
    n_positions = int(slots.max()) + 1
    observed = ~np.isnan(scores) & (slots >= 0)
    onehot = (slots[..., None] == np.arange(n_positions)) & observed[..., None]  # (P, I, M, K)
    counts = onehot.sum(axis=0).astype(float)  # (I, M, K): each answer's passes per position
    per_answer = observed.sum(axis=0)  # (I, M)
    within = bool((per_answer >= 2).any())
    y = np.where(observed, scores, 0.0)
    if within:
        # Take each answer's own mean out, so quality (item x model) cannot masquerade as position.
        answer_mean = y.sum(axis=0) / np.maximum(per_answer, 1)
        residual = np.where(observed, y - answer_mean[None], 0.0)
        moment = np.einsum("pim,pimk->ik", residual, onehot)
        gram = (np.einsum("imk,kl->ikl", counts, np.eye(n_positions))
                - np.einsum("imk,iml->ikl", counts / np.maximum(per_answer, 1)[..., None], counts))
    else:
        # One pass: orders are random, so the mean at a position minus the overall mean is unbiased.
        moment = np.einsum("pim,pimk->ik", y, onehot)
        gram = counts.sum(axis=1)  # (I, K): observations per position, a diagonal
    return gram, moment, within


def _position_effects(gram: np.ndarray, moment: np.ndarray, within: bool) -> np.ndarray:
    """Solve summed statistics for the position effects, centred on the average position.

    gram (..., K, K) or (..., K) (raw means), moment (..., K); effects (..., K), nan where a
    position has no observation."""
    if within:
        effects = np.einsum("...kl,...l->...k", np.linalg.pinv(gram), moment)
        seen = np.einsum("...kk->...k", gram) > 0
    else:
        seen = gram > 0
        means = moment / np.where(seen, gram, 1)
        overall = moment.sum(axis=-1, keepdims=True) / np.maximum(gram.sum(axis=-1, keepdims=True), 1)
        effects = means - overall
    effects = np.where(seen, effects, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return effects - np.nanmean(effects, axis=-1, keepdims=True)


def _range(effects: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmax(effects, axis=-1) - np.nanmin(effects, axis=-1)


def _position_null(y: np.ndarray, slots: np.ndarray, gram: np.ndarray, within: bool, samples: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Position effects (samples, K) fitted after a shuffle that leaves no position effect.

    Within answers: each answer's observed scores are dealt to its observed passes in a random
    order (its positions, and so ``gram``, stay as they were). One pass: each item's positions
    are dealt among its models at random.
    """
    observed = ~np.isnan(y) & (slots >= 0)
    n_positions = gram.shape[-1]
    if within:
        passes = np.arange(y.shape[0])[:, None, None]
        # Observed passes first, in their own order (targets) and in a random one (sources).
        targets = np.argsort(np.where(observed, passes, np.inf), axis=0, kind="stable")
        sources = np.argsort(np.where(observed, rng.random((samples,) + y.shape), np.inf), axis=1)
        shuffled = np.empty((samples,) + y.shape)
        np.put_along_axis(shuffled, np.broadcast_to(targets, shuffled.shape),
                          np.take_along_axis(np.broadcast_to(y, shuffled.shape), sources, axis=1), axis=1)
        per_answer = observed.sum(axis=0)
        answer_mean = np.where(observed, y, 0.0).sum(axis=0) / np.maximum(per_answer, 1)
        residual = np.where(observed, shuffled - answer_mean, 0.0)
        onehot = ((slots[..., None] == np.arange(n_positions)) & observed[..., None]).astype(float)
        moments = residual.reshape(samples, -1) @ onehot.reshape(-1, n_positions)
        return _position_effects(np.broadcast_to(gram, (samples,) + gram.shape), moments, within)
    keys = np.where(slots >= 0, rng.random((samples,) + slots.shape), np.inf)
    dealt = np.take_along_axis(np.broadcast_to(slots, keys.shape), np.argsort(keys, axis=-1), axis=-1)
    onehot = (dealt[..., None] == np.arange(n_positions)) & ~np.isnan(y)[..., None]  # (samples, P, I, M, K)
    moments = np.einsum("pim,spimk->sk", np.where(np.isnan(y), 0.0, y), onehot.astype(float))
    return _position_effects(onehot.sum(axis=(1, 2, 3)).astype(float), moments, within)


def position_bias(scores: np.ndarray, positions: np.ndarray, candidates_mask: Sequence[bool], samples: int,
                  seed: int, level: float = 0.95) -> dict:
    """How much the position an answer is shown in moves its score, from the models' answers only.

    ``scores`` and ``positions`` are (passes, items, candidates): the score and the 0-based
    place in the presented order, nan where missing; ``candidates_mask`` is True for models
    and False for the anchors, which are left out: the reference and the empty answer sit at
    the ceiling and the floor of the scale, where a bonus cannot show, so with them in the
    estimate reads low. The fit is ``score = quality(item, model) + effect(position)`` by least
    squares, effects centred on the average position: with the answer's quality taken out
    (each answer is seen in several positions over the passes, the orders being rotated), only
    how its score moves with its position is left. With one pass, the mean score at a position
    minus the overall mean (orders are random, so that is unbiased, if noisier).

    ``range`` (most minus least favoured position) is never negative, so it is read against
    ``noise_floor``: the median range when scores are shuffled among the passes of each answer
    (with one pass: positions among the models of each item), which keeps the presentation
    design and removes any position effect; ``null_95`` is that null's 95th percentile and
    ``p_value`` the share of it at least as large as the observed range (+1 corrected).
    Intervals (per position and of the range) resample items. Positions are reported as
    0-based indices.
    """
    scores, positions = np.asarray(scores, dtype=float), np.asarray(positions, dtype=float)
    mask = np.asarray(candidates_mask, dtype=bool)
    if scores.ndim != 3 or scores.shape != positions.shape or mask.shape != (scores.shape[2],):
        raise ValueError(f"position_bias: scores {scores.shape} and positions {positions.shape} must be (passes, "
                         f"items, candidates) with one mask entry per candidate ({mask.shape})")
    y, slots = scores[:, :, mask], np.where(np.isnan(positions), -1, positions).astype(int)[:, :, mask]
    _, n_items, n_models = y.shape
    if n_items == 0 or n_models == 0 or slots.max() < 0:
        return {"by_position": [], "range": None, "range_ci": [None, None], "noise_floor": None, "null_95": None,
                "p_value": None, "models": int(n_models), "method": None}
    gram, moment, within = _position_statistics(y, slots)
    effects = _position_effects(gram.sum(axis=0), moment.sum(axis=0), within)
    observed_range = float(_range(effects))

    index = bootstrap_indices(n_items, samples, seed)
    weights = np.zeros((samples, n_items))
    np.add.at(weights, (np.arange(samples)[:, None], index), 1.0)  # how often each item is drawn
    resampled = _position_effects(np.tensordot(weights, gram, axes=1), weights @ moment, within)  # (samples, K)
    ranges = _range(resampled)
    rng = np.random.default_rng([seed, 1])
    block = 100  # shuffles at a time: memory stays at 100 copies of the scores
    null_effects = np.concatenate([_position_null(y, slots, gram.sum(axis=0), within, min(block, samples - start), rng)
                                   for start in range(0, samples, block)])
    null_ranges = _range(null_effects)
    null_ranges = null_ranges[~np.isnan(null_ranges)]
    rows = []
    for k in range(len(effects)):
        n = int(((slots == k) & ~np.isnan(y)).sum())
        rows.append({"position": k, "n": n, "effect": finite(effects[k]),
                     "ci": interval(*percentile_interval(resampled[:, k], level))})
    return {"by_position": rows, "range": finite(observed_range),
            "range_ci": interval(*percentile_interval(ranges, level)),
            "noise_floor": finite(np.median(null_ranges)) if len(null_ranges) else None,
            "null_95": finite(np.percentile(null_ranges, 95)) if len(null_ranges) else None,
            "p_value": (finite((1 + (null_ranges >= observed_range).sum()) / (1 + len(null_ranges)))
                        if len(null_ranges) and not math.isnan(observed_range) else None),
            "models": int(n_models), "method": "within answers across passes" if within else "raw means (one pass)"}


def item_agreement(scores: np.ndarray) -> dict | None:
    """How well the judge's passes agree on the same answers: the informative consistency check.

    ``scores`` is (passes, items, models), nan where a judgement failed. ``within_item`` is
    Spearman's rho between two passes' scores of the models' answers to one item, averaged
    over items and pairs of passes: does the judge order the same answers the same way when
    only the presentation order changed? (Items whose scores tie in a pass, so rho is
    undefined, are left out.) ``icc`` is the one-way intraclass correlation ICC(1) with each
    (item, model) answer a group and its passes the replicates (unequal counts handled by the
    usual n0): the share of one judgement's variance that belongs to the answer rather than to
    the pass, i.e. the reliability of a single judgement. Both fall as judge noise rises, unlike
    the Spearman of per-pass model means, which averages the noise away over items and stays
    near 1 long after the judge has stopped telling answers apart. None with fewer than two
    passes.
    """
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 3:
        raise ValueError(f"item_agreement: scores must be (passes, items, models), got shape {scores.shape}")
    passes, n_items, _ = scores.shape
    if passes < 2:
        return None
    rhos = []
    for p, q in itertools.combinations(range(passes), 2):
        for i in range(n_items):
            both = ~np.isnan(scores[p, i]) & ~np.isnan(scores[q, i])
            if both.sum() >= 2:
                rhos.append(spearman(scores[p, i, both], scores[q, i, both]))
    rhos = np.array(rhos)
    rhos = rhos[~np.isnan(rhos)]
    observed = ~np.isnan(scores)
    per_answer = observed.sum(axis=0)  # (items, models)
    answer_means = np.where(observed, scores, 0.0).sum(axis=0) / np.maximum(per_answer, 1)
    counts, means = per_answer[per_answer > 0], answer_means[per_answer > 0]
    groups, total = len(counts), int(counts.sum())
    icc = math.nan
    if groups >= 2 and total > groups:
        grand = (counts * means).sum() / total
        ms_between = (counts * (means - grand) ** 2).sum() / (groups - 1)
        ms_within = np.nansum((scores - answer_means[None]) ** 2) / (total - groups)
        n0 = (total - (counts ** 2).sum() / total) / (groups - 1)
        denominator = ms_between + (n0 - 1) * ms_within
        icc = (ms_between - ms_within) / denominator if denominator > 0 else math.nan
    return {"within_item": finite(rhos.mean()) if len(rhos) else None, "icc": finite(icc),
            "item_pairs": len(rhos), "pass_pairs": passes * (passes - 1) // 2, "answers": int(groups)}


SCORE_RANGE = (0.0, 100.0)
"""The judge's scale: no score, length-controlled or not, is reported outside it."""

MAX_ADJUSTMENT_CI_WIDTH = 0.5
"""Length control is refused when some model's length adjustment has an interval wider than
this share of the score range (50 points on 0-100): the slope is too uncertain to move a
score by."""

MIN_WITHIN_MODEL_SPREAD = 0.05
"""Below this standard deviation of the answer length within models, as a share of the mean
answer length, lengths vary too little within models for the slope to be told apart from
quality (a few characters that happen to track how good each answer is)."""


def length_controlled(scores: np.ndarray, lengths: np.ndarray, reference_scores: np.ndarray | None = None,
                      reference_lengths: np.ndarray | None = None, names: Sequence[str] | None = None,
                      samples: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Each model's score with its answers' length taken out, beside the raw score, with intervals.

    ``scores`` and ``lengths`` are (items, models) (lengths in any unit: characters, tokens),
    nan where missing. As AlpacaEval 2 does for its win rate (Dubois et al. 2024), each answer
    is compared with a reference answer to the same item, the reference anchor's if
    ``reference_scores``/``reference_lengths`` (items,) are given, else the mean over models.
    The model, fitted by least squares over every (item, model) with both values:

        score[i, m] - reference_score[i] = theta[m] + beta * (length[i, m] - reference_length[i]) + noise

    with one length coefficient ``beta`` (score points per unit of length) shared by all models
    and an intercept per model. With the intercepts in, beta is learnt from how each model's
    score moves with its own answers' lengths across items (the pooled within-model slope),
    not from the fact that better models may also write longer answers. The length-controlled
    score is the predicted score at zero length difference, ``mean(reference_score) +
    theta[m]``, i.e. the raw score minus the model's ``adjustment``, beta times its mean length
    difference. Unlike AlpacaEval (a logistic model of preferences with a tanh-squashed length
    term) this is linear, since judge scores are points, not preferences. ``raw`` is the mean
    over the same cells.

    Intervals (of beta, each adjustment and each length-controlled score) resample the items,
    refitting each time. ``refused`` lists why the length-controlled scores are withheld
    (None): ``"effect beyond the score range"`` when some adjustment is larger than the whole
    scale (a slope fitted to a few characters that track quality, say), ``"slope too
    uncertain"`` when some adjustment's interval is wider than ``MAX_ADJUSTMENT_CI_WIDTH`` of
    it, ``"no length variation within models"`` when beta cannot be fitted. Otherwise scores
    and interval bounds outside ``SCORE_RANGE`` are clipped to it (``clipped``).
    ``within_model_spread`` is the pooled within-model standard deviation of the length
    difference as a share of the mean answer length; ``little_within_model_variation`` is True
    below ``MIN_WITHIN_MODEL_SPREAD``. No fit can tell a judge that rewards length from answers
    that are longer because they are better within each model: where length follows quality
    within models, the control removes true differences.
    """
    scores, lengths = np.asarray(scores, dtype=float), np.asarray(lengths, dtype=float)
    if scores.ndim != 2 or scores.shape != lengths.shape:
        raise ValueError(f"length_controlled: scores {scores.shape} and lengths {lengths.shape} must be the same "
                         f"(items, models) shape")
    n_items, n_models = scores.shape
    labels = list(names) if names is not None else list(range(n_models))
    given = reference_scores is not None
    if given != (reference_lengths is not None):
        raise ValueError("length_controlled: give both reference_scores and reference_lengths, or neither")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an item no model has both values for: nan
        if given:
            ref_score, ref_length = np.asarray(reference_scores, dtype=float), np.asarray(reference_lengths, dtype=float)
        else:
            both = ~np.isnan(scores) & ~np.isnan(lengths)
            ref_score = np.nanmean(np.where(both, scores, np.nan), axis=1)
            ref_length = np.nanmean(np.where(both, lengths, np.nan), axis=1)
    d_score, d_length = scores - ref_score[:, None], lengths - ref_length[:, None]
    used = ~np.isnan(d_score) & ~np.isnan(d_length)
    # Row 0 weighs every item once (the estimate); the others are bootstrap resamples of the items.
    weights = np.ones((1, n_items))
    if samples and n_items:
        resamples = np.zeros((samples, n_items))
        np.add.at(resamples, (np.arange(samples)[:, None], bootstrap_indices(n_items, samples, seed)), 1.0)
        weights = np.concatenate([weights, resamples])
    fit = _length_fit(weights, used, scores, lengths, d_score, d_length)
    count = used.sum(axis=0)
    beta = fit["beta"][0]
    raw, adjustment = fit["raw"][0], fit["adjustment"][0]
    bootstrap = (lambda values: percentile_interval(values, level)) if len(weights) > 1 else \
        (lambda values: (math.nan, math.nan))
    adjustment_ci = [bootstrap(fit["adjustment"][1:, m]) for m in range(n_models)]
    low_score, high_score = SCORE_RANGE
    width = high_score - low_score
    refused = []
    if not math.isfinite(beta):
        refused.append("no length variation within models")
    else:
        if np.nanmax(np.abs(adjustment)) > width:
            refused.append("effect beyond the score range")
        if any(high - low > MAX_ADJUSTMENT_CI_WIDTH * width for low, high in adjustment_ci):
            refused.append("slope too uncertain")
    spread = fit["within_sd"][0] / abs(np.nanmean(lengths[used])) if used.any() else math.nan
    models = []
    for m in range(n_models):
        controlled = raw[m] - adjustment[m]
        ci = bootstrap(fit["raw"][1:, m] - fit["adjustment"][1:, m])
        shown = not refused and count[m] > 0
        clipped = shown and not all(low_score <= v <= high_score for v in (controlled, *ci) if math.isfinite(v))
        models.append({"model": labels[m], "raw": finite(raw[m]),
                       "length_controlled": finite(np.clip(controlled, low_score, high_score)) if shown else None,
                       "ci": interval(*np.clip(ci, low_score, high_score)) if shown else [None, None],
                       "clipped": bool(clipped), "adjustment": finite(adjustment[m]),
                       "adjustment_ci": interval(*adjustment_ci[m]),
                       "mean_length": finite(lengths[used[:, m], m].mean()) if count[m] else None,
                       "mean_length_difference": finite(fit["mean_dl"][0, m]), "items": int(count[m])})
    return {"length_coefficient": finite(beta), "coefficient_ci": interval(*bootstrap(fit["beta"][1:])),
            "reference": "given" if given else "mean over models", "within_model_spread": finite(spread),
            "little_within_model_variation": bool(spread < MIN_WITHIN_MODEL_SPREAD),
            "refused": refused, "bootstrap_samples": len(weights) - 1, "models": models}


def _length_fit(weights: np.ndarray, used: np.ndarray, scores: np.ndarray, lengths: np.ndarray,
                d_score: np.ndarray, d_length: np.ndarray) -> dict[str, np.ndarray]:
    """The length regression of ``length_controlled`` under item weights (rows of ``weights``,
    (fits, items): how often each item is drawn), all fits at once from weighted sums.
    Returns (fits,) ``beta`` and ``within_sd``, and (fits, models) ``raw``, ``mean_dl`` and
    ``adjustment``; nan where undefined."""
    def weighted(values: np.ndarray) -> np.ndarray:
        return weights @ np.where(used, values, 0.0)  # (fits, models)

    with np.errstate(invalid="ignore", divide="ignore"):
        count = weighted(np.ones_like(d_length))
        mean_dl, mean_ds = weighted(d_length) / count, weighted(d_score) / count
        spread = np.nansum(weighted(d_length ** 2) - count * mean_dl ** 2, axis=1)
        cross = np.nansum(weighted(d_length * d_score) - count * mean_dl * mean_ds, axis=1)
        beta = np.where(spread > 1e-12 * np.maximum(1.0, weighted(d_length ** 2).sum(axis=1)), cross / spread, np.nan)
        cells = count.sum(axis=1) - (count > 0).sum(axis=1)
        within_sd = np.sqrt(np.maximum(spread, 0) / np.maximum(cells, 1))
        return {"beta": beta, "within_sd": within_sd, "raw": weighted(scores) / count, "mean_dl": mean_dl,
                "adjustment": beta[:, None] * mean_dl}
