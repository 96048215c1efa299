"""The statistics of a judge run (``summary.json``), and their terminal table.

Per base model (its replicates pooled when ``ift.seeds`` fine-tuned it several times):

- the mean score and its 95% interval: a bootstrap over items for a model fine-tuned once;
  with replicates, a t interval that includes the seed-to-seed variance (``stats.mean_ci``),
  beside the items-only one;
- where its noise comes from: items, fine-tuning seeds, seed x item, judge passes
  (``stats.variance_components``);
- its mean answer length (characters) and a length-controlled score (``stats.length_controlled``,
  against the reference anchor when anchors are on, else the mean over models);
- letters: two models share one exactly when they cannot be told apart.

For every pair: the mean difference over items with a paired bootstrap interval and a
Holm-adjusted p-value; with replicates also whether it survives fine-tuning noise
(``stats.paired_seed_robust``). For the judge itself: how well its passes agree on the same
answers (``stats.item_agreement``, the informative one) beside the agreement of the per-pass
model means (which averages the noise away over items); the position bias estimated from the
models only, with its interval and its noise floor; warnings when the anchors misbehave.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from raygpt.config import RunSpec, spec_to_dict, without_userinfo
from raygpt.judge.answers import AnswerSet, answer_of, candidates_of, replicate_groups
from raygpt.judge.client import Outcome, Usage, price_of
from raygpt.judge.prompts import TEMPLATES
from raygpt.stages import EMPTY_ANCHOR, REFERENCE_ANCHOR
from raygpt.stats import (
    bootstrap_mean_ci,
    compact_letter_display,
    holm_adjust,
    item_agreement,
    kendall_tau_b,
    length_controlled,
    mean_ci,
    paired_differences,
    paired_seed_robust,
    position_bias,
    rounded,
    spearman,
    variance_components,
)

if TYPE_CHECKING:  # run.py plans the calls and imports this module to summarise them
    from raygpt.judge.run import JudgeCall

SUMMARY_FORMAT = "raygpt-judge-summary/2"
LEVEL = 0.95

SAMPLES_PER_PAIR = 160
"""The paired comparisons resample items at least this many times per pair of models: a
bootstrap p-value is never below 2 / (samples + 1), and Holm multiplies the smallest by the
number of pairs, so with fewer samples a clear difference among many models could not come
out significant. 160 per pair keeps that floor under a quarter of 0.05."""

EMPTY_ANCHOR_CEILING = 20.0
"""An empty answer that averages this much or more is a judge not reading the answers (the
comparative rubric puts it at 0-9)."""

BATCH_DISCOUNT = 0.5
"""What the Batch API charges per token, as a share of the price of a direct call (OpenAI's)."""


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

    groups = replicate_groups(sets)
    models, cubes, group_items, group_lengths = [], {}, {}, {}
    for name, members in groups.items():
        entry, cube, items, length = _group_entry(name, members, column, scores, per_item, lengths, stats_of, config)
        models.append(entry)
        cubes[name], group_items[name], group_lengths[name] = cube, items, length
    length_coefficient = _add_length_control(models, group_items, group_lengths, per_item, lengths, column,
                                             config.anchors)
    models.sort(key=lambda m: -m["mean"] if m["mean"] is not None else float("inf"))
    anchors = {a: stats_of(a) for a in (REFERENCE_ANCHOR, EMPTY_ANCHOR)} if config.anchors else {}
    comparisons = compare(models, group_items, cubes, config.bootstrap_samples, config.seed)
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
        "length": {"unit": "characters", "reference": "@reference anchor" if config.anchors else "mean over models",
                   "score_points_per_unit": length_coefficient},
        "anchors": anchors,
        "warnings": anchor_warnings(anchors, models, scores, column),
        "item_agreement": _rounded_tree(item_agreement(scores[:, :, model_columns])),
        "rank_agreement": rank_agreement(pass_means[:, model_columns], scores[:, :, model_columns]),
        "position_bias": (_rounded_tree(position_bias(scores, positions, is_model, config.bootstrap_samples,
                                                      config.seed, LEVEL))
                          if config.mode == "comparative" else None),
        "notes": _notes(config, template, models),
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
        "spec": spec_to_dict(config) | {"base_url": without_userinfo(config.base_url)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _group_entry(name: str, members: list[AnswerSet], column: dict[str, int], scores: np.ndarray,
                 per_item: np.ndarray, lengths: np.ndarray, stats_of, config) -> tuple[dict, np.ndarray, np.ndarray,
                                                                                        np.ndarray]:
    """One base model's entry, its scores (seeds, passes, items), per-item means (over seeds
    and passes) and per-item answer lengths (mean over seeds)."""
    cols = [column[m.model] for m in members]
    cube = np.moveaxis(scores[:, :, cols], 2, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        items = np.nanmean(per_item[:, cols], axis=1)
        pass_means = np.nanmean(cube, axis=(0, 2))
    length = lengths[:, cols].mean(axis=1)
    variance = _rounded_tree(variance_components(cube, LEVEL))
    variance.pop("mean")  # the entry's own mean and interval
    if len(members) == 1:
        entry = {"model": name, "base_model": members[0].base_model, "answers": members[0].uri,
                 "seeds": None if members[0].seed is None else [members[0].seed], **stats_of(members[0].model),
                 "ci95_includes_seeds": False}
        entry["item_scores_by_seed"] = [entry["item_scores"]]
    else:
        interval = mean_ci(cube, LEVEL)
        (items_only,) = bootstrap_mean_ci(items[:, None], config.bootstrap_samples, config.seed)
        judged = int(np.sum(~np.isnan(cube)))
        scored = int(np.sum(~np.isnan(items)))
        finite = pass_means[~np.isnan(pass_means)]
        entry = {"model": name, "base_model": members[0].base_model, "answers": [m.uri for m in members],
                 "seeds": [m.seed for m in members], "mean": rounded(interval["mean"]),
                 "ci95": [rounded(v) for v in interval["ci"]], "ci95_includes_seeds": True,
                 "ci95_items": [rounded(v) for v in items_only],
                 "pass_means": [rounded(v) for v in pass_means],
                 "spread": rounded(np.std(finite, ddof=1)) if len(finite) > 1 else None,
                 "judgements": judged, "failures": cube.size - judged, "items_scored": scored,
                 "items_excluded": len(items) - scored, "mean_length": rounded(length.mean()),
                 "item_scores": [rounded(v) for v in items],
                 "item_scores_by_seed": [[rounded(v) for v in per_item[:, k]] for k in cols],
                 "replicates": [{"model": m.model, "seed": m.seed, "answers": m.uri,
                                 **{k: v for k, v in stats_of(m.model).items() if k != "item_scores"}}
                                for m in members]}
    entry["variance"] = variance
    return entry, cube, items, length


def _add_length_control(models: list[dict], group_items: dict, group_lengths: dict, per_item: np.ndarray,
                        lengths: np.ndarray, column: dict[str, int], anchors: bool) -> float | None:
    """Each model's length-controlled score beside its raw one (AlpacaEval 2's regression of the
    score difference to a reference on the length difference; ``stats.length_controlled``).
    Returns the fitted score points per character."""
    if not models:
        return None
    names = [m["model"] for m in models]
    reference = {}
    if anchors:
        k = column[REFERENCE_ANCHOR]
        reference = {"reference_scores": per_item[:, k], "reference_lengths": lengths[:, k]}
    result = length_controlled(np.column_stack([group_items[n] for n in names]),
                               np.column_stack([group_lengths[n] for n in names]), names=names, **reference)
    for m, controlled in zip(models, result["models"]):
        m["length_controlled"] = rounded(controlled["length_controlled"])
        m["mean_length_difference"] = rounded(controlled["mean_length_difference"])
    return rounded(result["length_coefficient"], 6)


def compare(models: list[dict], group_items: dict[str, np.ndarray], cubes: dict[str, np.ndarray], samples: int,
            seed: int) -> dict:
    """Every pair of models (in ranking order): the paired bootstrap over items with Holm's
    adjustment; with replicates, the seed-robust comparison too (its p-values Holm-adjusted
    as well). The letters come from the seed-robust tests when every model has replicates
    (the item bootstrap alone would call run-to-run luck a difference), else from the
    item bootstrap."""
    names = [m["model"] for m in models]
    pairs_count = len(names) * (len(names) - 1) // 2
    samples = max(samples, SAMPLES_PER_PAIR * pairs_count)
    matrix = np.column_stack([group_items[n] for n in names]) if names else np.zeros((0, 0))
    pairs = []
    for d in paired_differences(matrix, samples, seed, LEVEL, names):
        row = {k: rounded(v, 6) if isinstance(v, float) else v for k, v in asdict(d).items()}
        row["ci"] = [rounded(v) for v in d.ci]
        row["sentence"] = _pair_sentence(row)
        pairs.append(row)
    replicated = [n for n in names if cubes[n].shape[0] > 1]
    seed_robust = None
    if replicated:
        seed_robust = [paired_seed_robust(cubes[a], cubes[b], LEVEL, (a, b))
                       for a, b in itertools.combinations(names, 2)]
        for row, p_holm in zip(seed_robust, holm_adjust([np.nan if r["p_value"] is None else r["p_value"]
                                                         for r in seed_robust])):
            row["p_holm"] = rounded(p_holm, 6)
            row["different"] = bool(p_holm < 1 - LEVEL) if row["survives"] is not None else None
        seed_robust = _rounded_tree(seed_robust)
    from_seeds = bool(names) and len(replicated) == len(names)
    basis = seed_robust if from_seeds else pairs
    same = {(r["a"], r["b"]) for r in basis if not r["different"]}
    if from_seeds:
        method = "t tests that include the fine-tuning seed variance, Holm-adjusted"
    else:
        method = "paired bootstrap over items, Holm-adjusted"
    return {"level": LEVEL, "bootstrap_samples": samples, "pairs": pairs, "seed_robust": seed_robust,
            "letters_from": method, "letters": compact_letter_display(names, same)}


def _pair_sentence(row: dict) -> str:
    if row["mean"] is None or row["ci"][0] is None:
        return f"{row['a']} vs {row['b']}: cannot tell, {row['items']} item(s) scored for both"
    verdict = "can be told apart" if row["different"] else "cannot be told apart"
    return (f"{row['a']} - {row['b']}: {row['mean']:+.1f} points ({round(LEVEL * 100)}% CI {row['ci'][0]:+.1f} to "
            f"{row['ci'][1]:+.1f}, Holm-adjusted p {row['p_holm']:.3g} over {row['items']} items): {verdict}")


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


def _notes(config, template, models: list[dict]) -> list[str]:
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
        for note in (m.get("variance") or {}).get("notes", []):
            if m.get("seeds") and len(m["seeds"]) > 1:
                notes.append(f"{m['model']}: {note}")
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


def _money(cost: Any) -> str:
    return "n/a" if cost is None or cost == "n/a" else f"${cost:.4f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_summary(summary: dict, console: Console) -> None:
    judge = summary["judge"]
    table = Table(title=f"IFT scores by {judge['model']} ({judge['mode']}, {judge['passes']} passes, "
                        f"{summary['items']} items)")
    for name, justify in (("model", "left"), ("group", "left"), ("score", "right"), ("95% CI", "right"),
                          ("length-controlled", "right"), ("length", "right"), ("seeds", "right"),
                          ("pass spread", "right"), ("failures", "right"), ("items", "right")):
        table.add_column(name, justify=justify)

    def add(name: str, stats: dict, style: str, letters: str = "", seeds: str = "") -> None:
        low, high = stats["ci95"]
        table.add_row(name, letters, _fmt(stats["mean"]), f"{_fmt(low)} - {_fmt(high)}",
                      _fmt(stats.get("length_controlled")), _fmt(stats.get("mean_length"), 0), seeds,
                      _fmt(stats["spread"]), str(stats["failures"]), f"{stats['items_scored']}/{summary['items']}",
                      style=style)

    for m in summary["models"]:
        add(m["model"], m, "", m.get("letters", ""), str(len(m["seeds"])) if m.get("seeds") else "1")
        for replicate in m.get("replicates") or []:
            add(f"  {replicate['model']}", replicate, "dim")
    for name, stats in summary["anchors"].items():
        add(f"{name} (anchor)", stats, "dim")
    console.print(table)
    comparisons = summary["comparisons"]
    console.print(f"group: models sharing a letter cannot be told apart ({comparisons['letters_from']}, "
                  f"{round(comparisons['level'] * 100)}%)")
    for row in comparisons["pairs"]:
        console.print(f"  over items: {row['sentence']}")
    for row in comparisons["seed_robust"] or []:
        console.print(f"  with the fine-tuning noise: {row['sentence']}")
    for m in summary["models"]:
        line = variance_line(m)
        if line:
            console.print(line)
    agreement, ranks = summary["item_agreement"], summary["rank_agreement"]
    if agreement:
        console.print(f"agreement between passes on the same answers: Spearman {_fmt(agreement['within_item'])} "
                      f"within items, ICC {_fmt(agreement['icc'])}"
                      + (f" (per-pass model means: Spearman {_fmt(ranks['spearman'])}, which averages the noise "
                         f"away)" if ranks else ""))
    bias = summary["position_bias"]
    if bias and bias.get("range") is not None:
        console.print(position_bias_line(bias))
    for warning in summary["warnings"]:
        console.print(f"warning: {warning}", style="yellow")
    calls, usage = summary["calls"], summary["usage"]
    batches = f" in batch {', '.join(calls['batches'])}" if calls.get("batches") else ""
    console.print(f"calls: {calls['made']} made{batches} ({calls['http_attempts']} HTTP attempts), "
                  f"{calls['cache_hits']} from cache, {calls['failed']} failed; tokens: {usage['prompt_tokens']:,} in, "
                  f"{usage['completion_tokens']:,} out; est. cost {_money(usage['cost_usd'])}")
    if calls["failures"]:
        console.print("failures: " + ", ".join(f"{reason} x{n}" for reason, n in calls["failures"].items()),
                      style="yellow")


def variance_line(model: dict) -> str | None:
    """Where a replicated model's score noise comes from, in one line (standard deviations)."""
    if not model.get("seeds") or len(model["seeds"]) < 2:
        return None
    parts = []
    for name, label in (("item", "items"), ("seed", "fine-tuning seeds"), ("seed_item", "seed x item"),
                        ("pass", "judge passes")):
        component = model["variance"]["components"].get(name) or {}
        if component.get("sd") is not None:
            low, high = component["ci_sd"]
            parts.append(f"{label} {component['sd']:.1f} ({_fmt(low, 1)}-{_fmt(high, 1)})")
    return f"{model['model']}: score sd by source, 95% CI: " + ", ".join(parts) if parts else None


def position_bias_line(bias: dict) -> str:
    effects = ", ".join(f"{chr(ord('A') + r['position'])} {r['effect']:+.1f}" for r in bias["by_position"]
                        if r["effect"] is not None)
    low, high = bias["range_ci"]
    return (f"position bias (models only): {bias['range']:.1f} points between the most and least favoured position "
            f"(95% CI {_fmt(low, 1)}-{_fmt(high, 1)}; {_fmt(bias['noise_floor'], 1)} with no bias at all, p "
            f"{_fmt(bias['p_value'], 3)}): {effects}")
