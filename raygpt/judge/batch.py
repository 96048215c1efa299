"""The Batch API path of ``raygpt judge`` (``judge.batch: true``): half the price, answered within 24 h.

The calls the cache lacks go into one JSONL file, a line per call (``custom_id``: the call's
cache key; ``body``: what a direct call would send), uploaded through ``/v1/files``; one batch
through ``/v1/batches`` answers it, looked at every ``judge.batch_poll_s``. The batch's id is
written to ``<judge output>/batch.json`` as soon as it exists, so a run that stops while it
waits (Ctrl-C, a lost job, ``judge.batch_wait_s``) finds it there and polls the same batch
again instead of buying its judgements twice. Every answered line goes through the
template's parser and into the cache as a direct reply does. A line that failed or did not
parse is a failure of this run (counted, not cached), asked again by the next run.
"""

from __future__ import annotations

import json
import time

from rich.console import Console

from raygpt.config import RunSpec, without_userinfo
from raygpt.errors import RaygptError
from raygpt.judge.calls import JudgeCall
from raygpt.judge.client import JudgeCache, JudgeEndpoint, Outcome, Usage
from raygpt.judge.prompts import LABELS, TEMPLATES, ReplyError
from raygpt.stages import judge_dir
from raygpt.storage import Storage, join

BATCH_STATE_FILE = "batch.json"
CHAT_ENDPOINT = "/v1/chat/completions"
MAX_LINES = 50_000
"""The most requests OpenAI takes in one batch."""
RUNNING = {"validating", "in_progress", "finalizing", "cancelling"}


class BatchPending(RaygptError):
    """The batch is still running when the run stops waiting: its id is saved, a re-run collects it."""


def judge_in_batch(calls: list[JudgeCall], spec: RunSpec, cache: JudgeCache, endpoint: JudgeEndpoint,
                   storage: Storage, console: Console, identity: str | None = None) -> list[Outcome]:
    """Outcomes of ``calls`` (distinct cache keys) from the Batch API: first from the batch an
    earlier run left running, if any, then from one new batch for what is still missing."""
    state_uri = join(judge_dir(spec), BATCH_STATE_FILE)
    outcomes: dict[str, Outcome] = {}
    state = _saved_state(state_uri, storage, spec, console)
    if state is not None:
        console.print(f"resuming batch {state['batch_id']} ({len(state['requests'])} requests), saved in {state_uri}")
        outcomes.update(_collect(state, state_uri, spec, cache, endpoint, storage, console, identity))
    left = [call for call in calls if call.key not in outcomes]
    if left:
        state = _submit(left, spec, endpoint, storage, state_uri, console)
        outcomes.update(_collect(state, state_uri, spec, cache, endpoint, storage, console, identity))
    return [outcomes.get(call.key) or Outcome(None, None, 0, failure="no answer: the batch ended without this request")
            for call in calls]


def _saved_state(state_uri: str, storage: Storage, spec: RunSpec, console: Console) -> dict | None:
    """The batch an earlier run left, if it was sent to this endpoint and model."""
    if not storage.exists(state_uri):
        return None
    try:
        state = storage.read_json(state_uri)
    except (RaygptError, UnicodeDecodeError):
        state = None
    if not isinstance(state, dict) or not state.get("batch_id") or not isinstance(state.get("requests"), dict):
        console.print(f"{state_uri} is not a batch record: a new batch is sent", style="yellow")
        return None
    here = {"endpoint": _endpoint_name(spec), "model": spec.judge.model}
    if {k: state.get(k) for k in here} != here:
        console.print(f"{state_uri}: batch {state['batch_id']} went to {state.get('model')} at {state.get('endpoint')}, "
                      f"not {here['model']} at {here['endpoint']}: left alone, a new batch is sent", style="yellow")
        return None
    return state


def _endpoint_name(spec: RunSpec) -> str:
    return without_userinfo(spec.judge.base_url) or "openai"


def _submit(calls: list[JudgeCall], spec: RunSpec, endpoint: JudgeEndpoint, storage: Storage, state_uri: str,
            console: Console) -> dict:
    """Upload the requests and create the batch; its record is saved before anything else."""
    if len(calls) > MAX_LINES:
        raise RaygptError(f"judge.batch: {len(calls)} calls to make, a batch takes at most {MAX_LINES:,}: judge "
                          f"fewer models or items per run (what is judged is cached), or set judge.batch=false")
    template = TEMPLATES[spec.judge.mode]()
    lines = [json.dumps({"custom_id": call.key, "method": "POST", "url": CHAT_ENDPOINT,
                         "body": endpoint.request_body(call.messages, call.response_format, call.seed)},
                        ensure_ascii=False) for call in calls]
    data = ("\n".join(lines) + "\n").encode()
    client = endpoint.client
    uploaded = endpoint.api("uploading the batch input",
                            lambda: client.files.create(file=("raygpt-judge-batch.jsonl", data), purpose="batch"))
    batch = endpoint.api("creating the batch", lambda: client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT_ENDPOINT, completion_window="24h",
        metadata={"raygpt": "judge", "spec": spec.name}))
    state = {"batch_id": batch.id, "input_file_id": uploaded.id, "endpoint": _endpoint_name(spec),
             "model": spec.judge.model, "template": f"{template.name}/{template.version}",
             "requests": {call.key: {"labels": len(call.order), "seed": call.seed} for call in calls},
             "created": time.time()}
    storage.write_json(state_uri, state)
    console.print(f"batch {batch.id}: {len(calls)} requests sent ({len(data):,} bytes); its id is saved in {state_uri}",
                  soft_wrap=True)
    return state


def _collect(state: dict, state_uri: str, spec: RunSpec, cache: JudgeCache, endpoint: JudgeEndpoint,
             storage: Storage, console: Console, identity: str | None) -> dict[str, Outcome]:
    """Wait for the batch to end, then parse and cache its answers; the record goes once read."""
    batch = _wait(state, state_uri, spec, endpoint, console)
    if batch.status == "failed":
        storage.delete(state_uri)
        errors = [f"line {e.line}: {e.code}: {endpoint.redact(e.message or '')}" if e.line else
                  f"{e.code}: {endpoint.redact(e.message or '')}" for e in ((batch.errors and batch.errors.data) or [])]
        raise RaygptError(f"judge batch {batch.id} failed validation: {'; '.join(errors[:5]) or 'no reason given'}")
    template = TEMPLATES[spec.judge.mode]()
    template_id = f"{template.name}/{template.version}"
    if state.get("template") != template_id:
        console.print(f"batch {batch.id} was asked with template {state.get('template')}, this run uses "
                      f"{template_id}: its answers are not read", style="yellow")
        storage.delete(state_uri)
        return {}
    outcomes: dict[str, Outcome] = {}
    for file_id in (batch.output_file_id, batch.error_file_id):
        if not file_id:
            continue
        text = endpoint.api("downloading the batch results",
                            lambda file_id=file_id: endpoint.client.files.content(file_id)).text
        for line in text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            request = state["requests"].get(record.get("custom_id"))
            if request is None:
                continue
            outcome = _outcome_of(record, template, request["labels"], batch.id, endpoint)
            outcomes[record["custom_id"]] = outcome
            if outcome.scores is not None:
                cache.put(record["custom_id"], outcome.reply, outcome.usage, outcome.attempts,
                          {"template": template_id, "model": spec.judge.model, "seed": request["seed"],
                           "judge": identity, "batch": batch.id})
    if batch.status != "completed":
        console.print(f"batch {batch.id} {batch.status}: {len(outcomes)} of {len(state['requests'])} requests "
                      f"answered; the others count as failures (run again to ask them again)", style="yellow")
    storage.delete(state_uri)
    return outcomes


def _wait(state: dict, state_uri: str, spec: RunSpec, endpoint: JudgeEndpoint, console: Console):
    """Poll until the batch ends; BatchPending after ``judge.batch_wait_s``, and on Ctrl-C a
    note that the batch keeps running (its record stays)."""
    config = spec.judge
    started, shown = time.monotonic(), None
    batch_id = state["batch_id"]
    try:
        while True:
            batch = endpoint.api("polling the batch", lambda: endpoint.client.batches.retrieve(batch_id),
                                 missing_ok=True)
            if batch is None:
                raise RaygptError(f"judge endpoint {endpoint.where} does not know batch {batch_id} (saved in "
                                  f"{state_uri}): delete that file to send a new batch")
            counts = batch.request_counts
            answered = f"{counts.completed + counts.failed}/{counts.total}" if counts and counts.total else ""
            progress = f", {answered} answered" if answered else ""
            line = f"batch {batch_id}: {batch.status}{progress}"
            if line != shown:
                console.print(line)
                shown = line
            if batch.status not in RUNNING:
                return batch
            waited = time.monotonic() - started
            if config.batch_wait_s is not None and waited + config.batch_poll_s > config.batch_wait_s:
                raise BatchPending(f"judge batch {batch_id} is still {batch.status}{progress} after {waited:.0f} s "
                                   f"(judge.batch_wait_s); its id is saved in {state_uri}: run again to collect it")
            if endpoint.stopping.wait(config.batch_poll_s):
                raise RaygptError(f"judging stopped; batch {batch_id} keeps running, run again to collect it")
    except KeyboardInterrupt:
        console.print(f"batch {batch_id} keeps running on the endpoint; its id is saved in {state_uri}: run again "
                      f"to collect it", style="yellow")
        raise


def _outcome_of(record: dict, template, labels: int, batch_id: str, endpoint: JudgeEndpoint) -> Outcome:
    """One batch line as a direct call's outcome: the scores, or why there are none."""
    response = record.get("response") or {}
    body = response.get("body") or {}
    status = response.get("status_code")
    if status != 200 or record.get("error"):
        error = record.get("error") or (body.get("error") if isinstance(body, dict) else None) or {}
        message = endpoint.redact(str(error.get("message", "") if isinstance(error, dict) else error))
        first_line = (message.splitlines() or [""])[0][:200]
        return Outcome(None, None, 1, failure=f"request rejected: status {status} in batch {batch_id}: {first_line}",
                       batch=batch_id)
    reported = body.get("usage") or {}
    usage = Usage(reported.get("prompt_tokens") or 0, reported.get("completion_tokens") or 0)
    choices = body.get("choices") or []
    reply = (choices[0].get("message") or {}).get("content") if choices else None
    try:
        if not reply:
            raise ReplyError("empty reply")
        return Outcome(template.parse(reply, list(LABELS[:labels])), reply, 1, usage, batch=batch_id)
    except ReplyError as e:
        return Outcome(None, None, 1, usage, failure=f"unparseable reply: {e} (in batch {batch_id})", batch=batch_id)
