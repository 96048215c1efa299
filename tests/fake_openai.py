"""A small OpenAI-compatible HTTP server on loopback, scripted per test.

It serves ``GET /v1/models`` and ``POST /v1/chat/completions`` to the real ``openai`` client.
A reply comes from the script queue first (``server.script(...)``), else from the policy
function (``server.policy``), whose default judges deterministically from the request text:

- an answer equal to the reference scores ``REFERENCE_SCORE``, an empty answer ``EMPTY_SCORE``;
- an answer containing a marker ``<q=NN>`` scores NN;
- anything else scores ``DEFAULT_SCORE``;
- ``position_bonus`` is added to the first presented answer (to test the bias estimate).

So tests know the true scores and ranking. Every request is recorded (path, body, time,
headers) with counts and the peak number in flight, so tests can assert retries, concurrency
and cache hits.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

REFERENCE_SCORE = 95
EMPTY_SCORE = 3
DEFAULT_SCORE = 50

# The comparative template shows each answer between these lines (see raygpt.judge.prompts).
_ANSWER_BLOCK = re.compile(r"<answer (?P<label>[A-Z])>\n(?P<text>.*?)\n</answer (?P=label)>", re.S)
_REFERENCE_BLOCK = re.compile(r"<reference>\n(?P<text>.*?)\n</reference>", re.S)
# The book's single-answer prompt.
_SINGLE = re.compile(r"and correct output `(?P<reference>.*?)`, score the model response `(?P<response>.*?)` on a scale", re.S)
_MARKER = re.compile(r"<q=(\d+)>")


@dataclass
class Reply:
    """One scripted HTTP reply."""

    status: int = 200
    content: str | None = None
    """The assistant message text (status 200); None: the policy's judgement."""
    body: dict | None = None
    """A raw JSON body for error statuses."""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    """Sleep before answering (a slow reply; with a short client timeout, a timeout)."""

    @staticmethod
    def malformed() -> Reply:
        return Reply(content='{"scores": [{"label": "A", "score": very good}]}')

    @staticmethod
    def error(status: int, retry_after_ms: int | None = None) -> Reply:
        headers = {"retry-after-ms": str(retry_after_ms)} if retry_after_ms is not None else {}
        return Reply(status=status, body={"error": {"message": f"scripted {status}", "type": "fake", "code": status}},
                     headers=headers)

    @staticmethod
    def slow(delay_s: float) -> Reply:
        return Reply(delay_s=delay_s)


@dataclass
class Request:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    time: float


def score_answer(answer: str, reference: str) -> int:
    if answer.strip() == "":
        return EMPTY_SCORE
    if answer.strip() == reference.strip():
        return REFERENCE_SCORE
    marker = _MARKER.search(answer)
    return int(marker.group(1)) if marker else DEFAULT_SCORE


class FakeOpenAI:
    """``with FakeOpenAI(models=["judge-1"]) as server: OpenAI(base_url=server.base_url, ...)``."""

    def __init__(self, models: tuple[str, ...] | list[str] = ("judge-1",), position_bonus: int = 0,
                 reject_json_schema: bool = False):
        self.models = list(models)
        self.position_bonus = position_bonus
        self.reject_json_schema = reject_json_schema
        self.policy: Callable[[dict, int], Reply] = self.judge
        self.requests: list[Request] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self._queue: list[Reply] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- scripting -----------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next chat completions, before the policy takes over."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.peak_in_flight = 0

    def judge(self, body: dict, index: int) -> Reply:
        """The default policy: score every answer in the prompt from its content."""
        text = "\n".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
        single = _SINGLE.search(text)
        if single:
            return Reply(content=str(score_answer(single.group("response"), single.group("reference"))))
        reference = _REFERENCE_BLOCK.search(text)
        if reference is None:
            return Reply(content="I cannot tell what to judge here.")
        reference = reference.group("text")
        scores = []
        for position, block in enumerate(_ANSWER_BLOCK.finditer(text)):
            score = score_answer(block.group("text"), reference) + (self.position_bonus if position == 0 else 0)
            scores.append({"label": block.group("label"), "reason": "fake judge", "score": max(0, min(100, score))})
        return Reply(content=json.dumps({"scores": scores}))

    # -- server --------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake._record(self, {})
                if self.path.rstrip("/").endswith("/models"):
                    data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]
                    self._send(200, {"object": "list", "data": data})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                index = fake._record(self, body)
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with fake._lock:
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                try:
                    self._answer(body, index)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _answer(self, body: dict, index: int) -> None:
                if body.get("model") not in fake.models:
                    self._send(404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                               "type": "invalid_request_error", "code": "model_not_found"}})
                    return
                schema = (body.get("response_format") or {}).get("type") == "json_schema"
                if schema and fake.reject_json_schema:
                    self._send(400, {"error": {"message": "response_format json_schema is not supported"}})
                    return
                with fake._lock:
                    reply = fake._queue.pop(0) if fake._queue else None
                reply = reply or fake.policy(body, index)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    self._send(reply.status, reply.body or {"error": {"message": "error"}}, reply.headers)
                    return
                # A scripted reply without content (a slow one) carries the default judgement.
                content = reply.content if reply.content is not None else fake.judge(body, index).content
                prompt_chars = sum(len(m.get("content") or "") for m in body["messages"])
                usage = {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(content) // 4 + 1}
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
                self._send(200, {
                    "id": f"chatcmpl-{index}", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"], "usage": usage,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                }, reply.headers)

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: that is the point of a slow reply

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, handler: BaseHTTPRequestHandler, body: dict) -> int:
        with self._lock:
            self.requests.append(Request(handler.path, body, dict(handler.headers), time.monotonic()))
            return len(self.requests) - 1
