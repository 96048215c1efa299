"""The statistics of a judge run (``summary.json``), the numbers from ``raygpt.stats``, the words from ``wording``.

Per scored entry: a base model (its fine-tuning replicates pooled when ``ift.seeds``
fine-tuned it several times), or a pool of base models that differ only in their pretraining
seed (``judge.pools``), all their runs pooled:

- the mean score and its 95% interval: a bootstrap over items for a model fine-tuned once;
  with several runs, an interval that includes the seed variance (both levels for a pool;
  ``stats.variance.mean_ci``), beside the items-only one (and for a pool, the one that holds
  its pretraining seeds fixed);
- where its noise comes from: items, pretraining seeds, fine-tuning seeds, their
  interactions with items, judge passes (``stats.variance.variance_components``);
- its mean answer length (characters) and a length-controlled score with its interval
  (``stats.judge_checks.length_controlled``, against the reference anchor when anchors are on,
  else the mean over models), withheld where the fit cannot be trusted;
- letters: two entries share one exactly when they cannot be told apart.

For every pair: the mean difference over items with a paired bootstrap interval and a
Holm-adjusted p-value; with several runs also whether it survives the seed noise
(``stats.variance.paired_seed_robust``). For the judge itself: how well its passes agree on
the same answers (``stats.judge_checks.item_agreement``, the informative one) beside the
agreement of the per-pass model means (which averages the noise away over items); the
position bias estimated from the models only, with its interval and its noise floor;
warnings when the anchors misbehave.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import asdict
from typing import Any

import numpy as np

from raygpt.config import RunSpec, recorded_spec, without_userinfo
from raygpt.judge.answers import AnswerSet, answer_of, candidates_of, scored_entries
from raygpt.judge.calls import JudgeCall
from raygpt.judge.client import BATCH_DISCOUNT, Outcome, Usage, price_of
from raygpt.judge.prompts import TEMPLATES
from raygpt.judge.wording import LEVEL, length_sentences, pair_sentence, seed_robust_sentence, variance_notes
from raygpt.stages import EMPTY_ANCHOR, REFERENCE_ANCHOR
from raygpt.stats.judge_checks import item_agreement, length_controlled, position_bias
from raygpt.stats.multiple_comparisons import compact_letter_display, holm_adjust
from raygpt.stats.ranks import kendall_tau_b, spearman
from raygpt.stats.resampling import bootstrap_mean_ci, paired_differences
from raygpt.stats.values import rounded
from raygpt.stats.variance import paired_seed_robust, variance_components

SUMMARY_FORMAT = "raygpt-judge-summary/3"

SAMPLES_PER_PAIR = 160
"""The paired comparisons resample items at least this many times per pair of models: a
bootstrap p-value is never below 2 / (samples + 1), and Holm multiplies the smallest by the
number of pairs, so with fewer samples a clear difference among many models could not come
out significant. 160 per pair keeps that floor under a quarter of 0.05."""

EMPTY_ANCHOR_CEILING = 20.0
"""An empty answer that averages this much or more is a judge not reading the answers (the
comparative rubric puts it at 0-9)."""


def summarize(spec: RunSpec, sets: list[AnswerSet], calls: list[JudgeCall], outcomes: list[Outcome],
              identity: str | None = None) -> dict:
    config = spec.judge
    template = TEMPLATES[config.mode]()
    candidates = candidates_of(sets, config.anchors)
    column = {c: k for k, c in enumerate(candidates)}
    n_items, passes = len(sets[0].items), config.passes
    # scores[pass, item, candidate] and the position each was shown in; nan where none.
    scores = np.full((passes, n_items, len(candidates)), np.nan)
    positions = np.full_like(scores, np.nan)
    for call, outcome in zip(calls, outcomes):
        for position, (label, candidate) in enumerate(zip(call.labels, call.order)):
            if outcome.scores is not None:
                scores[call.pass_index, call.item_index, column[candidate]] = outcome.scores[label].score
            positions[call.pass_index, call.item_index, column[candidate]] = position
    by_model = {s.model: s for s in sets}
    reference_items = sets[0].items
    lengths = np.array([[len(answer_of(c, i, by_model, item)) for c in candidates]
                        for i, item in enumerate(reference_items)], dtype=float)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no scores is nan, as intended
        per_item = np.nanmean(scores, axis=0)  # (items, candidates): each item's mean over its passes
        pass_means = np.nanmean(scores, axis=1)  # (passes, candidates)
    intervals = bootstrap_mean_ci(per_item, config.bootstrap_samples, config.seed)

    def stats_of(candidate: str) -> dict:
        k = column[candidate]
        judged = int(np.sum(~np.isnan(scores[:, :, k])))
        scored_items = int(np.sum(~np.isnan(per_item[:, k])))
        finite_pass_means = pass_means[:, k][~np.isnan(pass_means[:, k])]
        return {
            "mean": rounded(np.nanmean(per_item[:, k]) if scored_items else np.nan),
            "ci95": [rounded(intervals[k][0]), rounded(intervals[k][1])],
            "pass_means": [rounded(v) for v in pass_means[:, k]],
            "spread": rounded(np.std(finite_pass_means, ddof=1)) if len(finite_pass_means) > 1 else None,
            "judgements": judged,
            "failures": passes * n_items - judged,
            "items_scored": scored_items,
            "items_excluded": n_items - scored_items,
            "mean_length": rounded(lengths[:, k].mean()),
            "item_scores": [rounded(v) for v in per_item[:, k]],
        }

    observed = Observed(column, scores, per_item, lengths, stats_of)
    models, cubes, entry_items, entry_lengths = [], {}, {}, {}
    for name, members in scored_entries(sets, config.pools).items():
        entry, cubes[name], entry_items[name], entry_lengths[name] = _entry(name, members, name in config.pools,
                                                                            observed, config)
        models.append(entry)
    length = _add_length_control(models, entry_items, entry_lengths, per_item, lengths, column, config)
    models.sort(key=lambda m: -m["mean"] if m["mean"] is not None else float("inf"))
    anchors = {a: stats_of(a) for a in (REFERENCE_ANCHOR, EMPTY_ANCHOR)} if config.anchors else {}
    comparisons = compare(models, entry_items, cubes, config.bootstrap_samples, config.seed)
    for m in models:
        m["letters"] = comparisons["letters"][m["model"]]

    model_columns = [column[s.model] for s in sets]
    is_model = [c in by_model for c in candidates]
    usage_direct, usage_batch, usage_cached = Usage(), Usage(), Usage()
    for outcome in outcomes:
        (usage_cached if outcome.cached else usage_batch if outcome.batch else usage_direct).add(outcome.usage)
    price = price_of(config.model, config)
    made = [o for o in outcomes if not o.cached]
    cost = None
    if price:
        cost = usage_direct.cost(price) + BATCH_DISCOUNT * usage_batch.cost(price)
    return {
        "format": SUMMARY_FORMAT,
        "judge": {"model": config.model, "endpoint": without_userinfo(config.base_url) or "https://api.openai.com/v1",
                  "identity": identity, "mode": config.mode, "template": f"{template.name}/{template.version}",
                  "temperature": config.temperature, "seed": config.seed, "max_tokens": config.max_tokens,
                  "passes": passes, "anchors": config.anchors, "bootstrap_samples": config.bootstrap_samples,
                  "batch": config.batch},
        "dataset": sets[0].dataset,
        "items": n_items,
        "item_ids": [str(item.get("id", i)) for i, item in enumerate(reference_items)],
        "models": models,
        "ranking": [m["model"] for m in models],
        "letters": comparisons.pop("letters"),
        "comparisons": comparisons,
        "length": length,
        "anchors": anchors,
        "warnings": anchor_warnings(anchors, models, scores, column),
        "item_agreement": _rounded_tree(item_agreement(scores[:, :, model_columns])),
        "rank_agreement": rank_agreement(pass_means[:, model_columns], scores[:, :, model_columns]),
        "position_bias": (_rounded_tree(position_bias(scores, positions, is_model, config.bootstrap_samples,
                                                      config.seed, LEVEL))
                          if config.mode == "comparative" else None),
        "notes": _notes(config, models),
        "calls": {"total": len(outcomes), "made": len(made), "cache_hits": len(outcomes) - len(made),
                  "failed": sum(o.scores is None for o in outcomes),
                  "http_attempts": sum(o.attempts for o in made),
                  "batches": sorted({o.batch for o in made if o.batch}),
                  "failures": _failure_reasons(outcomes)},
        "usage": {"prompt_tokens": usage_direct.prompt_tokens + usage_batch.prompt_tokens,
                  "completion_tokens": usage_direct.completion_tokens + usage_batch.completion_tokens,
                  "cost_usd": rounded(cost) if price else "n/a",
                  "batch_prompt_tokens": usage_batch.prompt_tokens,
                  "batch_completion_tokens": usage_batch.completion_tokens,
                  "batch_discount": BATCH_DISCOUNT,
                  "cached_prompt_tokens": usage_cached.prompt_tokens,
                  "cached_completion_tokens": usage_cached.completion_tokens,
                  "price_per_mtok": list(price) if price else "n/a"},
        "spec": recorded_spec(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class Observed:
    """What was judged, by candidate column: scores (passes, items, candidates), per-item means
    over passes (items, candidates), answer lengths (items, candidates), and each candidate's
    own statistics (``stats_of``)."""

    def __init__(self, column: dict[str, int], scores: np.ndarray, per_item: np.ndarray, lengths: np.ndarray,
                 stats_of):
        self.column, self.scores, self.per_item, self.lengths, self.stats_of = column, scores, per_item, lengths, stats_of

    def cube(self, runs: list[AnswerSet]) -> np.ndarray:
        """(runs, passes, items)."""
        return np.moveaxis(self.scores[:, :, [self.column[r.model] for r in runs]], 2, 0)

    def nested_mean(self, values: np.ndarray, members: list[list[AnswerSet]]) -> np.ndarray:
        """(items,): the mean over base models of the mean over their runs of ``values`` (items, candidates)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean([np.nanmean(values[:, [self.column[r.model] for r in runs]], axis=1)
                               for runs in members], axis=0)


def _entry(name: str, members: list[list[AnswerSet]], pooled: bool, observed: Observed, config) -> tuple:
    """One scored entry (a base model, or a pool of base models: ``members``, each a list of
    its runs), its scores by pretraining seed (a list of (runs, passes, items) arrays), its
    per-item means and per-item answer lengths (mean over base models of the mean over runs)."""
    runs = [r for member in members for r in member]
    cubes = [observed.cube(member) for member in members]
    items = observed.nested_mean(observed.per_item, members)
    length = observed.nested_mean(observed.lengths, members)
    levels = cubes if pooled else cubes[0]
    variance = _rounded_tree(variance_components(levels, LEVEL))
    interval = variance.pop("mean")  # the entry's own mean and interval
    if len(runs) == 1:
        run = runs[0]
        entry = {"model": name, "base_model": run.base_model, "answers": run.uri,
                 "seeds": None if run.seed is None else [run.seed], **observed.stats_of(run.model),
                 "ci95_includes_seeds": False}
        entry["item_scores_by_seed"] = [entry["item_scores"]]
    else:
        (items_only,) = bootstrap_mean_ci(items[:, None], config.bootstrap_samples, config.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            pass_means = np.nanmean([np.nanmean(cube, axis=(0, 2)) for cube in cubes], axis=0)
        judged = int(sum(np.sum(~np.isnan(cube)) for cube in cubes))
        scored = int(np.sum(~np.isnan(items)))
        finite = pass_means[~np.isnan(pass_means)]
        entry = {"model": name, "base_model": members[0][0].base_model, "answers": [r.uri for r in runs],
                 "seeds": sorted({r.seed for r in runs if r.seed is not None}) or None,
                 "mean": interval["mean"], "ci95": interval["ci"],
                 "ci95_includes_seeds": interval["includes_seed_variance"],
                 "ci95_items": [rounded(v) for v in items_only],
                 "pass_means": [rounded(v) for v in pass_means],
                 "spread": rounded(np.std(finite, ddof=1)) if len(finite) > 1 else None,
                 "judgements": judged, "failures": sum(cube.size for cube in cubes) - judged, "items_scored": scored,
                 "items_excluded": len(items) - scored, "mean_length": rounded(length.mean()),
                 "item_scores": [rounded(v) for v in items],
                 "item_scores_by_seed": [[rounded(v) for v in observed.per_item[:, observed.column[r.model]]]
                                         for r in runs],
                 "replicates": [{"model": r.model, "seed": r.seed, "answers": r.uri,
                                 **({"member": r.group} if pooled else {}),
                                 **{k: v for k, v in observed.stats_of(r.model).items() if k != "item_scores"}}
                                for r in runs]}
    if pooled:
        entry.update(base_model=None, pool=[member[0].group for member in members],
                     pool_base_models=[member[0].base_model for member in members],
                     ci95_finetuning=interval["ci_finetuning"] or [None, None],
                     item_scores_by_run=[[entry["item_scores_by_seed"][runs.index(r)] for r in member]
                                         for member in members])
    entry["variance"] = variance
    return entry, levels, items, length


def _add_length_control(models: list[dict], entry_items: dict, entry_lengths: dict, per_item: np.ndarray,
                        lengths: np.ndarray, column: dict[str, int], config) -> dict:
    """Each model's length-controlled score and its interval beside its raw one (AlpacaEval 2's
    regression of the score difference to a reference on the length difference;
    ``stats.judge_checks.length_controlled``). Returns the summary's ``length``: the fitted
    score points per character with its interval, why scores were withheld, and the sentences."""
    names = [m["model"] for m in models]
    reference = {}
    if config.anchors:
        k = column[REFERENCE_ANCHOR]
        reference = {"reference_scores": per_item[:, k], "reference_lengths": lengths[:, k]}
    result = length_controlled(np.column_stack([entry_items[n] for n in names]),
                               np.column_stack([entry_lengths[n] for n in names]), names=names,
                               samples=config.bootstrap_samples, seed=config.seed, level=LEVEL, **reference)
    for m, controlled in zip(models, result["models"]):
        m["length_controlled"] = rounded(controlled["length_controlled"])
        m["length_controlled_ci95"] = [rounded(v) for v in controlled["ci"]]
        m["length_clipped"] = controlled["clipped"]
        m["length_adjustment"] = rounded(controlled["adjustment"])
        m["length_adjustment_ci95"] = [rounded(v) for v in controlled["adjustment_ci"]]
        m["mean_length_difference"] = rounded(controlled["mean_length_difference"])
    length = {"unit": "characters", "reference": "@reference anchor" if config.anchors else "mean over models",
              "score_points_per_unit": rounded(result["length_coefficient"], 6),
              "coefficient_ci95": [rounded(v, 6) for v in result["coefficient_ci"]],
              "refused": result["refused"], "within_model_spread": rounded(result["within_model_spread"]),
              "little_within_model_variation": result["little_within_model_variation"]}
    length["sentences"] = length_sentences(length, models, "characters")
    return length


def _units(cubes: np.ndarray | list[np.ndarray]) -> int:
    """How many seed units an entry's mean varies over: its pretraining seeds, else its runs."""
    return len(cubes) if isinstance(cubes, list) else cubes.shape[0]


def compare(models: list[dict], entry_items: dict[str, np.ndarray], cubes: dict[str, np.ndarray | list[np.ndarray]],
            samples: int, seed: int) -> dict:
    """Every pair of entries (in ranking order): the paired bootstrap over items with Holm's
    adjustment; with several runs, the seed-robust comparison too (its p-values Holm-adjusted
    as well). The letters come from the seed-robust tests when every entry has several runs
    (the item bootstrap alone would call run-to-run luck a difference), else from the item
    bootstrap."""
    names = [m["model"] for m in models]
    pairs_count = len(names) * (len(names) - 1) // 2
    samples = max(samples, SAMPLES_PER_PAIR * pairs_count)
    matrix = np.column_stack([entry_items[n] for n in names]) if names else np.zeros((0, 0))
    pairs = []
    for d in paired_differences(matrix, samples, seed, LEVEL, names):
        row = {k: rounded(v, 6) if isinstance(v, float) else v for k, v in asdict(d).items()}
        row["ci"] = [rounded(v) for v in d.ci]
        row["sentence"] = pair_sentence(row)
        pairs.append(row)
    replicated = [n for n in names if _units(cubes[n]) > 1]
    seed_robust = None
    if replicated:
        seed_robust = [paired_seed_robust(cubes[a], cubes[b], LEVEL, (a, b))
                       for a, b in itertools.combinations(names, 2)]
        for row, p_holm in zip(seed_robust, holm_adjust([np.nan if r["p_value"] is None else r["p_value"]
                                                         for r in seed_robust])):
            row["p_holm"] = rounded(p_holm, 6)
            row["different"] = bool(p_holm < 1 - LEVEL) if row["survives"] is not None else None
        seed_robust = _rounded_tree(seed_robust)
        for row in seed_robust:
            row["sentence"] = seed_robust_sentence(row)
    from_seeds = bool(names) and len(replicated) == len(names)
    basis = seed_robust if from_seeds else pairs
    same = {(r["a"], r["b"]) for r in basis if not r["different"]}
    if from_seeds:
        pooled = any(isinstance(cubes[n], list) for n in names)
        method = (f"tests that include the {'pretraining and fine-tuning' if pooled else 'fine-tuning'} seed "
                  f"variance, Holm-adjusted")
    else:
        method = "paired bootstrap over items, Holm-adjusted"
    return {"level": LEVEL, "bootstrap_samples": samples, "pairs": pairs, "seed_robust": seed_robust,
            "letters_from": method, "letters": compact_letter_display(names, same)}


def anchor_warnings(anchors: dict, models: list[dict], scores: np.ndarray, column: dict[str, int]) -> list[str]:
    """What the anchors say about the judge: an empty answer that scores high, or one at least
    as high as a model, means it is not reading the answers; a reference below a model means
    the judge ignores the reference or the models beat the dataset's answers."""
    found = []
    empty, reference = anchors.get(EMPTY_ANCHOR), anchors.get(REFERENCE_ANCHOR)
    scored = [m for m in models if m["mean"] is not None]
    if empty and empty["mean"] is not None:
        if empty["mean"] >= EMPTY_ANCHOR_CEILING:
            found.append(f"the empty answer scores {empty['mean']:.1f} on average (the rubric puts an empty answer "
                         f"at 0-9): the judge may not be reading the answers")
        beaten = [m["model"] for m in scored if m["mean"] <= empty["mean"]]
        if beaten:
            found.append(f"the empty answer ({empty['mean']:.1f}) scores at least as high as {', '.join(beaten)}")
    if reference and reference["mean"] is not None:
        above = [f"{m['model']} ({m['mean']:.1f})" for m in scored if m["mean"] > reference["mean"]]
        if above:
            found.append(f"the reference answer ({reference['mean']:.1f}) scores below {', '.join(above)}: the "
                         f"judge may be ignoring the reference, or the models beat the dataset's answers")
    if empty and reference:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_item = np.nanmean(scores, axis=0)
        e, r = per_item[:, column[EMPTY_ANCHOR]], per_item[:, column[REFERENCE_ANCHOR]]
        both = ~np.isnan(e) & ~np.isnan(r)
        inverted = int((e[both] >= r[both]).sum())
        if inverted:
            found.append(f"on {inverted} of {int(both.sum())} items the empty answer scores at least as high as the "
                         f"reference answer")
    return found


def _notes(config, models: list[dict]) -> list[str]:
    notes = []
    if config.passes > 1:
        if config.mode == "single":
            notes.append("single mode: passes alternate the book's prompt and the same request with the reference "
                         "after the answer, so they differ in more than the seed (identical prompts to a "
                         "deterministic judge would agree perfectly and measure nothing)")
        else:
            notes.append("passes rotate the order the answers are shown in")
    else:
        notes.append("one pass: the judge's own noise is neither measured nor averaged out")
    notes.append("agreement: the per-item one (Spearman of two passes' scores of the same answers) shows the "
                 "judge's noise; that of the per-pass model means averages it away over items and stays near 1")
    for m in models:
        notes += variance_notes(m)
    return notes


def rank_agreement(pass_means: np.ndarray, scores: np.ndarray) -> dict | None:
    """How much the passes agree on the ranking of the models (anchors left out: they agree trivially).

    ``spearman``/``kendall``: between two passes' rankings of the models by mean score,
    averaged over all pairs of passes. ``item_kendall``: between two passes' orderings of the
    answers to the same item, averaged over items and pairs. The first two barely move with
    the judge's noise, which the mean over items averages away; ``item_agreement`` shows it.
    None with fewer than two passes or two models.
    """
    passes, _, n_models = scores.shape
    if passes < 2 or n_models < 2:
        return None
    rhos, taus, item_taus = [], [], []
    for p, q in itertools.combinations(range(passes), 2):
        if not (np.isnan(pass_means[p]).any() or np.isnan(pass_means[q]).any()):
            rhos.append(spearman(pass_means[p], pass_means[q]))
            taus.append(kendall_tau_b(pass_means[p], pass_means[q]))
        for i in range(scores.shape[1]):
            a, b = scores[p, i], scores[q, i]
            if not (np.isnan(a).any() or np.isnan(b).any()):
                item_taus.append(kendall_tau_b(a, b))
    return {"spearman": _nanmean_or_none(rhos), "kendall": _nanmean_or_none(taus),
            "item_kendall": _nanmean_or_none(item_taus), "pass_pairs": passes * (passes - 1) // 2}


def _failure_reasons(outcomes: list[Outcome]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.failure:
            reason = outcome.failure.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _nanmean_or_none(values: list[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return rounded(np.mean(finite)) if finite else None


def _rounded_tree(value: Any) -> Any:
    """Floats in nested dicts and lists rounded for the JSON (4 decimals; p-values 6)."""
    if isinstance(value, dict):
        return {k: rounded(v, 6) if k.startswith("p_") and isinstance(v, float) else _rounded_tree(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded_tree(v) for v in value]
    if isinstance(value, float):
        return rounded(value) if math.isfinite(value) else None
    return value
