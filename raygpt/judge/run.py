"""``raygpt judge``: score fine-tuned models' answers with an LLM judge, and say how far to trust it.

The book's chapter-7 judge scores each answer alone; scores made in separate calls share no
calibration, so they need not track model quality. Here, by default (``comparative`` mode),
one call shows the judge every model's answer to one item side by side, with the reference
answer, in an order shuffled per item; ``passes`` repeat it with the orders rotated so each
answer is seen in other positions. Two hidden anchors join the candidates: the reference
answer itself (should score high) and an empty answer (should score low).

What comes out, under ``<judge.output or storage_path/judge>``:
- ``judgements.jsonl``: every call (item, pass, order, label -> model, scores, reasons, raw
  reply, attempts, cached or not, tokens, the batch that answered it);
- ``summary.json``: the statistics of ``summary``: per base model (or pool of base models,
  ``judge.pools``) the mean score and its 95% interval (with the seed variance when it has
  several runs), letters for the models that cannot be told apart, every pair's difference,
  where the noise comes from, the length-controlled score; the anchors and their warnings; the
  judge's agreement between passes and its position bias; tokens and cost.

The calls (planned in ``calls``) go one by one (``judge.concurrency`` at a time) or, with
``judge.batch``, through the Batch API (``batch``); either way each reply is parsed, validated
and cached alike.

A judgement that still fails after its retries is counted, never averaged in as a zero: an
item with no score for a model leaves that model's mean (each item's score is the mean of its
passes that succeeded), and the count shows how many items did.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from dataclasses import asdict, replace
from typing import Any, Callable

from rich.console import Console
from rich.progress import Progress

from raygpt.config import RunSpec
from raygpt.judge.answers import check_aligned, load_answer_sets
from raygpt.judge.batch import judge_in_batch
from raygpt.judge.calls import JudgeCall, plan_calls
from raygpt.judge.client import (
    BATCH_DISCOUNT,
    EndpointGone,
    JudgeCache,
    JudgeEndpoint,
    Outcome,
    Usage,
    format_cost,
    judge_identity,
    price_of,
)
from raygpt.judge.prompts import TEMPLATES, ReplyError
from raygpt.judge.summary import summarize
from raygpt.judge.wording import render_summary
from raygpt.stages import JUDGE_SUMMARY_FILE, JUDGEMENTS_FILE, judge_dir
from raygpt.storage import Storage, join


def read_cached(calls: list[JudgeCall], spec: RunSpec, cache: JudgeCache, console: Console,
                copy_forward: bool = True) -> list[Outcome | None]:
    """The cached judgement of each call, or None where there is none (or none this template
    reads). One found by its fallback key is copied under its key (``copy_forward``)."""
    template = TEMPLATES[spec.judge.mode]()

    def lookup(call: JudgeCall) -> Outcome | None:
        entry = cache.get(call.key, call.fallback_key, copy_forward)
        if entry is None:
            return None
        try:
            scores = template.parse(entry["reply"], call.labels)
            return Outcome(scores, entry["reply"], entry.get("attempts", 1), Usage(**entry["usage"]), cached=True)
        except (ReplyError, TypeError, KeyError):
            return None

    return _in_parallel(lookup, calls, spec.judge.concurrency, console, "reading the cache")


def judge_calls(calls: list[JudgeCall], spec: RunSpec, cache: JudgeCache, endpoint: JudgeEndpoint,
                console: Console, identity: str | None = None) -> list[Outcome]:
    """Ask the judge, ``judge.concurrency`` calls at a time. Each judgement is cached as soon as
    it arrives, so an interrupted run loses nothing."""
    template = TEMPLATES[spec.judge.mode]()
    template_id = f"{template.name}/{template.version}"

    def judge_one(call: JudgeCall) -> Outcome:
        outcome = endpoint.complete(call.messages, call.response_format, call.seed,
                                    lambda reply: template.parse(reply, call.labels))
        if outcome.scores is not None:
            cache.put(call.key, outcome.reply, outcome.usage, outcome.attempts,
                      {"template": template_id, "model": spec.judge.model, "seed": call.seed, "judge": identity})
        return outcome

    return _in_parallel(judge_one, calls, spec.judge.concurrency, console, "judging", endpoint)


def _in_parallel(work: Callable[[JudgeCall], Any], calls: list[JudgeCall], concurrency: int, console: Console,
                 what: str, endpoint: JudgeEndpoint | None = None) -> list:
    """``work(call)`` for every call, ``concurrency`` at a time, in daemon threads. An error
    (the endpoint gone) or Ctrl-C stops the run: no call starts after it, the ``endpoint``
    sends no request more, the calls in flight are waited for (what they get is cached) and
    the error is raised. A call asleep in the openai client's backoff is not waited for: the
    client's sleep cannot be cut short, and when it wakes it sends nothing and its thread
    (a daemon, which never holds up the process's exit) ends."""
    results: list = [None] * len(calls)
    pending = iter(enumerate(calls))
    lock, stopped = threading.Lock(), threading.Event()
    working = [0]  # calls taken and not yet finished
    finished: queue.Queue = queue.Queue()

    def worker() -> None:
        while not stopped.is_set():
            with lock:
                index, call = next(pending, (None, None))
                working[0] += call is not None
            if call is None:
                return
            try:
                outcome = (index, work(call), None)
            except BaseException as error:  # handed to the main thread, which raises it
                stopped.set()
                outcome = (index, None, error)
            with lock:
                working[0] -= 1
            finished.put(outcome)

    with Progress(console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(what, total=len(calls))
        for _ in range(min(concurrency, len(calls))):
            threading.Thread(target=worker, name="judge", daemon=True).start()
        try:
            for _ in calls:
                index, result, error = finished.get()
                if error is not None:
                    raise error
                results[index] = result
                progress.advance(task)
        except BaseException:
            stopped.set()
            if endpoint is not None:
                endpoint.stopping.set()
                while working[0] > endpoint.waiting_to_retry():
                    time.sleep(0.05)
            raise
    return results


def run_judge(spec: RunSpec, storage: Storage, console: Console | None = None, dry_run: bool = False) -> dict:
    """Judge every answers file of the spec; write judgements.jsonl and summary.json (last).

    Order of work: the API key, then the inputs (aligned?), then the cache, then the endpoint
    (reachable, model served, who it is) if anything is left to judge, then the calls: every
    problem that can be found before spending tokens is. A run whose judgements are all cached
    makes no request at all.

    The cache is read under the judge's identity when it is known without asking (the spec's
    ``judge.identity``, OpenAI, or the identity last found at this address), else under the
    address. When calls are left, the preflight asks the endpoint who it is; if that is a
    judge not known before, the cache is read once more under its identity, so the same judge
    reached at a new address pays for nothing it already judged.
    """
    console = console or Console()
    config = spec.judge
    endpoint = None if dry_run else JudgeEndpoint(config)
    sets = load_answer_sets(spec, storage)
    check_aligned(sets)
    cache = JudgeCache(config.cache_dir, storage)
    identity = _known_identity(config, cache)
    calls = plan_calls(spec, sets, identity)
    outcomes = read_cached(calls, spec, cache, console, copy_forward=not dry_run)
    missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if dry_run:
        plan = dry_run_plan([calls[i] for i in _first_of_key(calls, missing).values()], len(calls), spec)
        console.print(f"judge (dry run): {plan['calls']} calls, {plan['cached']} cached, {plan['to_make']} to make, "
                      f"~{plan['input_tokens_estimate']:,} input tokens, est. cost {format_cost(plan['cost_estimate_usd'])}")
        return plan
    output = judge_dir(spec)
    storage.check_access(output, write=True)
    started = time.time()
    if missing:
        listed = endpoint.preflight()
        found = judge_identity(config, listed)
        if config.base_url and not config.identity:
            cache.remember_identity(config.base_url, config.model, found, listed)
        if found != identity:
            identity = found
            calls = plan_calls(spec, sets, identity)
            outcomes = read_cached(calls, spec, cache, console)
            missing = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if missing:
        # Identical prompts (in single mode: two models with the same answer, or an empty answer
        # and the empty anchor) are one question: asked once, the copies reuse the reply.
        first_of_key = _first_of_key(calls, missing)
        unique = [calls[i] for i in first_of_key.values()]
        try:
            if config.batch:
                fresh = judge_in_batch(unique, spec, cache, endpoint, storage, console, identity)
            else:
                fresh = judge_calls(unique, spec, cache, endpoint, console, identity)
        except EndpointGone as e:
            raise EndpointGone(f"{e}; judging stopped, the judgements made so far are cached: run again to resume") from None
        by_key = dict(zip(first_of_key, fresh))
        for i in missing:
            outcome = by_key[calls[i].key]
            outcomes[i] = outcome if first_of_key[calls[i].key] == i else replace(outcome, cached=True, usage=Usage())
    records = [judgement_record(call, outcome) for call, outcome in zip(calls, outcomes)]
    summary = summarize(spec, sets, calls, outcomes, identity)
    summary["wall_s"] = round(time.time() - started, 3)
    storage.write_text(join(output, JUDGEMENTS_FILE), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    storage.write_json(join(output, JUDGE_SUMMARY_FILE), summary)
    render_summary(summary, console)
    console.print(f"judgements: {join(output, JUDGEMENTS_FILE)}\nsummary: {join(output, JUDGE_SUMMARY_FILE)}",
                  soft_wrap=True)
    if summary["calls"]["failed"]:
        console.print(f"{summary['calls']['failed']} judgements failed and count as missing, not as zeros: "
                      f"run again to retry only them (the rest is cached)", style="yellow")
    return summary


def _known_identity(config, cache: JudgeCache) -> str | None:
    """The judge's identity where it is known without a request: named in the spec, OpenAI, or
    remembered from the last preflight at this address; else None (the cache is read by address)."""
    if config.identity or not config.base_url:
        return judge_identity(config, None)
    _, remembered = cache.remembered_identity(config.base_url, config.model)
    return remembered


def _first_of_key(calls: list[JudgeCall], indices: list[int]) -> dict[str, int]:
    first: dict[str, int] = {}
    for i in indices:
        first.setdefault(calls[i].key, i)
    return first


def dry_run_plan(missing: list[JudgeCall], total: int, spec: RunSpec) -> dict:
    # About 4 characters per token in English: enough to see what a run would cost.
    input_tokens = sum(len(m["content"]) for call in missing for m in call.messages) // 4
    cost = Usage(input_tokens, 0).cost(price_of(spec.judge.model, spec.judge))
    if cost is not None and spec.judge.batch:
        cost *= BATCH_DISCOUNT
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
        "batch": outcome.batch,
        "usage": asdict(outcome.usage),
        "seed": call.seed,
        "variant": call.variant,
        "key": call.key,
    }
