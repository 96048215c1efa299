"""The statistics of a judge run: per-model means with bootstrap intervals, pass agreement,
position bias, failures, tokens and cost; and the terminal table of them.
"""

from __future__ import annotations

import itertools
import time
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from raygpt.config import RunSpec, spec_to_dict
from raygpt.judge.answers import AnswerSet, candidates_of
from raygpt.judge.client import Outcome, Usage, price_of
from raygpt.judge.prompts import LABELS, TEMPLATES
from raygpt.stages import EMPTY_ANCHOR, REFERENCE_ANCHOR
from raygpt.stats import bootstrap_mean_ci, kendall_tau_b, rounded, spearman

if TYPE_CHECKING:  # run.py plans the calls and imports this module to summarise them
    from raygpt.judge.run import JudgeCall

SUMMARY_FORMAT = "raygpt-judge-summary/1"


def summarize(spec: RunSpec, sets: list[AnswerSet], calls: list[JudgeCall], outcomes: list[Outcome]) -> dict:
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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no scores is nan, as intended
        per_item = np.nanmean(scores, axis=0)  # (items, candidates): each item's mean over its passes
        pass_means = np.nanmean(scores, axis=1)  # (passes, candidates)
    intervals = bootstrap_mean_ci(per_item, config.bootstrap_samples, config.seed)
    item_ids = [str(item.get("id", i)) for i, item in enumerate(sets[0].items)]

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
            "item_scores": [rounded(v) for v in per_item[:, k]],
        }

    models = []
    for answers in sets:
        models.append({"model": answers.model, "base_model": answers.base_model, "answers": answers.uri,
                       **stats_of(answers.model)})
    models.sort(key=lambda m: -m["mean"] if m["mean"] is not None else float("inf"))
    anchors = {a: stats_of(a) for a in (REFERENCE_ANCHOR, EMPTY_ANCHOR)} if config.anchors else {}

    usage_new, usage_cached = Usage(), Usage()
    for outcome in outcomes:
        (usage_cached if outcome.cached else usage_new).add(outcome.usage)
    price = price_of(config.model, config)
    made = [o for o in outcomes if not o.cached]
    return {
        "format": SUMMARY_FORMAT,
        "judge": {"model": config.model, "endpoint": config.base_url or "https://api.openai.com/v1",
                  "mode": config.mode, "template": f"{template.name}/{template.version}",
                  "temperature": config.temperature, "seed": config.seed, "max_tokens": config.max_tokens,
                  "passes": passes, "anchors": config.anchors, "bootstrap_samples": config.bootstrap_samples},
        "dataset": sets[0].dataset,
        "items": n_items,
        "item_ids": item_ids,
        "models": models,
        "ranking": [m["model"] for m in models],
        "anchors": anchors,
        "rank_agreement": rank_agreement(pass_means[:, : len(sets)], scores[:, :, : len(sets)]),
        "position_bias": position_bias(scores, positions) if config.mode == "comparative" else None,
        "calls": {"total": len(outcomes), "made": len(made), "cache_hits": len(outcomes) - len(made),
                  "failed": sum(o.scores is None for o in outcomes),
                  "http_attempts": sum(o.attempts for o in made),
                  "failures": _failure_reasons(outcomes)},
        "usage": {"prompt_tokens": usage_new.prompt_tokens, "completion_tokens": usage_new.completion_tokens,
                  "cost_usd": rounded(usage_new.cost(price)) if price else "n/a",
                  "cached_prompt_tokens": usage_cached.prompt_tokens,
                  "cached_completion_tokens": usage_cached.completion_tokens,
                  "price_per_mtok": list(price) if price else "n/a"},
        "spec": spec_to_dict(config),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def rank_agreement(pass_means: np.ndarray, scores: np.ndarray) -> dict | None:
    """How much the passes agree, for the models (anchors left out: they agree trivially).

    ``spearman``/``kendall``: between two passes' rankings of the models by mean score,
    averaged over all pairs of passes. ``item_kendall``: between two passes' orderings of the
    answers to the same item, averaged over items and pairs: the judge's consistency when only
    the presentation order changed. None with fewer than two passes or two models.
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


def position_bias(scores: np.ndarray, positions: np.ndarray) -> dict:
    """How much the position an answer is shown in moves its score.

    ``mean``: the raw mean score at each position. ``effect``: the position's pull relative to
    the average position, fitted as score = quality(item, answer) + effect(position) by least
    squares (backfitting), which takes each answer's quality out; this needs the same answer
    seen in several positions, so with one pass it is the raw mean minus the overall mean
    (unbiased too, as orders are random, but noisier).
    """
    observed = ~np.isnan(scores)
    slot = np.where(np.isnan(positions), -1, positions).astype(int)
    n_positions = int(slot.max()) + 1
    at = [(slot == k) & observed for k in range(n_positions)]
    raw = np.array([scores[mask].mean() if mask.any() else np.nan for mask in at])
    if scores.shape[0] < 2:
        effect = raw - scores[observed].mean()
    else:
        effect = np.zeros(n_positions)
        for _ in range(200):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                quality = np.nanmean(scores - effect[slot], axis=0)
            residual = scores - quality[None]
            updated = np.array([residual[mask].mean() if mask.any() else 0.0 for mask in at])
            updated -= updated.mean()
            converged = np.abs(updated - effect).max() < 1e-6
            effect = updated
            if converged:
                break
    rows = [{"position": LABELS[k], "n": int(at[k].sum()), "mean": rounded(raw[k]), "effect": rounded(effect[k])}
            for k in range(n_positions)]
    effects = [r["effect"] for r in rows if r["effect"] is not None]
    return {"by_position": rows, "range": rounded(max(effects) - min(effects)) if effects else None}


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


def _money(cost: Any) -> str:
    return "n/a" if cost is None or cost == "n/a" else f"${cost:.4f}"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_summary(summary: dict, console: Console) -> None:
    judge = summary["judge"]
    table = Table(title=f"IFT scores by {judge['model']} ({judge['mode']}, {judge['passes']} passes, "
                        f"{summary['items']} items)")
    for name, justify in (("model", "left"), ("score", "right"), ("95% CI", "right"), ("pass spread", "right"),
                          ("failures", "right"), ("items", "right")):
        table.add_column(name, justify=justify)
    rows = [(m["model"], m, "") for m in summary["models"]]
    rows += [(f"{name} (anchor)", stats, "dim") for name, stats in summary["anchors"].items()]
    for name, stats, style in rows:
        low, high = stats["ci95"]
        table.add_row(name, _fmt(stats["mean"]), f"{_fmt(low)} - {_fmt(high)}", _fmt(stats["spread"]),
                      str(stats["failures"]), f"{stats['items_scored']}/{summary['items']}", style=style)
    console.print(table)
    agreement = summary["rank_agreement"]
    if agreement:
        console.print(f"agreement between passes: Spearman {_fmt(agreement['spearman'])}, Kendall "
                      f"{_fmt(agreement['kendall'])} (model ranking); Kendall {_fmt(agreement['item_kendall'])} "
                      f"(answers to the same item)")
    bias = summary["position_bias"]
    if bias:
        by_position = ", ".join(f"{r['position']} {r['effect']:+.1f}" for r in bias["by_position"] if r["effect"] is not None)
        console.print(f"position bias (score points vs. the average position): {by_position}")
    calls, usage = summary["calls"], summary["usage"]
    console.print(f"calls: {calls['made']} made ({calls['http_attempts']} HTTP attempts), {calls['cache_hits']} from "
                  f"cache, {calls['failed']} failed; tokens: {usage['prompt_tokens']:,} in, "
                  f"{usage['completion_tokens']:,} out; est. cost {_money(usage['cost_usd'])}")
    if calls["failures"]:
        console.print("failures: " + ", ".join(f"{reason} x{n}" for reason, n in calls["failures"].items()),
                      style="yellow")
