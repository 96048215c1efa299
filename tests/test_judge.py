"""The judge: the real ``openai`` client against a scripted OpenAI-compatible server on loopback.

The fake server scores answers deterministically (``<q=NN>`` markers, the reference, the empty
answer), so scores and rankings are known exactly; scripted 429/500/slow/malformed replies
exercise retries and failures; request logs prove cache hits, resumes and "no call made".
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import socket
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from fake_openai import EMPTY_SCORE, REFERENCE_SCORE, FakeOpenAI, Reply
from rich.console import Console

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.judge.batch import BATCH_STATE_FILE, BatchPending
from raygpt.judge.calls import plan_calls, presentation_orders
from raygpt.judge.prompts import ComparativePrompt, ReplyError, SinglePrompt
from raygpt.judge.run import run_judge
from raygpt.judge.summary import anchor_warnings
from raygpt.judge.wording import seed_robust_sentence, variance_line
from raygpt.prompts import AlpacaPrompt
from raygpt.stages import EMPTY_ANCHOR, REFERENCE_ANCHOR
from raygpt.stats.ranks import kendall_tau_b, spearman, spearman_columns
from raygpt.stats.resampling import bootstrap_mean_ci
from raygpt.stats.variance import paired_seed_robust
from raygpt.storage import Storage

KEY = "sk-test-not-a-real-key-0123456789"
N_ITEMS = 6
QUALITY = {"strong": 80, "medium": 55, "weak": 30}


def write_answers(root: Path, quality: dict[str, int] = QUALITY, n_items: int = N_ITEMS) -> list[Path]:
    answers = root / "ift" / "answers"
    answers.mkdir(parents=True, exist_ok=True)
    items = [{"id": f"test-{i:04d}", "instruction": f"Rewrite sentence {i} in the passive voice.",
              "input": f"The cat chased mouse {i}." if i % 2 else "", "output": f"Mouse {i} was chased by the cat."}
             for i in range(n_items)]
    paths = []
    for model, q in quality.items():
        path = answers / f"{model}.json"
        path.write_text(json.dumps({"model": model, "base_model": model, "dataset": {"split": "test", "n": n_items},
                                    "items": [{**item, "response": f"{model} says <q={q}>"} for item in items]}))
        paths.append(path)
    return paths


def write_scored_answers(root: Path, qualities: dict[str, list[int]], pads: dict[str, list[int]] | None = None,
                         reference_length: int = 0) -> list[Path]:
    """Answers files whose item i the fake judge scores ``qualities[model][i]``; ``pads`` adds
    about that many characters to answer i (in 7-character words); ``reference_length`` makes
    each reference answer that long. A model id ``name@seedK`` is replicate K of ``name``."""
    n_items = len(next(iter(qualities.values())))
    answers = root / "ift" / "answers"
    answers.mkdir(parents=True, exist_ok=True)
    items = [{"id": f"test-{i:04d}", "instruction": f"Summarise paragraph {i}.", "input": "",
              "output": f"Paragraph {i} in one line.".ljust(reference_length, ".")} for i in range(n_items)]
    paths = []
    for model, scores in qualities.items():
        base, _, seed = model.partition("@seed")
        extra = {"seed": int(seed)} if seed else {}
        padding = (pads or {}).get(model, [0] * n_items)
        responses = [f"{model} says <q={int(np.clip(q, 0, 100))}>" + " filler" * (pad // 7)
                     for q, pad in zip(scores, padding)]
        path = answers / f"{model}.json"
        path.write_text(json.dumps({"model": model, "base_model": f"runs/{base}", **extra, "dataset": {"n": n_items},
                                    "items": [{**item, "response": r} for item, r in zip(items, responses)]}))
        paths.append(path)
    return paths


def noisy_judge(server: FakeOpenAI, sd: float):
    """A policy (comparative mode): the fake's judgement of each answer plus Gaussian noise, fixed by the prompt,
    the label and the request's seed (so each pass, with its own order and seed, draws anew)."""
    def policy(body, index):
        reply = server.judge(body, index)
        data = json.loads(reply.content)
        text = body["messages"][-1]["content"]
        for entry in data["scores"]:
            rng = np.random.default_rng([body["seed"], zlib.crc32((text + entry["label"]).encode())])
            entry["score"] = int(np.clip(round(entry["score"] + rng.normal(0, sd)), 0, 100))
        return Reply(content=json.dumps(data))
    return policy


def make_spec(tmp_path: Path, server: FakeOpenAI | None, *settings: str):
    base_url = server.base_url if server else "http://127.0.0.1:9/v1"
    return load_spec(None, [f"storage_path={tmp_path}", f"judge.base_url={base_url}", "judge.model=judge-1",
                            f"judge.cache_dir={tmp_path / 'cache'}",
                            "judge.timeout_s=5", "judge.passes=2", "judge.concurrency=4", "judge.max_retries=3",
                            "judge.bootstrap_samples=300", *settings])


def quiet() -> Console:
    return Console(file=io.StringIO(), width=150)


def cache_entries(root: Path) -> list[Path]:
    """The judgements in the cache (not the record of who answers at which address)."""
    return [p for p in (root / "cache").rglob("*.json") if p.parent.name != "judges"]


def by_model(summary: dict) -> dict[str, dict]:
    return {m["model"]: m for m in summary["models"]}


@pytest.fixture
def server():
    with FakeOpenAI(models=["judge-1", "other-model"]) as fake:
        yield fake


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# ---------------------------------------------------------------------------------------------
# Templates and statistics (no server)


def test_single_prompt_is_the_books_and_parses_integer_replies():
    item = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    (message,) = SinglePrompt().messages(item, ["Red."])
    assert message["content"] == (
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName a color.` and correct output `Blue.`, score the model "
        "response `Red.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.")
    parse = SinglePrompt().parse
    for reply, score in (("85", 85), (" 85.\n", 85), ("Score: 85/100", 85), ("The score is 7.", 7), ("0", 0),
                         ("100", 100)):
        assert parse(reply, ["A"])["A"].score == score, reply
    for reply in ("101", "eighty", "85 or 90", "-3", "8.5", ""):
        with pytest.raises(ReplyError):
            parse(reply, ["A"])


def test_comparative_reply_must_name_every_label_once_with_an_integer_0_to_100():
    parse = ComparativePrompt().parse
    good = '```json\n{"scores": [{"label": "B", "reason": "ok", "score": 70}, {"label": "A", "reason": "", "score": 90.0}]}\n```'
    scores = parse(good, ["A", "B"])
    assert (scores["A"].score, scores["B"].score, scores["B"].reason) == (90, 70, "ok")
    bad = {
        '{"scores": [{"label": "A", "score": 90}]}': "no score for label(s) B",
        '{"scores": [{"label": "A", "score": 90}, {"label": "A", "score": 80}]}': "appears twice",
        '{"scores": [{"label": "A", "score": 90}, {"label": "C", "score": 80}]}': "unknown label 'C'",
        '{"scores": [{"label": "A", "score": 90}, {"label": "B", "score": 101}]}': "outside 0-100",
        '{"scores": [{"label": "A", "score": 87.5}, {"label": "B", "score": 1}]}': "not an integer",
        '{"scores": [{"label": "A", "score": "90"}, {"label": "B", "score": 1}]}': "not an integer",
        '{"scores": {"A": 90}}': "expected",
        '{"scores": [{"label": "A", "score": 90},': "malformed JSON",
        "A is better.": "no JSON object",
    }
    for reply, problem in bad.items():
        with pytest.raises(ReplyError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            parse(reply, ["A", "B"])
    schema = ComparativePrompt().response_format(["A", "B"])["json_schema"]["schema"]
    assert schema["properties"]["scores"]["items"]["properties"]["label"]["enum"] == ["A", "B"]


def test_orders_are_seeded_and_rotate_so_every_answer_meets_every_position():
    candidates = ["m1", "m2", "m3", "m4"]
    orders = presentation_orders(candidates, items=5, passes=4, seed=7)
    assert orders == presentation_orders(candidates, items=5, passes=4, seed=7)
    assert orders != presentation_orders(candidates, items=5, passes=4, seed=8)
    for item in range(5):
        for candidate in candidates:
            assert sorted(orders[p][item].index(candidate) for p in range(4)) == [0, 1, 2, 3]
    first_positions = {orders[0][item][0] for item in range(5)}
    assert len(first_positions) > 1, "the base order is shuffled per item"


def test_rank_statistics_match_known_values():
    # Ties share their average rank: 10, 20, 20, 5 rank as 2, 3.5, 3.5, 1.
    assert spearman_columns(np.array([[10, 20, 20, 5]]).T, np.array([[2, 3.5, 3.5, 1]]).T)[0] == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1)
    # Hand-computed: ranks (1,2,3,4) vs (2,1,4,3): rho = 1 - 6*4/(4*15) = 0.6; tau = (4-2)/6.
    assert spearman(np.array([1, 2, 3, 4]), np.array([2, 1, 4, 3])) == pytest.approx(0.6)
    assert spearman_columns(np.array([[1, 2, 3, 4]] * 2).T, np.array([[2, 1, 4, 3], [4, 3, 2, 1]]).T) == \
        pytest.approx([0.6, -1])
    assert kendall_tau_b(np.array([1, 2, 3, 4]), np.array([2, 1, 4, 3])) == pytest.approx(1 / 3)
    # tau-b with a tie: x (1,2,3), y (1,1,2): concordant 2, discordant 0, ties in y 1 -> 2/sqrt(3*2).
    assert kendall_tau_b(np.array([1, 2, 3]), np.array([1, 1, 2])) == pytest.approx(2 / np.sqrt(6))
    assert np.isnan(spearman(np.array([1, 2, 3]), np.array([5, 5, 5])))


def test_the_seed_robust_sentences_say_whether_a_lead_survives():
    rng = np.random.default_rng(5)
    item = rng.normal(0, 12, 100)

    def runs(mean: float, seeds: int) -> np.ndarray:
        return (mean + item[None, None] + rng.normal(0, 4, (seeds, 1, 1)) + rng.normal(0, 5, (seeds, 1, 100))
                + rng.normal(0, 8, (seeds, 2, 100)))

    small, near, far = runs(60, 3), runs(66, 3), runs(80, 3)
    close = seed_robust_sentence(paired_seed_robust(near, small, names=("near", "small")))
    assert close.startswith("near - small: +") and close.endswith(
        "with 3 fine-tuning seeds each): the difference does not survive fine-tuning noise (the interval holds 0)")
    wide = seed_robust_sentence(paired_seed_robust(far, small, names=("far", "small")))
    assert wide.endswith("with 3 fine-tuning seeds each): the difference survives fine-tuning noise")
    once = seed_robust_sentence(paired_seed_robust(far[:1], small, names=("far", "small")))
    assert once.endswith("without the seed variance of far): cannot tell whether it survives fine-tuning noise, "
                         "far fine-tuned with one seed")
    pools = seed_robust_sentence(paired_seed_robust([far[:1], far[1:]], [small[:2], small[2:]], names=("p", "q")))
    assert pools.endswith("with 2 pretraining seeds each): the difference survives seed noise")


def test_bootstrap_interval_contains_the_mean_and_is_fixed_by_the_seed():
    rng = np.random.default_rng(0)
    per_item = np.column_stack([rng.normal(60, 15, 110), rng.normal(40, 15, 110)])
    per_item[3, 1] = np.nan  # a failed judgement: left out, not a zero
    intervals = bootstrap_mean_ci(per_item, samples=1000, seed=123)
    assert intervals == bootstrap_mean_ci(per_item, samples=1000, seed=123)
    assert intervals != bootstrap_mean_ci(per_item, samples=1000, seed=124)
    for (low, high), mean in zip(intervals, np.nanmean(per_item, axis=0)):
        assert low < mean < high
        # About two standard errors either side of the mean.
        assert high - low == pytest.approx(2 * 1.96 * 15 / np.sqrt(110), rel=0.3)


# ---------------------------------------------------------------------------------------------
# Against the fake endpoint


@pytest.mark.integration
def test_comparative_scores_ranking_anchors_and_outputs(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server)
    summary = run_judge(spec, Storage(), quiet())

    models = by_model(summary)
    assert {m: models[m]["mean"] for m in QUALITY} == QUALITY
    assert summary["ranking"] == ["strong", "medium", "weak"]
    assert summary["anchors"][REFERENCE_ANCHOR]["mean"] == REFERENCE_SCORE
    assert summary["anchors"][EMPTY_ANCHOR]["mean"] == EMPTY_SCORE
    for m in models.values():
        assert m["ci95"][0] <= m["mean"] <= m["ci95"][1]
        assert (m["failures"], m["judgements"], m["items_scored"], m["spread"]) == (0, 2 * N_ITEMS, N_ITEMS, 0)
    assert summary["rank_agreement"] == {"spearman": 1.0, "kendall": 1.0, "item_kendall": 1.0, "pass_pairs": 1}
    assert summary["item_agreement"]["within_item"] == 1.0 and summary["item_agreement"]["icc"] == 1.0
    assert [r["effect"] for r in summary["position_bias"]["by_position"]] == [0.0] * 5
    assert summary["position_bias"]["models"] == 3, "the anchors are left out of the position bias"
    # Every item 25 points apart: three groups; the letters are the summary's ranking groups.
    assert summary["letters"] == {"strong": "a", "medium": "b", "weak": "c"}
    assert [m["letters"] for m in summary["models"]] == ["a", "b", "c"]
    assert [(p["a"], p["b"], p["mean"], p["different"]) for p in summary["comparisons"]["pairs"]] == [
        ("strong", "medium", 25.0, True), ("strong", "weak", 50.0, True), ("medium", "weak", 25.0, True)]
    assert summary["comparisons"]["bootstrap_samples"] >= 160 * 3 and summary["comparisons"]["seed_robust"] is None
    assert summary["warnings"] == [] and models["strong"]["ci95_includes_seeds"] is False
    assert models["strong"]["mean_length"] == len("strong says <q=80>")

    # One call per item and pass, all five candidates in it, the schema sent, seed + pass.
    requests = server.chat_requests
    assert len(requests) == 2 * N_ITEMS == summary["calls"]["made"]
    assert all(r.body["response_format"]["type"] == "json_schema" for r in requests)
    assert sorted({r.body["seed"] for r in requests}) == [spec.judge.seed, spec.judge.seed + 1]
    assert all(r.body["temperature"] == 0 and r.body["max_tokens"] == 1024 for r in requests)
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in requests)

    records = [json.loads(line) for line in (tmp_path / "judge" / "judgements.jsonl").read_text().splitlines()]
    assert len(records) == 2 * N_ITEMS
    first = next(r for r in records if r["pass"] == 0 and r["item"] == 0)
    second = next(r for r in records if r["pass"] == 1 and r["item"] == 0)
    assert second["order"] == first["order"][1:] + first["order"][:1]
    assert first["labels"] == dict(zip("ABCDE", first["order"]))
    assert first["scores"]["strong"] == 80 and first["cached"] is False and first["usage"]["prompt_tokens"] > 0
    written = json.loads((tmp_path / "judge" / "summary.json").read_text())
    assert written["models"] == summary["models"] and written["judge"]["template"] == "comparative/comparative-v1"
    assert KEY not in (tmp_path / "judge" / "summary.json").read_text()
    assert KEY not in (tmp_path / "judge" / "judgements.jsonl").read_text()
    assert KEY not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


@pytest.mark.integration
def test_second_run_is_all_cache_hits_and_makes_no_request(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server)
    first = run_judge(spec, Storage(), quiet())
    server.reset_counts()
    second = run_judge(spec, Storage(), quiet())
    assert server.requests == []  # not even the preflight: nothing was left to judge
    assert second["calls"] == {"total": 12, "made": 0, "cache_hits": 12, "failed": 0, "http_attempts": 0,
                               "batches": [], "failures": {}}
    assert second["models"] == first["models"]
    assert second["usage"]["prompt_tokens"] == 0
    assert second["usage"]["cached_prompt_tokens"] == first["usage"]["prompt_tokens"] > 0
    # A changed setting is a new question: judge.max_tokens is part of the key.
    server.reset_counts()
    run_judge(make_spec(tmp_path, server, "judge.max_tokens=512"), Storage(), quiet())
    assert len(server.chat_requests) == 12


@pytest.mark.integration
def test_rate_limits_and_server_errors_back_off_honouring_retry_after(tmp_path, server):
    write_answers(tmp_path)
    server.script(Reply.error(429, retry_after_ms=200), Reply.error(500), Reply.error(503))
    summary = run_judge(make_spec(tmp_path, server, "judge.concurrency=1"), Storage(), quiet())
    requests = server.chat_requests
    assert len(requests) == 12 + 3
    assert summary["calls"]["failed"] == 0 and summary["calls"]["http_attempts"] == 15
    assert requests[1].time - requests[0].time >= 0.2, "Retry-After was not honoured"
    assert {m: by_model(summary)[m]["mean"] for m in QUALITY} == QUALITY


@pytest.mark.integration
def test_the_client_retries_408_409_and_5xx_then_gives_up_counting_every_attempt(tmp_path, server):
    write_answers(tmp_path, n_items=2)
    spec = make_spec(tmp_path, server, "judge.concurrency=1", "judge.passes=1", "judge.max_retries=2")
    # The first call meets 408 and 409 and then an answer; the second 502 three times, all the
    # retries judge.max_retries allows the client.
    server.script(Reply.error(408), Reply.error(409), Reply(), *[Reply.error(502)] * 3)
    summary = run_judge(spec, Storage(), quiet())
    requests = server.chat_requests
    assert [r.headers.get("x-stainless-retry-count") for r in requests] == ["0", "1", "2", "0", "1", "2"]
    assert summary["calls"]["failed"] == 1 and summary["calls"]["http_attempts"] == 6
    assert summary["calls"]["failures"] == {"InternalServerError 502": 1}
    failed = [json.loads(line) for line in (tmp_path / "judge" / "judgements.jsonl").read_text().splitlines()
              if json.loads(line)["failure"]]
    assert failed[0]["failure"].startswith("InternalServerError 502: ") and failed[0]["failure"].endswith(
        "scripted 502 (after 3 attempts)")
    assert failed[0]["attempts"] == 3


@pytest.mark.integration
def test_a_slow_reply_times_out_and_is_retried(tmp_path, server):
    write_answers(tmp_path, n_items=2)
    server.script(Reply.slow(2.0))
    summary = run_judge(make_spec(tmp_path, server, "judge.timeout_s=0.3", "judge.concurrency=1"), Storage(), quiet())
    assert summary["calls"] == {"total": 4, "made": 4, "cache_hits": 0, "failed": 0, "http_attempts": 5,
                                "batches": [], "failures": {}}


@pytest.mark.integration
def test_malformed_replies_are_retried_then_counted_as_failures_never_as_zeros(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server, "judge.passes=1", "judge.concurrency=1", "judge.max_retries=2")
    # First call: three malformed replies (1 + 2 retries) -> a failure. Second: one, then fine.
    server.script(Reply.malformed(), Reply.malformed(), Reply.malformed(), Reply.malformed())
    summary = run_judge(spec, Storage(), quiet())
    assert len(server.chat_requests) == N_ITEMS + 3  # 2 retries of the failure, 1 of the second call
    assert summary["calls"]["failed"] == 1
    assert summary["calls"]["failures"] == {"unparseable reply": 1}
    for m in QUALITY:
        stats = by_model(summary)[m]
        assert (stats["failures"], stats["items_scored"], stats["items_excluded"]) == (1, N_ITEMS - 1, 1)
        assert stats["mean"] == QUALITY[m], "a failure must not be averaged in as a zero"
        assert stats["item_scores"].count(None) == 1
    failed = [json.loads(line) for line in (tmp_path / "judge" / "judgements.jsonl").read_text().splitlines()
              if json.loads(line)["failure"]]
    assert len(failed) == 1 and "malformed JSON" in failed[0]["failure"] and failed[0]["scores"] is None

    # Failures are not cached: the next run asks again for exactly that one.
    server.reset_counts()
    again = run_judge(spec, Storage(), quiet())
    assert len(server.chat_requests) == 1
    assert again["calls"]["failed"] == 0 and again["calls"]["cache_hits"] == N_ITEMS - 1


@pytest.mark.integration
def test_interrupted_run_resumes_making_only_the_missing_calls(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server, "judge.passes=3")
    served = itertools.count()
    lock = threading.Lock()

    def revoke_key_after_five(body, index):
        with lock:
            n = next(served)
        return server.judge(body, index) if n < 5 else Reply.error(401)

    server.policy = revoke_key_after_five
    with pytest.raises(RaygptError, match="rejected the key in \\$OPENAI_API_KEY.*run again to resume") as err:
        run_judge(spec, Storage(), quiet())
    assert KEY not in str(err.value)
    assert not (tmp_path / "judge" / "summary.json").exists(), "no summary of a half-done run"
    assert len(cache_entries(tmp_path)) == 5

    server.policy = server.judge
    server.reset_counts()
    summary = run_judge(spec, Storage(), quiet())
    assert len(server.chat_requests) == 3 * N_ITEMS - 5
    assert summary["calls"]["cache_hits"] == 5 and summary["calls"]["failed"] == 0
    assert {m: by_model(summary)[m]["mean"] for m in QUALITY} == QUALITY


@pytest.mark.integration
def test_an_aborting_run_waits_for_no_backoff_and_sends_nothing_more(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server, "judge.concurrency=4")
    served = itertools.count()
    lock = threading.Lock()

    def three_rate_limits_then_a_revoked_key(body, index):
        with lock:
            n = next(served)
        if n < 3:
            return Reply.error(429, retry_after_ms=4_000)
        time.sleep(0.2)  # the 429s are in the client's backoff by now
        return Reply.error(401)

    server.policy = three_rate_limits_then_a_revoked_key
    started = time.monotonic()
    with pytest.raises(RaygptError, match="rejected the key"):
        run_judge(spec, Storage(), quiet())
    assert time.monotonic() - started < 3, "the run waited out the other calls' Retry-After"
    sent = len(server.chat_requests)
    time.sleep(max(0.0, started + 5 - time.monotonic()))  # their backoff is over: they woke and gave up
    assert len(server.chat_requests) == sent == 4, "a call sent its retry after the run was aborted"


@pytest.mark.integration
def test_an_exhausted_quota_stops_the_run_at_once(tmp_path, server):
    write_answers(tmp_path)
    server.script(Reply(status=429, body={"error": {"message": "You exceeded your current quota",
                                                    "type": "insufficient_quota", "code": "insufficient_quota"}}))
    with pytest.raises(RaygptError, match="quota is used up"):
        run_judge(make_spec(tmp_path, server, "judge.concurrency=1"), Storage(), quiet())
    # No retries (the client was told not to): at most the one call the worker had already started, of 12.
    assert len(server.chat_requests) <= 2
    assert all(r.headers.get("x-stainless-retry-count") == "0" for r in server.chat_requests)


@pytest.mark.integration
def test_a_refused_setting_stops_the_run_naming_the_key(tmp_path, server):
    write_answers(tmp_path)
    refusal = {"error": {"message": "Unsupported value: 'temperature' does not support 0 with this model.",
                         "type": "invalid_request_error", "param": "temperature"}}
    server.script(*[Reply(status=400, body=refusal)] * 3)
    spec = make_spec(tmp_path, server, "judge.concurrency=1", "judge.structured_output=false")
    with pytest.raises(RaygptError, match="refuses temperature for model 'judge-1'.*change judge.temperature"):
        run_judge(spec, Storage(), quiet())
    assert len(server.chat_requests) <= 2


@pytest.mark.integration
def test_a_key_echoed_in_an_error_never_reaches_records_or_messages(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server, "judge.concurrency=1", "judge.passes=1", "judge.structured_output=false")
    echo = {"error": {"message": f"Malformed request from key {KEY}, see the docs", "type": "invalid_request_error"}}
    server.script(Reply(status=400, body=echo))
    summary = run_judge(spec, Storage(), quiet())
    assert summary["calls"]["failed"] == 1
    records = (tmp_path / "judge" / "judgements.jsonl").read_text()
    assert "from key <api key>, see the docs" in records and KEY not in records

    server.script(Reply(status=403, body={"error": {"message": f"Key {KEY} may not use this model"}}))
    with pytest.raises(RaygptError, match="refused access") as err:
        run_judge(spec, Storage(), quiet())
    assert KEY not in str(err.value) and "Key <api key> may not" in str(err.value)


@pytest.mark.integration
def test_position_bias_is_measured(tmp_path):
    quality = {"m40": 40, "m50": 50, "m60": 60}
    write_answers(tmp_path, quality)
    with FakeOpenAI(models=["judge-1"], position_bonus=12) as biased:
        summary = run_judge(make_spec(tmp_path, biased, "judge.passes=3", "judge.anchors=false"), Storage(), quiet())
    effects = [row["effect"] for row in summary["position_bias"]["by_position"]]
    # +12 for the first position, relative to the average position: +8, -4, -4.
    assert effects == pytest.approx([8, -4, -4], abs=1e-3)
    assert summary["position_bias"]["range"] == pytest.approx(12, abs=1e-3)
    # Rotation shows each answer first once in three passes: every model gets the same +4.
    assert {m: by_model(summary)[m]["mean"] for m in quality} == pytest.approx({m: q + 4 for m, q in quality.items()})
    assert summary["ranking"] == ["m60", "m50", "m40"]


@pytest.mark.integration
def test_single_mode_sends_the_books_prompt_per_answer(tmp_path, server):
    write_answers(tmp_path, n_items=3)
    summary = run_judge(make_spec(tmp_path, server, "judge.mode=single"), Storage(), quiet())
    requests = server.chat_requests
    assert len(requests) == 2 * 3 * (3 + 2)  # passes x items x (models + anchors)
    assert all("response_format" not in r.body for r in requests)
    assert all(len(r.body["messages"]) == 1 and "Respond with the integer number only." in r.body["messages"][0]["content"]
               for r in requests)
    expected_input = AlpacaPrompt().format_input({"instruction": "Rewrite sentence 1 in the passive voice.",
                                                  "input": "The cat chased mouse 1."})
    assert any(f"Given the input `{expected_input}`" in r.body["messages"][0]["content"] for r in requests)
    # Pass 0 is the book's prompt; pass 1 names the answer first, so a pass is not the same prompt again.
    book = [r for r in requests if "and correct output `" in r.body["messages"][0]["content"]]
    reference_last = [r for r in requests if "` against the correct output `" in r.body["messages"][0]["content"]]
    assert len(book) == len(reference_last) == 3 * 5
    assert {r.body["seed"] for r in book} == {123} and {r.body["seed"] for r in reference_last} == {124}
    assert any("alternate the book's prompt" in note for note in summary["notes"])
    assert {m: by_model(summary)[m]["mean"] for m in QUALITY} == QUALITY
    assert summary["anchors"][REFERENCE_ANCHOR]["mean"] == REFERENCE_SCORE
    assert summary["position_bias"] is None


@pytest.mark.integration
def test_identical_prompts_are_asked_once(tmp_path, server):
    paths = write_answers(tmp_path, n_items=3)
    mute = json.loads(paths[2].read_text())
    for item in mute["items"]:
        item["response"] = ""  # in single mode, the same prompt as the empty anchor's
    paths[2].write_text(json.dumps(mute))
    spec = make_spec(tmp_path, server, "judge.mode=single", "judge.passes=1")
    plan = run_judge(spec, Storage(), quiet(), dry_run=True)
    assert (plan["calls"], plan["to_make"], plan["cached"]) == (15, 12, 3), "the dry run counts what a run makes"
    summary = run_judge(spec, Storage(), quiet())
    assert len(server.chat_requests) == 3 * (3 + 2) - 3
    assert by_model(summary)["weak"]["mean"] == EMPTY_SCORE == summary["anchors"][EMPTY_ANCHOR]["mean"]
    assert summary["calls"]["made"] == 12 and summary["calls"]["cache_hits"] == 3


@pytest.mark.integration
def test_endpoint_without_structured_output_is_asked_in_words(tmp_path):
    write_answers(tmp_path, n_items=3)
    with FakeOpenAI(models=["judge-1"], reject_json_schema=True) as plain:
        summary = run_judge(make_spec(tmp_path, plain, "judge.concurrency=1"), Storage(), quiet())
        requests = plain.chat_requests
    assert "response_format" in requests[0].body
    assert all("response_format" not in r.body for r in requests[1:])
    assert len(requests) == 6 + 1 and summary["calls"]["failed"] == 0


@pytest.mark.integration
def test_calls_run_concurrently_up_to_the_limit(tmp_path, server):
    write_answers(tmp_path, n_items=12)

    def slowly(body, index):
        time.sleep(0.05)
        return server.judge(body, index)

    server.policy = slowly
    run_judge(make_spec(tmp_path, server, "judge.concurrency=3", "judge.passes=1"), Storage(), quiet())
    assert 2 <= server.peak_in_flight <= 3


@pytest.mark.integration
def test_usage_and_cost_are_reported(tmp_path, server):
    write_answers(tmp_path, n_items=2)
    spec = make_spec(tmp_path, server, "judge.price_input_per_mtok=2.0", "judge.price_output_per_mtok=8.0")
    summary = run_judge(spec, Storage(), quiet())
    usage = summary["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["cost_usd"] == pytest.approx((usage["prompt_tokens"] * 2 + usage["completion_tokens"] * 8) / 1e6, abs=1e-4)
    assert summary["usage"]["price_per_mtok"] == [2.0, 8.0]


# ---------------------------------------------------------------------------------------------
# Problems stop the run before any call


@pytest.mark.integration
def test_missing_key_is_one_error_before_any_request(tmp_path, server, monkeypatch):
    write_answers(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(RaygptError, match=r"\$OPENAI_API_KEY is not set"):
        run_judge(make_spec(tmp_path, server), Storage(), quiet())
    assert server.requests == []


@pytest.mark.integration
def test_a_local_server_needs_no_key(tmp_path, server, monkeypatch):
    write_answers(tmp_path, n_items=1)
    monkeypatch.delenv("OPENAI_API_KEY")
    summary = run_judge(make_spec(tmp_path, server, "judge.api_key_env=''"), Storage(), quiet())
    assert summary["calls"]["made"] == 2 and summary["calls"]["failed"] == 0


@pytest.mark.integration
def test_model_not_served_is_one_error_naming_it_before_any_call(tmp_path, server):
    write_answers(tmp_path)
    with pytest.raises(RaygptError, match=r"judge model 'gpt-nope' is not served by .*judge-1, other-model"):
        run_judge(make_spec(tmp_path, server, "judge.model=gpt-nope"), Storage(), quiet())
    assert server.chat_requests == []


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    write_answers(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nobody listens there
    spec = make_spec(tmp_path, None, f"judge.base_url=http://127.0.0.1:{port}/v1")
    with pytest.raises(RaygptError, match=rf"judge endpoint http://127.0.0.1:{port}/v1 cannot be reached"):
        run_judge(spec, Storage(), quiet())


@pytest.mark.integration
@pytest.mark.parametrize("break_it, problem", [
    (lambda items: items[3].update(output="Something else."), r"weak.json item 3: output 'Something else.' differs"),
    (lambda items: items.pop(), r"weak.json has 5 items, .*medium.json has 6: item 5 \(id test-0005\) is missing"),
    (lambda items: items.insert(0, items.pop(2)), r"weak.json item 0: id 'test-0002' differs from 'test-0000'"),
    (lambda items: items[1].update(input="Another input."), r"weak.json item 1: input"),
])
def test_misaligned_answers_stop_before_any_call(tmp_path, server, break_it, problem):
    paths = write_answers(tmp_path)
    weak = json.loads(paths[2].read_text())
    break_it(weak["items"])
    paths[2].write_text(json.dumps(weak))
    with pytest.raises(RaygptError, match=problem):
        run_judge(make_spec(tmp_path, server), Storage(), quiet())
    assert server.requests == []


def test_no_answers_is_one_clear_error(tmp_path):
    with pytest.raises(RaygptError, match=r"no answers files under .*raygpt ift"):
        run_judge(make_spec(tmp_path, None), Storage(), quiet())


@pytest.mark.integration
def test_cli_dry_run_then_judge(tmp_path, server, capsys):
    paths = write_answers(tmp_path, n_items=2)
    args = ["judge", str(_spec_file(tmp_path, server)), "--answers", str(paths[0]), "--answers", str(paths[1])]
    assert main([*args, "--dry-run"]) == 0
    assert "4 calls, 0 cached, 4 to make" in capsys.readouterr().out
    assert server.requests == []
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "strong" in out and "medium" in out and "weak" not in out
    assert len(server.chat_requests) == 4


@pytest.mark.integration
def test_cli_error_is_one_line_with_status_2(tmp_path, server, capsys, monkeypatch):
    write_answers(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY")
    assert main(["judge", str(_spec_file(tmp_path, server))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OPENAI_API_KEY is not set" in err


def _spec_file(tmp_path: Path, server: FakeOpenAI) -> Path:
    path = tmp_path / "judge.yaml"
    path.write_text(f"storage_path: {tmp_path}\njudge:\n  base_url: {server.base_url}\n  model: judge-1\n"
                    f"  cache_dir: {tmp_path / 'cache'}\n  passes: 2\n  bootstrap_samples: 200\n")
    return path


# ---------------------------------------------------------------------------------------------
# Which differences are real, where the noise comes from, length


@pytest.mark.integration
def test_a_planted_10_point_difference_is_significant_and_0_is_not(tmp_path, server):
    server.policy = noisy_judge(server, sd=6)
    told_apart = {("a", "b"): 0, ("a", "c"): 0, ("b", "c"): 0}
    runs = 4
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        item = rng.normal(0, 10, 40)  # item difficulty, shared by the models
        quality = {m: np.round(q + item + rng.normal(0, 6, 40)) for m, q in (("a", 60), ("b", 50), ("c", 50))}
        root = tmp_path / f"run{seed}"
        write_scored_answers(root, quality)
        summary = run_judge(make_spec(root, server, f"judge.seed={seed}"), Storage(), quiet())
        for pair in summary["comparisons"]["pairs"]:
            told_apart[(pair["a"], pair["b"]) if pair["a"] < pair["b"] else (pair["b"], pair["a"])] += pair["different"]
        letters = summary["letters"]
        assert not set(letters["a"]) & (set(letters["b"]) | set(letters["c"]))
    # Seen: a-b and a-c told apart in 4 of 4 runs (+8.0 to +13.3 points, Holm p at the bootstrap's
    # floor 0.0125), b-c in 0 of 4 (+0.4 to +2.4, Holm p 0.096 to 0.84).
    assert told_apart[("a", "b")] == told_apart[("a", "c")] == runs
    assert told_apart[("b", "c")] <= 1


@pytest.mark.integration
def test_replicates_pool_into_their_base_model_and_the_decomposition_recovers_a_planted_seed_effect(tmp_path, server):
    server.policy = noisy_judge(server, sd=4)
    rng = np.random.default_rng(0)
    item = rng.normal(0, 10, 40)
    offsets = [-6, -2, 2, 6]  # each fine-tuning run's luck: sd 5.16
    qualities = {}
    for base, mean in (("m", 65), ("n", 45)):
        for seed, offset in zip((1, 2, 3, 4), offsets):
            qualities[f"{base}@seed{seed}"] = np.round(mean + offset + item + rng.normal(0, 3, 40))
    write_scored_answers(tmp_path, qualities)
    summary = run_judge(make_spec(tmp_path, server), Storage(), quiet())

    assert summary["ranking"] == ["m", "n"]
    m = by_model(summary)["m"]
    assert m["seeds"] == [1, 2, 3, 4] and [r["model"] for r in m["replicates"]] == [f"m@seed{k}" for k in (1, 2, 3, 4)]
    assert len(m["item_scores_by_seed"]) == 4 and m["base_model"] == "runs/m"
    seed = m["variance"]["components"]["seed"]
    assert seed["ci_sd"][0] <= np.std(offsets, ddof=1) <= seed["ci_sd"][1]
    assert seed["sd"] == pytest.approx(np.std(offsets, ddof=1), abs=2)
    # The interval includes the seed variance: wider than the one over items alone.
    assert m["ci95_includes_seeds"] and m["ci95"][1] - m["ci95"][0] > 1.5 * (m["ci95_items"][1] - m["ci95_items"][0])
    (robust,) = summary["comparisons"]["seed_robust"]
    assert robust["survives"] is True and "survives fine-tuning noise" in robust["sentence"]
    assert summary["comparisons"]["letters_from"].startswith("tests that include the fine-tuning seed variance")
    assert summary["letters"] == {"m": "a", "n": "b"}
    # Seen: seed sd 5.16 (95% CI 2.8-19.4); interval 57.0-72.3 with the seeds, 61.8-67.6 over items alone.


PRETRAINING_OFFSETS = {"wd": (-6, 0, 6), "base": (4, -5, 1)}
"""Each pretraining seed's luck, per pool (wd's: sd 6)."""
POOLS = "judge.pools={wd: [wd@1337, wd@1, wd@2], base: [base@1337, base@1, base@2]}"


def write_pooled_answers(root: Path, items: int = 30) -> None:
    """Two pools of 3 base models that differ only in their pretraining seed (1337, 1, 2; named
    as a sweep names its runs, ``<variant>@<seed>``), each fine-tuned twice (replicates @seed1,
    @seed2), 30 points apart, and a base model ``other`` in no pool, fine-tuned twice."""
    rng = np.random.default_rng(4)
    item = rng.normal(0, 10, items)
    qualities = {}
    for pool, quality in (("wd", 75), ("base", 45)):
        for pretraining_seed, offset in zip((1337, 1, 2), PRETRAINING_OFFSETS[pool]):
            for finetuning_seed, luck in ((1, -1.5), (2, 1.5)):
                qualities[f"{pool}@{pretraining_seed}@seed{finetuning_seed}"] = np.round(
                    quality + offset + luck + item + rng.normal(0, 3, items))
    for finetuning_seed in (1, 2):
        qualities[f"other@seed{finetuning_seed}"] = np.round(25 + item + rng.normal(0, 3, items))
    write_scored_answers(root, qualities)


@pytest.mark.integration
def test_a_pool_scores_its_runs_as_one_with_the_pretraining_seed_variance(tmp_path, server):
    server.policy = noisy_judge(server, sd=3)
    write_pooled_answers(tmp_path)
    summary = run_judge(make_spec(tmp_path, server, POOLS), Storage(), quiet())

    assert summary["ranking"] == ["wd", "base", "other"]
    wd, other = by_model(summary)["wd"], by_model(summary)["other"]
    assert wd["pool"] == ["wd@1337", "wd@1", "wd@2"] and wd["pool_base_models"] == ["runs/wd@1337", "runs/wd@1",
                                                                                     "runs/wd@2"]
    assert [(r["model"], r["member"]) for r in wd["replicates"]] == [
        (f"wd@{p}@seed{f}", f"wd@{p}") for p in (1337, 1, 2) for f in (1, 2)]
    assert np.array(wd["item_scores_by_run"]).shape == (3, 2, 30) and wd["seeds"] == [1, 2]
    # The pool's interval holds both seed variances: wider than over items alone, and than with
    # the pretraining seeds held fixed (fine-tuning seeds and items random).
    width = wd["ci95"][1] - wd["ci95"][0]
    assert wd["ci95_includes_seeds"] and wd["ci95"][0] <= 75 <= wd["ci95"][1]
    assert width > 2 * (wd["ci95_items"][1] - wd["ci95_items"][0])
    assert width > 2 * (wd["ci95_finetuning"][1] - wd["ci95_finetuning"][0])
    pretraining = wd["variance"]["components"]["pretraining"]
    assert pretraining["ci_sd"][0] <= 6 <= pretraining["ci_sd"][1] and wd["variance"]["pretraining_seeds"] == 3
    # A base model in no pool is scored as before.
    assert "pool" not in other and other["seeds"] == [1, 2] and other["variance"]["pretraining_seeds"] == 1
    # Letters and pairs per pool, in words that name the seeds.
    assert summary["letters"] == {"wd": "a", "base": "b", "other": "c"}
    assert "pretraining and fine-tuning seed variance" in summary["comparisons"]["letters_from"]
    sentences = {(r["a"], r["b"]): r["sentence"] for r in summary["comparisons"]["seed_robust"]}
    assert sentences[("wd", "base")].startswith("wd - base: +")
    assert sentences[("wd", "base")].endswith("with 3 pretraining seeds each): the difference survives seed noise")
    assert sentences[("base", "other")].endswith(
        "with 3 pretraining seeds and 2 fine-tuning seeds): the difference survives seed noise")
    line = variance_line(wd)
    assert line.startswith("wd: score sd by source, 95% CI: items ") and ", pretraining seeds " in line
    assert ", fine-tuning seeds " in line and ", pretraining seed x item " in line
    # Seen: wd 73.8 (95% CI 58.1-89.6; items only 69.9-77.5; pretraining seeds fixed 68.3-79.3),
    # pretraining sd 5.8 (0.0-38.1), fine-tuning sd 2.6 (1.3-10.0).


def test_pools_that_name_what_is_not_judged_are_one_error_before_any_call(tmp_path):
    write_pooled_answers(tmp_path)
    bad = ("judge.pools={wd: [wd@1337, wd@7], other: [base@1], base: [base@1, base@2], empty: [], '@p': [base@2]}")
    with pytest.raises(RaygptError) as error:
        run_judge(make_spec(tmp_path, None, bad), Storage(), quiet(), dry_run=True)
    message = str(error.value)
    assert message.startswith("judge: judge.pools.wd: 'wd@7' has no answers (judged base models: base@1, base@1337")
    for problem in ("judge.pools.other: 'other' is also a judged model that the pool does not hold",
                    "judge.pools.base: 'base@1' is pooled in 'other' already", "judge.pools.empty: names no base model",
                    "judge.pools.@p: a pool's name must not start with '@'"):
        assert problem in message, problem


@pytest.mark.integration
def test_the_length_controlled_score_removes_a_planted_length_bonus(tmp_path):
    rng = np.random.default_rng(1)
    item = rng.normal(0, 8, 30)
    qualities = {m: np.round(50 + item + rng.normal(0, 3, 30)) for m in ("long", "short")}
    pads = {"long": list(rng.integers(250, 550, 30)), "short": list(rng.integers(20, 200, 30))}
    write_scored_answers(tmp_path, qualities, pads)
    with FakeOpenAI(models=["judge-1"], length_bonus=0.04) as rambling:
        summary = run_judge(make_spec(tmp_path, rambling, "judge.passes=1"), Storage(), quiet())
    long, short = by_model(summary)["long"], by_model(summary)["short"]
    assert long["mean_length"] - short["mean_length"] > 250
    assert long["mean"] - short["mean"] > 10  # the bonus shows in the raw score...
    assert long["length_controlled"] == pytest.approx(short["length_controlled"], abs=2)  # ...not in the controlled one
    assert summary["length"]["score_points_per_unit"] == pytest.approx(0.04, abs=0.01)
    assert summary["length"]["reference"] == "@reference anchor" and summary["length"]["refused"] == []
    assert long["length_controlled_ci95"][0] <= long["length_controlled"] <= long["length_controlled_ci95"][1]
    first, *_, caveat = summary["length"]["sentences"]
    assert first.startswith("length-controlled: each model's score at the reference's answer length; the judge gives "
                            "+3.95 points per 100 characters, 95% CI +")
    assert caveat.startswith("length control cannot tell a judge that rewards length from answers that are longer "
                             "because they are better")
    # Seen: raw 65.5 and 53.8, length-controlled 50.6 and 50.1, 0.040 points per character.


@pytest.mark.integration
def test_a_length_slope_fitted_to_quality_is_refused_and_said(tmp_path, server):
    # Answers 7 characters longer for every 14 points of quality, a judge blind to length, and
    # reference answers 300 characters long: the slope of about 2 points per character would
    # move every score by hundreds of points.
    rng = np.random.default_rng(2)
    item = rng.normal(0, 10, 30)
    qualities = {m: np.clip(np.round(q + item + rng.normal(0, 8, 30)), 0, 100) for m, q in (("a", 40), ("b", 60))}
    pads = {m: [int(q) // 2 for q in scores] for m, scores in qualities.items()}
    write_scored_answers(tmp_path, qualities, pads, reference_length=300)
    summary = run_judge(make_spec(tmp_path, server, "judge.passes=1"), Storage(), quiet())
    assert "effect beyond the score range" in summary["length"]["refused"]
    assert all(m["length_controlled"] is None and m["length_controlled_ci95"] == [None, None]
               for m in summary["models"])
    assert any(s.startswith("length-controlled scores withheld: the length adjustment of ") and
               "more than the whole 0-100 scale" in s for s in summary["length"]["sentences"])


# ---------------------------------------------------------------------------------------------
# The Batch API


SAME_STATISTICS = ("models", "ranking", "letters", "comparisons", "anchors", "warnings", "item_agreement",
                   "rank_agreement", "position_bias", "length", "items")


@pytest.mark.integration
def test_the_batch_path_gives_the_direct_paths_summary_resumes_by_its_id_and_replays_for_free(tmp_path, server):
    write_answers(tmp_path)
    direct = run_judge(make_spec(tmp_path, server, f"judge.output={tmp_path / 'direct'}",
                                 f"judge.cache_dir={tmp_path / 'direct-cache'}"), Storage(), quiet())
    server.reset_counts()

    root = tmp_path
    batch_spec = make_spec(root, server, "judge.batch=true", "judge.batch_poll_s=0.01")
    # Interrupted while the batch runs: its id is saved, nothing is judged twice.
    with pytest.raises(BatchPending, match=r"batch_fake1 is still in_progress.*run again to collect it"):
        run_judge(make_spec(root, server, "judge.batch=true", "judge.batch_wait_s=0"), Storage(), quiet())
    state = json.loads((root / "judge" / BATCH_STATE_FILE).read_text())
    assert state["batch_id"] == "batch_fake1" and len(state["requests"]) == 12
    assert not (root / "judge" / "summary.json").exists() and cache_entries(root) == []

    resumed = run_judge(batch_spec, Storage(), quiet())
    assert list(server.batches) == ["batch_fake1"], "the resumed run polls the same batch, it sends no other"
    assert len([r for r in server.requests if r.path.endswith("/files")]) == 1
    assert server.chat_requests == [] and len(server.batch_requests) == 12
    assert not (root / "judge" / BATCH_STATE_FILE).exists()
    assert {k: resumed[k] for k in SAME_STATISTICS} == {k: direct[k] for k in SAME_STATISTICS}
    assert resumed["calls"]["made"] == 12 and resumed["calls"]["batches"] == ["batch_fake1"]
    assert resumed["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"] > 0
    assert resumed["usage"]["batch_prompt_tokens"] == resumed["usage"]["prompt_tokens"]
    records = [json.loads(line) for line in (root / "judge" / "judgements.jsonl").read_text().splitlines()]
    assert {r["batch"] for r in records} == {"batch_fake1"}

    # Replayed: every judgement from the cache, no request at all.
    server.reset_counts()
    replay = run_judge(batch_spec, Storage(), quiet())
    assert server.requests == [] and replay["calls"]["cache_hits"] == 12
    assert {k: replay[k] for k in SAME_STATISTICS} == {k: direct[k] for k in SAME_STATISTICS}


@pytest.mark.integration
def test_batch_lines_that_fail_or_do_not_parse_are_failures_asked_again_next_time(tmp_path, server):
    write_answers(tmp_path, n_items=3)
    spec = make_spec(tmp_path, server, "judge.batch=true", "judge.batch_poll_s=0.01", "judge.passes=1")
    server.script(Reply.malformed(), Reply.error(500))
    summary = run_judge(spec, Storage(), quiet())
    assert summary["calls"]["failed"] == 2 and len(cache_entries(tmp_path)) == 1
    assert set(summary["calls"]["failures"]) == {"unparseable reply", "request rejected"}
    server.reset_counts()
    again = run_judge(spec, Storage(), quiet())
    assert again["calls"]["failed"] == 0 and again["calls"]["made"] == 2 and len(server.batch_requests) == 2


# ---------------------------------------------------------------------------------------------
# The cache key: the judge, not its address


@pytest.mark.integration
def test_the_same_judge_at_another_address_pays_for_nothing_and_another_judge_pays_for_all(tmp_path, server):
    write_answers(tmp_path)
    run_judge(make_spec(tmp_path, server), Storage(), quiet())
    assert len(server.chat_requests) == 12
    # The same server software listing the same model on another port: all from the cache.
    with FakeOpenAI(models=["judge-1", "something-else"]) as moved:
        summary = run_judge(make_spec(tmp_path, moved), Storage(), quiet())
        assert moved.chat_requests == [] and [r.path for r in moved.requests] == ["/v1/models"]
        assert summary["calls"]["cache_hits"] == 12 and summary["judge"]["identity"].startswith("served:")
        server.reset_counts()
        moved.reset_counts()
        # Another server that lists the same name differently (vLLM with other weights): judged anew.
        awq = {"judge-1": {"owned_by": "vllm", "root": "/w/judge-1-awq"}}
        with FakeOpenAI(models=["judge-1"], model_info=awq) as other:
            run_judge(make_spec(tmp_path, other), Storage(), quiet())
            assert len(other.chat_requests) == 12
        # A judge named in the spec is that judge wherever it is: once judged, no request at all.
        run_judge(make_spec(tmp_path, server, "judge.identity=judge-1-fp16"), Storage(), quiet())
        assert len(server.chat_requests) == 12
        run_judge(make_spec(tmp_path, moved, "judge.identity=judge-1-fp16"), Storage(), quiet())
        assert moved.requests == []


@pytest.mark.integration
def test_caches_keyed_by_the_address_are_still_read(tmp_path, server):
    write_answers(tmp_path)
    spec = make_spec(tmp_path, server)
    run_judge(spec, Storage(), quiet())
    # Turn the cache into one of before the identity: every entry under its address key, and
    # no record of who answers at this address.
    from raygpt.judge.answers import load_answer_sets

    identity = json.loads(next((tmp_path / "cache" / "judges").glob("*.json")).read_text())["identity"]
    calls = plan_calls(spec, load_answer_sets(spec, Storage()), identity)
    for call in calls:
        entry = json.loads((tmp_path / "cache" / call.key[:2] / f"{call.key}.json").read_text())
        old = tmp_path / "cache" / call.fallback_key[:2] / f"{call.fallback_key}.json"
        old.parent.mkdir(parents=True, exist_ok=True)
        old.write_text(json.dumps({**entry, "key": call.fallback_key}))
        (tmp_path / "cache" / call.key[:2] / f"{call.key}.json").unlink()
    judges = tmp_path / "cache" / "judges"
    saved = tmp_path / "judges-saved"
    shutil.move(judges, saved)
    server.reset_counts()
    assert run_judge(spec, Storage(), quiet())["calls"]["cache_hits"] == 12
    assert server.requests == [], "read by the address, as before: no request"
    # With the identity known, the old entries are found and copied under the identity key.
    shutil.move(saved, judges)
    assert run_judge(spec, Storage(), quiet())["calls"]["cache_hits"] == 12 and server.requests == []
    assert all((tmp_path / "cache" / c.key[:2] / f"{c.key}.json").exists() for c in calls)


# ---------------------------------------------------------------------------------------------
# Anchors, answers of replicates, AlpacaEval


def test_anchor_warnings_say_when_the_judge_misreads():
    column = {"m": 0, REFERENCE_ANCHOR: 1, EMPTY_ANCHOR: 2}
    scores = np.array([[[60.0, 90.0, 5.0], [55.0, 50.0, 70.0]]])  # (1 pass, 2 items, 3 candidates)
    fine = {REFERENCE_ANCHOR: {"mean": 90.0}, EMPTY_ANCHOR: {"mean": 5.0}}
    assert anchor_warnings(fine, [{"model": "m", "mean": 60.0}], scores[:, :1], column) == []
    found = anchor_warnings({REFERENCE_ANCHOR: {"mean": 70.0}, EMPTY_ANCHOR: {"mean": 37.5}},
                            [{"model": "m", "mean": 72.0}, {"model": "w", "mean": 30.0}], scores, column)
    assert found[0].startswith("the empty answer scores 37.5 on average")
    assert found[1] == "the empty answer (37.5) scores at least as high as w"
    assert found[2].startswith("the reference answer (70.0) scores below m (72.0)")
    assert found[3] == "on 1 of 2 items the empty answer scores at least as high as the reference answer"


def test_replicates_and_a_single_run_of_one_model_are_one_clear_error(tmp_path):
    write_scored_answers(tmp_path, {"m": [50, 60], "m@seed1": [50, 60], "n@seed1": [40, 40]})
    with pytest.raises(RaygptError, match=r"m.json holds 'm' fine-tuned once and .*m@seed1.json a replicate of it"):
        run_judge(make_spec(tmp_path, None), Storage(), quiet(), dry_run=True)
    wrong = tmp_path / "ift" / "answers" / "n@seed1.json"
    wrong.write_text(wrong.read_text().replace('"seed": 1', '"seed": 2'))
    (tmp_path / "ift" / "answers" / "m.json").unlink()
    with pytest.raises(RaygptError, match=r"model id 'n@seed1' names seed 1 but the file says seed 2"):
        run_judge(make_spec(tmp_path, None), Storage(), quiet(), dry_run=True)


def test_answers_export_in_alpaca_evals_format(tmp_path, server, capsys):
    write_answers(tmp_path, n_items=3)
    out = tmp_path / "alpaca"
    assert main(["judge", str(_spec_file(tmp_path, server)), "--export-alpaca-eval", str(out)]) == 0
    assert server.requests == [], "exporting needs no judge"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == [
        "medium/model_outputs.json", "reference_outputs.json", "strong/model_outputs.json", "weak/model_outputs.json"]
    outputs = json.loads((out / "strong" / "model_outputs.json").read_text())
    assert outputs[0] == {"instruction": "Rewrite sentence 0 in the passive voice.", "output": "strong says <q=80>",
                          "generator": "strong", "dataset": "raygpt"}
    assert outputs[1]["instruction"] == "Rewrite sentence 1 in the passive voice.\n\nThe cat chased mouse 1."
    reference = json.loads((out / "reference_outputs.json").read_text())
    assert reference[1] == {**outputs[1], "output": "Mouse 1 was chased by the cat.", "generator": "reference"}
    assert "alpaca_eval --model_outputs" in capsys.readouterr().out


def test_an_unreachable_endpoint_with_a_password_in_its_url_is_named_without_it(tmp_path):
    write_answers(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = make_spec(tmp_path, None, f"judge.base_url=http://judge:s3cret-pw@127.0.0.1:{port}/v1")
    with pytest.raises(RaygptError, match=rf"judge endpoint http://127.0.0.1:{port}/v1 cannot be reached") as error:
        run_judge(spec, Storage(), quiet())
    assert "s3cret-pw" not in str(error.value)


@pytest.mark.parametrize("api_key_env, sent", [
    ("JUDGE_TEST_KEY", "Bearer sk-judge-test"),  # a key wins: the URL's user:password is not sent
    ("", "Basic anVkZ2U6czNjcmV0LXB3"),  # no key: the URL's judge:s3cret-pw, as HTTP Basic auth
], ids=["api-key", "no-key"])
def test_which_credential_a_judge_url_with_a_password_sends(monkeypatch, api_key_env, sent):
    from raygpt.judge.client import JudgeEndpoint

    monkeypatch.setenv("JUDGE_TEST_KEY", "sk-judge-test")
    with FakeOpenAI(models=["judge-1"]) as server:
        url = server.base_url.replace("http://", "http://judge:s3cret-pw@")
        spec = load_spec(None, [f"judge.base_url={url}", f"judge.api_key_env={api_key_env!r}", "judge.model=judge-1"])
        JudgeEndpoint(spec.judge).preflight()
    assert [v for r in server.requests for k, v in r.headers.items() if k.lower() == "authorization"] == [sent]
