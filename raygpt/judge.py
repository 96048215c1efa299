"""``raygpt judge``: score fine-tuned models' answers with an LLM judge, and say how far to trust it.

The book's chapter-7 judge scores each answer alone; scores made in separate calls share no
calibration, so they need not track model quality. Here, by default (``comparative`` mode),
one call shows the judge every model's answer to one item side by side, with the reference
answer, in an order shuffled per item; ``passes`` repeat it with the orders rotated so each
answer is seen in other positions. Two hidden anchors join the candidates: the reference
answer itself (should score high) and an empty answer (should score low).

What comes out, under ``<judge.output or storage_path/judge>``:
- ``judgements.jsonl``: every call (item, pass, order, label -> model, scores, reasons, raw
  reply, attempts, cached or not, tokens);
- ``summary.json``: per model the mean score, a bootstrap 95% interval over items, the spread
  of the per-pass means and the failures; the anchors; agreement between passes (Spearman,
  Kendall); a position-bias estimate; tokens and cost.

A judgement that still fails after its retries is counted, never averaged in as a zero: an
item with no score for a model leaves that model's mean (each item's score is the mean of its
passes that succeeded), and the count shows how many items did.
"""

from __future__ import annotations

import itertools
import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import PurePosixPath
from typing import Any, Callable

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from raygpt.config import RunSpec, load_spec, spec_to_dict
from raygpt.errors import RaygptError
from raygpt.judge_client import EndpointGone, JudgeCache, JudgeEndpoint, Outcome, Usage, price_of, sampling_settings
from raygpt.judge_prompts import LABELS, TEMPLATES, ReplyError
from raygpt.stats import bootstrap_mean_ci, kendall_tau_b, spearman
from raygpt.storage import Storage, join

SUMMARY_FORMAT = "raygpt-judge-summary/1"
REFERENCE_ANCHOR = "@reference"
EMPTY_ANCHOR = "@empty"
ITEM_FIELDS = ("instruction", "input", "output", "response")


@dataclass
class AnswerSet:
    """One model's answers to the held-out instructions (an answers file of ``raygpt ift``)."""

    model: str
    uri: str
    base_model: str | None
    dataset: dict
    items: list[dict]


@dataclass
class JudgeCall:
    """One request to the judge: which answers, in which order, and its cache key."""

    pass_index: int
    item_index: int
    order: list[str]
    """Candidate ids (models and anchors) in the order shown, labelled A, B, C..."""
    messages: list[dict]
    response_format: dict | None
    seed: int
    key: str

    @property
    def labels(self) -> list[str]:
        return list(LABELS[: len(self.order)])


# ---------------------------------------------------------------------------------------------
# Inputs


def answers_dir(spec: RunSpec) -> str:
    return join(spec.ift.output or join(spec.storage_path, "ift"), "answers")


def judge_dir(spec: RunSpec) -> str:
    return spec.judge.output or join(spec.storage_path, "judge")


def load_answer_sets(spec: RunSpec, storage: Storage) -> list[AnswerSet]:
    """The answers files named in ``judge.answers``, else every ``*.json`` under the IFT output."""
    uris = list(spec.judge.answers)
    if not uris:
        root = answers_dir(spec)
        uris = [join(root, name) for name in storage.list(root) if name.endswith(".json")]
        if not uris:
            raise RaygptError(f"judge: no answers files under {root}: run `raygpt ift` first, "
                              f"or list the files in judge.answers")
    sets = [_read_answer_set(uri, storage) for uri in uris]
    seen: dict[str, str] = {}
    for answers in sets:
        if answers.model in seen:
            raise RaygptError(f"judge: {answers.uri} and {seen[answers.model]} both hold answers of model "
                              f"{answers.model!r}: judge each model once")
        seen[answers.model] = answers.uri
    return sets


def _read_answer_set(uri: str, storage: Storage) -> AnswerSet:
    data = storage.read_json(uri)
    if not isinstance(data, dict) or not isinstance(data.get("items"), list) or not data["items"]:
        raise RaygptError(f"{uri}: not an answers file (expected an object with a non-empty 'items' list)")
    model = data.get("model") or PurePosixPath(uri).stem
    if not isinstance(model, str) or model.startswith("@"):
        raise RaygptError(f"{uri}: model id {model!r} must be a string not starting with '@' (anchors use '@')")
    items = []
    for index, item in enumerate(data["items"]):
        if not isinstance(item, dict):
            raise RaygptError(f"{uri}: item {index} is not an object")
        item = {"input": "", **item}
        for key in ITEM_FIELDS:
            if not isinstance(item.get(key), str):
                raise RaygptError(f"{uri}: item {index}: field {key!r} is missing or not a string")
        items.append(item)
    return AnswerSet(model, uri, data.get("base_model"), data.get("dataset") or {}, items)


def check_aligned(sets: list[AnswerSet]) -> None:
    """All answers files must hold the same items in the same order with the same instruction,
    input and reference: otherwise the models were not asked the same questions. Names the
    first mismatch."""
    first = sets[0]
    for other in sets[1:]:
        for index in range(max(len(first.items), len(other.items))):
            if index >= len(other.items):
                raise RaygptError(f"answers do not line up: {other.uri} has {len(other.items)} items, {first.uri} "
                                  f"has {len(first.items)}: item {index} ({_item_id(first.items[index], index)}) is missing")
            if index >= len(first.items):
                raise RaygptError(f"answers do not line up: {other.uri} has {len(other.items)} items, {first.uri} "
                                  f"has {len(first.items)}: item {index} ({_item_id(other.items[index], index)}) is extra")
            ours, theirs = first.items[index], other.items[index]
            for key in ("id", "instruction", "input", "output"):
                if ours.get(key) != theirs.get(key):
                    raise RaygptError(
                        f"answers do not line up: {other.uri} item {index}: {key} {_clip(theirs.get(key))} differs "
                        f"from {_clip(ours.get(key))} in {first.uri} (same items, same order and same references "
                        f"are needed: generate all answers from one dataset split)")


def _item_id(item: dict, index: int) -> str:
    return f"id {item['id']}" if "id" in item else f"index {index}"


def _clip(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Planning


def candidates_of(sets: list[AnswerSet], anchors: bool) -> list[str]:
    return [s.model for s in sets] + ([REFERENCE_ANCHOR, EMPTY_ANCHOR] if anchors else [])


def answer_of(candidate: str, item_index: int, sets: dict[str, AnswerSet], reference_item: dict) -> str:
    if candidate == REFERENCE_ANCHOR:
        return reference_item["output"]
    if candidate == EMPTY_ANCHOR:
        return ""
    return sets[candidate].items[item_index]["response"]


def presentation_orders(candidates: list[str], items: int, passes: int, seed: int) -> list[list[list[str]]]:
    """orders[pass][item]: a random order per item (seeded by seed and item), rotated by one
    place per pass, so that across passes each answer meets other positions (a Latin square
    when passes equals the number of candidates) and position bias averages out."""
    orders: list[list[list[str]]] = [[] for _ in range(passes)]
    for item in range(items):
        base = [candidates[i] for i in np.random.default_rng([seed, item]).permutation(len(candidates))]
        for p in range(passes):
            shift = p % len(base)
            orders[p].append(base[shift:] + base[:shift])
    return orders


def plan_calls(spec: RunSpec, sets: list[AnswerSet]) -> list[JudgeCall]:
    """Every judge call of the run, in a fixed order, each with its cache key."""
    config = spec.judge
    template = TEMPLATES[config.mode]()
    template_id = f"{template.name}/{template.version}"
    by_model = {s.model: s for s in sets}
    items = sets[0].items
    candidates = candidates_of(sets, config.anchors)
    if config.mode == "comparative" and len(candidates) > len(LABELS):
        raise RaygptError(f"judge: {len(candidates)} candidates per item, at most {len(LABELS)} fit one comparative "
                          f"call: judge fewer models at once or use judge.mode=single")
    calls = []
    orders = presentation_orders(candidates, len(items), config.passes, config.seed)
    for p in range(config.passes):
        seed = config.seed + p
        settings = sampling_settings(config, seed)
        for i, item in enumerate(items):
            groups = [orders[p][i]] if config.mode == "comparative" else [[c] for c in candidates]
            for order in groups:
                answers = [answer_of(c, i, by_model, item) for c in order]
                messages = template.messages(item, answers)
                calls.append(JudgeCall(p, i, order, messages, template.response_format(list(LABELS[: len(order)])),
                                       seed, JudgeCache.key(config.base_url, config.model, template_id, messages, settings)))
    return calls


# ---------------------------------------------------------------------------------------------
# Running


def read_cached(calls: list[JudgeCall], spec: RunSpec, cache: JudgeCache, console: Console) -> list[Outcome | None]:
    """The cached judgement of each call, or None where there is none (or none this template reads)."""
    template = TEMPLATES[spec.judge.mode]()

    def lookup(call: JudgeCall) -> Outcome | None:
        entry = cache.get(call.key)
        if entry is None:
            return None
        try:
            scores = template.parse(entry["reply"], call.labels)
            return Outcome(scores, entry["reply"], entry.get("attempts", 1), Usage(**entry["usage"]), cached=True)
        except (ReplyError, TypeError, KeyError):
            return None

    return _in_parallel(lookup, calls, spec.judge.concurrency, console, "reading the cache")


def judge_calls(calls: list[JudgeCall], spec: RunSpec, cache: JudgeCache, endpoint: JudgeEndpoint,
                console: Console) -> list[Outcome]:
    """Ask the judge, ``judge.concurrency`` calls at a time. Each judgement is cached as soon as
    it arrives, so an interrupted run loses nothing."""
    template = TEMPLATES[spec.judge.mode]()
    template_id = f"{template.name}/{template.version}"

    def judge_one(call: JudgeCall) -> Outcome:
        outcome = endpoint.complete(call.messages, call.response_format, call.seed,
                                    lambda reply: template.parse(reply, call.labels))
        if outcome.scores is not None:
            cache.put(call.key, outcome.reply, outcome.usage, outcome.attempts,
                      {"template": template_id, "model": spec.judge.model, "seed": call.seed})
        return outcome

    return _in_parallel(judge_one, calls, spec.judge.concurrency, console, "judging", on_abort=endpoint.stopping.set)


def _in_parallel(work: Callable[[JudgeCall], Any], calls: list[JudgeCall], concurrency: int, console: Console,
                 what: str, on_abort: Callable[[], None] | None = None) -> list:
    results: list = [None] * len(calls)
    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(what, total=len(calls))
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="judge")
        try:
            futures = {pool.submit(work, call): index for index, call in enumerate(calls)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.advance(task)
        except BaseException:
            # The endpoint gone, or Ctrl-C: start nothing new, cut backoffs short; what finished is cached.
            if on_abort is not None:
                on_abort()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return results


def run_judge(spec: RunSpec, storage: Storage, console: Console | None = None, dry_run: bool = False) -> dict:
    """Judge every answers file of the spec; write judgements.jsonl and summary.json (last).

    Order of work: the API key, then the inputs (aligned?), then the cache, then the endpoint
    (reachable, model served) if anything is left to judge, then the calls: every problem that
    can be found before spending tokens is. A run whose judgements are all cached makes no
    request at all.
    """
    console = console or Console()
    config = spec.judge
    endpoint = None if dry_run else JudgeEndpoint(config)
    sets = load_answer_sets(spec, storage)
    check_aligned(sets)
    calls = plan_calls(spec, sets)
    cache = JudgeCache(config.cache_dir, storage)
    outcomes = read_cached(calls, spec, cache, console)
    missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
    # Identical prompts (in single mode: two models with the same answer, or an empty answer
    # and the empty anchor) are one question: asked once, the copies reuse the reply.
    first_of_key: dict[str, int] = {}
    for i in missing:
        first_of_key.setdefault(calls[i].key, i)
    if dry_run:
        plan = dry_run_plan([calls[i] for i in first_of_key.values()], len(calls), spec)
        console.print(f"judge (dry run): {plan['calls']} calls, {plan['cached']} cached, {plan['to_make']} to make, "
                      f"~{plan['input_tokens_estimate']:,} input tokens, est. cost {_money(plan['cost_estimate_usd'])}")
        return plan
    output = judge_dir(spec)
    storage.check_access(output, write=True)
    started = time.time()
    if missing:
        endpoint.preflight()
        try:
            fresh = judge_calls([calls[i] for i in first_of_key.values()], spec, cache, endpoint, console)
        except EndpointGone as e:
            raise EndpointGone(f"{e}; judging stopped, the judgements made so far are cached: run again to resume") from None
        by_key = dict(zip(first_of_key, fresh))
        for i in missing:
            outcome = by_key[calls[i].key]
            outcomes[i] = outcome if first_of_key[calls[i].key] == i else replace(outcome, cached=True, usage=Usage())
    records = [judgement_record(call, outcome) for call, outcome in zip(calls, outcomes)]
    summary = summarize(spec, sets, calls, outcomes)
    summary["wall_s"] = round(time.time() - started, 3)
    storage.write_text(join(output, "judgements.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    storage.write_json(join(output, "summary.json"), summary)
    render_summary(summary, console)
    console.print(f"judgements: {join(output, 'judgements.jsonl')}\nsummary: {join(output, 'summary.json')}",
                  soft_wrap=True)
    if summary["calls"]["failed"]:
        console.print(f"{summary['calls']['failed']} judgements failed and count as missing, not as zeros: "
                      f"run again to retry only them (the rest is cached)", style="yellow")
    return summary


def dry_run_plan(missing: list[JudgeCall], total: int, spec: RunSpec) -> dict:
    # About 4 characters per token in English: enough to see what a run would cost.
    input_tokens = sum(len(m["content"]) for call in missing for m in call.messages) // 4
    cost = Usage(input_tokens, 0).cost(price_of(spec.judge.model, spec.judge))
    return {"calls": total, "cached": total - len(missing), "to_make": len(missing),
            "input_tokens_estimate": input_tokens, "cost_estimate_usd": cost}


def judgement_record(call: JudgeCall, outcome: Outcome) -> dict:
    labels = dict(zip(call.labels, call.order))
    return {
        "pass": call.pass_index,
        "item": call.item_index,
        "order": call.order,
        "labels": labels,
        "scores": {labels[label]: s.score for label, s in outcome.scores.items()} if outcome.scores else None,
        "reasons": {labels[label]: s.reason for label, s in outcome.scores.items()} if outcome.scores else None,
        "failure": outcome.failure,
        "reply": outcome.reply,
        "attempts": outcome.attempts,
        "cached": outcome.cached,
        "usage": asdict(outcome.usage),
        "seed": call.seed,
        "key": call.key,
    }


# ---------------------------------------------------------------------------------------------
# Statistics


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
            "mean": _num(np.nanmean(per_item[:, k]) if scored_items else np.nan),
            "ci95": [_num(intervals[k][0]), _num(intervals[k][1])],
            "pass_means": [_num(v) for v in pass_means[:, k]],
            "spread": _num(np.std(finite_pass_means, ddof=1)) if len(finite_pass_means) > 1 else None,
            "judgements": judged,
            "failures": passes * n_items - judged,
            "items_scored": scored_items,
            "items_excluded": n_items - scored_items,
            "item_scores": [_num(v) for v in per_item[:, k]],
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
                  "cost_usd": _num(usage_new.cost(price)) if price else "n/a",
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
    rows = [{"position": LABELS[k], "n": int(at[k].sum()), "mean": _num(raw[k]), "effect": _num(effect[k])}
            for k in range(n_positions)]
    effects = [r["effect"] for r in rows if r["effect"] is not None]
    return {"by_position": rows, "range": _num(max(effects) - min(effects)) if effects else None}


def _failure_reasons(outcomes: list[Outcome]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.failure:
            reason = outcome.failure.split(":")[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    return reasons


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else round(value, 4)


def _nanmean_or_none(values: list[float]) -> float | None:
    finite = [v for v in values if not np.isnan(v)]
    return _num(np.mean(finite)) if finite else None


# ---------------------------------------------------------------------------------------------
# Output


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


def judge_command(args) -> int:
    spec = load_spec(args.spec, args.overrides)
    if args.answers:
        spec.judge.answers = list(args.answers)
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a log or a pipe: whole rows, not rows cut to 80 columns
    run_judge(spec, Storage.from_config(spec.storage), console, dry_run=args.dry_run)
    return 0
