"""The judge's statistics in words: the sentences ``summary.json`` carries, and its terminal table.

``raygpt.stats`` returns numbers (and codes for what it could not estimate or refused); the
sentences here say what they mean for a reader, once, so the terminal, ``summary.json`` and
``raygpt report`` say the same thing.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from raygpt.judge.client import format_cost
from raygpt.stats.judge_checks import SCORE_RANGE
from raygpt.stats.variance import PRETRAINING

LEVEL = 0.95
"""The judge's confidence level: of its intervals, its tests, and the sentences that state them."""
PERCENT = round(LEVEL * 100)


def pair_sentence(row: dict) -> str:
    """One pair of the item bootstrap (``stats.resampling.paired_differences``), Holm-adjusted."""
    if row["mean"] is None or row["ci"][0] is None:
        return f"{row['a']} vs {row['b']}: cannot tell, {row['items']} item(s) scored for both"
    verdict = "can be told apart" if row["different"] else "cannot be told apart"
    return (f"{row['a']} - {row['b']}: {row['mean']:+.1f} points ({PERCENT}% CI {row['ci'][0]:+.1f} to "
            f"{row['ci'][1]:+.1f}, Holm-adjusted p {row['p_holm']:.3g} over {row['items']} items): {verdict}")


def _seed_noun(level: str) -> str:
    return "pretraining seeds" if level == PRETRAINING else "fine-tuning seeds"


def seed_robust_sentence(row: dict) -> str:
    """One pair with the seed variance in its interval (``stats.variance.paired_seed_robust``)."""
    a, b = row["a"], row["b"]
    if row["difference"] is None or row["ci"][0] is None:
        return f"{a} vs {b}: cannot tell, {row['items']} item(s) scored for both"
    low, high = row["ci"]
    noise = "fine-tuning noise" if PRETRAINING not in row["unit_levels"] else "seed noise"
    head = f"{a} - {b}: {row['difference']:+.1f} points ({PERCENT}% CI {low:+.1f} to {high:+.1f}"
    single = [name for name, units in zip((a, b), row["seeds"]) if units < 2]
    if single:
        return (f"{head}, without the seed variance of {' and '.join(single)}): cannot tell whether it survives "
                f"{noise}, {' and '.join(single)} fine-tuned with one seed")
    (units_a, units_b), (level_a, level_b) = row["seeds"], row["unit_levels"]
    if level_a == level_b:
        seeds = (f"{units_a} {_seed_noun(level_a)} each" if units_a == units_b
                 else f"{units_a} and {units_b} {_seed_noun(level_a)}")
    else:
        seeds = f"{units_a} {_seed_noun(level_a)} and {units_b} {_seed_noun(level_b)}"
    verdict = f"survives {noise}" if row["survives"] else f"does not survive {noise} (the interval holds 0)"
    return f"{head}, with {seeds}): the difference {verdict}"


LIMIT_NOTES = {
    "too few items": "fewer than two items with a score from every run: nothing can be estimated",
    "one run": ("one fine-tuning seed: the seed variance cannot be estimated (the interval of the mean leaves it "
                "out) and the item variance includes how this one run answered each item"),
    "one pass": ("one judge pass per answer: the judge's pass noise and the seed-by-item variance cannot be told "
                 "apart (both None; together they are in the variance of the mean)"),
    "fine-tuning confounded": ("each pretraining seed fine-tuned once: the fine-tuning seed variance is part of "
                               "the pretraining seed variance (both are in the interval)"),
}
"""What ``stats.variance.variance_components``'s ``limits`` mean."""


def variance_notes(model: dict) -> list[str]:
    """A replicated model's or pool's decomposition limits, in words."""
    variance = model.get("variance") or {}
    if (variance.get("seeds") or 1) < 2:
        return []
    notes = [f"{model['model']}: {LIMIT_NOTES[limit]}" for limit in variance.get("limits", [])]
    if variance.get("items_dropped"):
        notes.append(f"{model['model']}: {variance['items_dropped']} item(s) left out: no score from some run")
    return notes


REFUSALS = {
    "effect beyond the score range": "the length adjustment of {biggest} reaches {adjustment:.0f} points, more than "
                                     "the whole {low:.0f}-{high:.0f} scale",
    "slope too uncertain": "the {percent}% interval of {widest}'s length adjustment is {width:.0f} points wide",
    "no length variation within models": "answer lengths do not vary within models, so no length effect can be "
                                         "fitted",
}
"""Why ``stats.judge_checks.length_controlled`` withheld the length-controlled scores."""


def length_sentences(length: dict, models: list[dict], unit: str) -> list[str]:
    """The length control in words: the slope, why scores are withheld or clipped, and its limits."""
    sentences = []
    slope, (slope_low, slope_high) = length["score_points_per_unit"], length["coefficient_ci95"]
    if slope is not None:
        interval = (f", {PERCENT}% CI {slope_low * 100:+.2f} to {slope_high * 100:+.2f}"
                    if slope_low is not None and slope_high is not None else "")
        sentences.append(f"length-controlled: each model's score at the reference's answer length; the judge gives "
                         f"{slope * 100:+.2f} points per 100 {unit}{interval} (reference: {length['reference']})")
    adjusted = [m for m in models if m.get("length_adjustment") is not None]
    reasons = []
    for code in length["refused"]:
        low, high = SCORE_RANGE
        biggest = max(adjusted, key=lambda m: abs(m["length_adjustment"]), default=None)
        widest = max(adjusted, key=lambda m: _width(m["length_adjustment_ci95"]), default=None)
        reasons.append(REFUSALS[code].format(
            low=low, high=high, percent=PERCENT, biggest=biggest and biggest["model"],
            adjustment=abs(biggest["length_adjustment"]) if biggest else 0, widest=widest and widest["model"],
            width=_width(widest["length_adjustment_ci95"]) if widest else 0))
    if reasons:
        sentences.append("length-controlled scores withheld: " + "; ".join(reasons))
    if length["little_within_model_variation"]:
        sentences.append(f"answer length varies little within models (sd {length['within_model_spread'] * 100:.1f}% "
                         f"of the mean length): too little to tell its effect apart from quality, so a "
                         f"length-controlled score would not mean much")
    clipped = [m["model"] for m in models if m.get("length_clipped")]
    if clipped:
        sentences.append(f"length-controlled score clipped to the {SCORE_RANGE[0]:.0f}-{SCORE_RANGE[1]:.0f} scale for "
                         f"{', '.join(clipped)}")
    if slope is not None:
        sentences.append("length control cannot tell a judge that rewards length from answers that are longer "
                         "because they are better: where length follows quality within each model, it takes true "
                         "differences away")
    return sentences


def _width(ci: list[float | None]) -> float:
    low, high = ci
    return high - low if low is not None and high is not None else 0.0


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _runs_label(model: dict) -> str:
    if model.get("pool"):
        runs = len(model.get("replicates") or [])
        return f"{runs} ({len(model['pool'])} pretraining)"
    return str(len(model["seeds"])) if model.get("seeds") else "1"


def render_summary(summary: dict, console: Console) -> None:
    judge = summary["judge"]
    table = Table(title=f"IFT scores by {judge['model']} ({judge['mode']}, {judge['passes']} passes, "
                        f"{summary['items']} items)")
    for name, justify in (("model", "left"), ("group", "left"), ("score", "right"), ("95% CI", "right"),
                          ("length-controlled", "right"), ("length", "right"), ("runs", "right"),
                          ("pass spread", "right"), ("failures", "right"), ("items", "right")):
        table.add_column(name, justify=justify)

    def add(name: str, stats: dict, style: str, letters: str = "", runs: str = "") -> None:
        low, high = stats["ci95"]
        table.add_row(name, letters, _fmt(stats["mean"]), f"{_fmt(low)} - {_fmt(high)}",
                      _fmt(stats.get("length_controlled")), _fmt(stats.get("mean_length"), 0), runs,
                      _fmt(stats["spread"]), str(stats["failures"]), f"{stats['items_scored']}/{summary['items']}",
                      style=style)

    for m in summary["models"]:
        add(m["model"], m, "", m.get("letters", ""), _runs_label(m))
        for replicate in m.get("replicates") or []:
            add(f"  {replicate['model']}", replicate, "dim")
    for name, stats in summary["anchors"].items():
        add(f"{name} (anchor)", stats, "dim")
    console.print(table)
    comparisons = summary["comparisons"]
    console.print(f"group: models sharing a letter cannot be told apart ({comparisons['letters_from']}, {PERCENT}%)")
    for row in comparisons["pairs"]:
        console.print(f"  over items: {row['sentence']}")
    for row in comparisons["seed_robust"] or []:
        console.print(f"  with the seed noise: {row['sentence']}")
    for m in summary["models"]:
        line = variance_line(m)
        if line:
            console.print(line)
    for sentence in summary["length"]["sentences"]:
        console.print(sentence)
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
                  f"{usage['completion_tokens']:,} out; est. cost {format_cost(usage['cost_usd'])}")
    if calls["failures"]:
        console.print("failures: " + ", ".join(f"{reason} x{n}" for reason, n in calls["failures"].items()),
                      style="yellow")


SOURCES = (("item", "items"), (PRETRAINING, "pretraining seeds"), ("pretraining_item", "pretraining seed x item"),
           ("seed", "fine-tuning seeds"), ("seed_item", "seed x item"), ("pass", "judge passes"))
"""The variance components in the order a reader meets them, and their names in words."""


def variance_line(model: dict) -> str | None:
    """Where a replicated model's or pool's score noise comes from, in one line (standard deviations)."""
    variance = model.get("variance") or {}
    if (variance.get("seeds") or 1) < 2:
        return None
    parts = []
    for name, label in SOURCES:
        component = variance["components"].get(name) or {}
        if component.get("sd") is not None:
            low, high = component["ci_sd"]
            parts.append(f"{label} {component['sd']:.1f} ({_fmt(low, 1)}-{_fmt(high, 1)})")
    return f"{model['model']}: score sd by source, {PERCENT}% CI: " + ", ".join(parts) if parts else None


def position_bias_line(bias: dict) -> str:
    effects = ", ".join(f"{chr(ord('A') + r['position'])} {r['effect']:+.1f}" for r in bias["by_position"]
                        if r["effect"] is not None)
    low, high = bias["range_ci"]
    return (f"position bias (models only): {bias['range']:.1f} points between the most and least favoured position "
            f"({PERCENT}% CI {_fmt(low, 1)}-{_fmt(high, 1)}; {_fmt(bias['noise_floor'], 1)} with no bias at all, p "
            f"{_fmt(bias['p_value'], 3)}): {effects}")
