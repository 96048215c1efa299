"""A small OpenAI-compatible HTTP server on loopback, scripted per test.

It serves ``GET /v1/models`` (``created`` is the time of the request, as vLLM sends it) and
``POST /v1/chat/completions`` to the real ``openai`` client,
and the Batch API: ``/v1/files`` (multipart upload, metadata, ``/content``, delete) and
``/v1/batches`` (create, retrieve, list, cancel). A batch moves ``validating`` -> each status
in ``server.batch_progress`` (one per retrieve) -> ``completed``, when its input lines are
answered by the same scripted chat-completions logic as direct calls (the script queue, then
the policy; a scripted delay is skipped) and written, keyed by ``custom_id`` and in shuffled
order, to an output file (status 200) and an error file (other statuses).
A reply comes from the script queue first (``server.script(...)``), else from the policy
function (``server.policy``), whose default judges deterministically from the request text:

- an answer equal to the reference scores ``REFERENCE_SCORE``, an empty answer ``EMPTY_SCORE``;
- an answer containing a marker ``<q=NN>`` scores NN;
- anything else scores ``DEFAULT_SCORE``;
- ``position_bonus`` is added to the first presented answer (to test the bias estimate);
- ``length_bonus`` points per character are added to every answer (to test length control).

So tests know the true scores and ranking. Every HTTP request is recorded (path, body, time,
headers) with counts and the peak number in flight, so tests can assert retries, concurrency
and cache hits; each batch line answered is recorded apart, in ``batch_requests``.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

REFERENCE_SCORE = 95
EMPTY_SCORE = 3
DEFAULT_SCORE = 50

# The comparative template shows each answer between these lines (see raygpt.judge.prompts).
_ANSWER_BLOCK = re.compile(r"<answer (?P<label>[A-Z])>\n(?P<text>.*?)\n</answer (?P=label)>", re.S)
_REFERENCE_BLOCK = re.compile(r"<reference>\n(?P<text>.*?)\n</reference>", re.S)
# The book's single-answer prompt, and its variant with the reference after the answer.
_SINGLE = re.compile(r"and correct output `(?P<reference>.*?)`, score the model response `(?P<response>.*?)` on a scale", re.S)
_SINGLE_REFERENCE_LAST = re.compile(
    r"score the model response `(?P<response>.*?)` against the correct output `(?P<reference>.*?)` on a scale", re.S)
_MARKER = re.compile(r"<q=(\d+)>")
_FILE = re.compile(r"/v1/files/(?P<id>[^/]+)(?P<content>/content)?")
_BATCH = re.compile(r"/v1/batches/(?P<id>[^/]+)(?P<cancel>/cancel)?")
BATCH_ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


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


def parse_multipart(content_type: str, data: bytes) -> dict[str, tuple[str | None, bytes]]:
    """The fields of a multipart/form-data body: ``{name: (filename or None, exact bytes)}``."""
    boundary = re.search(r'boundary="?([^";]+)"?', content_type)
    if boundary is None:
        raise ValueError(f"no boundary in content-type {content_type!r}")
    fields = {}
    for chunk in data.split(b"--" + boundary.group(1).encode())[1:-1]:
        head, _, value = chunk.removeprefix(b"\r\n").removesuffix(b"\r\n").partition(b"\r\n\r\n")
        disposition = next((line for line in head.decode().split("\r\n")
                            if line.lower().startswith("content-disposition")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, value)
    return fields


class FakeOpenAI:
    """``with FakeOpenAI(models=["judge-1"]) as server: OpenAI(base_url=server.base_url, ...)``."""

    def __init__(self, models: tuple[str, ...] | list[str] = ("judge-1",), position_bonus: int = 0,
                 reject_json_schema: bool = False, model_info: dict[str, dict] | None = None,
                 length_bonus: float = 0.0):
        self.models = list(models)
        self.length_bonus = length_bonus
        self.model_info = model_info or {}
        """Extra fields of a model's /v1/models entry (``owned_by``, vLLM's ``root``), by model."""
        self.position_bonus = position_bonus
        self.reject_json_schema = reject_json_schema
        self.policy: Callable[[dict, int], Reply] = self.judge
        self.requests: list[Request] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.batch_progress: tuple[str, ...] = ("in_progress", "finalizing")
        """Statuses a batch shows on successive retrieves before ``completed``; a terminal one
        (``expired``, ``failed``) ends it there, unanswered."""
        self.batch_requests: list[Request] = []
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self._file_content: dict[str, bytes] = {}
        self._queue: list[Reply] = []
        # Reentrant: a batch is answered under the lock by the same code a direct call takes it in.
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- scripting -----------------------------------------------------------------------------

    def script(self, *replies: Reply) -> None:
        """Queue replies for the next chat completions (direct or batch lines), before the policy takes over."""
        with self._lock:
            self._queue.extend(replies)

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.batch_requests.clear()
            self.peak_in_flight = 0

    def judge(self, body: dict, index: int) -> Reply:
        """The default policy: score every answer in the prompt from its content."""
        text = "\n".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
        single = _SINGLE.search(text) or _SINGLE_REFERENCE_LAST.search(text)
        if single:
            response = single.group("response")
            score = score_answer(response, single.group("reference")) + round(self.length_bonus * len(response))
            return Reply(content=str(max(0, min(100, score))))
        reference = _REFERENCE_BLOCK.search(text)
        if reference is None:
            return Reply(content="I cannot tell what to judge here.")
        reference = reference.group("text")
        scores = []
        for position, block in enumerate(_ANSWER_BLOCK.finditer(text)):
            score = (score_answer(block.group("text"), reference) + (self.position_bonus if position == 0 else 0)
                     + round(self.length_bonus * len(block.group("text"))))
            scores.append({"label": block.group("label"), "reason": "fake judge", "score": max(0, min(100, score))})
        return Reply(content=json.dumps({"scores": scores}))

    def chat_completion(self, body: dict, index: int, wait: bool = True) -> tuple[int, dict, dict[str, str]]:
        """(status, JSON body, headers) of one chat completion: scripted reply, else the policy."""
        if body.get("model") not in self.models:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist",
                                   "type": "invalid_request_error", "code": "model_not_found"}}, {}
        schema = (body.get("response_format") or {}).get("type") == "json_schema"
        if schema and self.reject_json_schema:
            return 400, {"error": {"message": "response_format json_schema is not supported"}}, {}
        with self._lock:
            reply = self._queue.pop(0) if self._queue else None
        reply = reply or self.policy(body, index)
        if reply.delay_s and wait:
            time.sleep(reply.delay_s)
        if reply.status != 200:
            return reply.status, reply.body or {"error": {"message": "error"}}, reply.headers
        # A scripted reply without content (a slow one) carries the default judgement.
        content = reply.content if reply.content is not None else self.judge(body, index).content
        prompt_chars = sum(len(m.get("content") or "") for m in body["messages"])
        usage = {"prompt_tokens": prompt_chars // 4 + 1, "completion_tokens": len(content) // 4 + 1}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return 200, {
            "id": f"chatcmpl-{index}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }, reply.headers

    # -- files and batches ---------------------------------------------------------------------

    def add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        with self._lock:
            file_id = f"file-fake{len(self.files) + 1}"
            self.files[file_id] = {"id": file_id, "object": "file", "bytes": len(content),
                                   "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                                   "status": "processed", "expires_at": None, "status_details": None}
            self._file_content[file_id] = content
            return self.files[file_id]

    def file_content(self, file_id: str) -> bytes:
        return self._file_content[file_id]

    def create_batch(self, request: dict) -> tuple[int, dict]:
        input_file = request.get("input_file_id")
        if input_file not in self.files:
            return 404, _error(f"No such File object: {input_file}", "invalid_request_error", "input_file_id")
        if request.get("endpoint") != BATCH_ENDPOINT:
            return 400, _error(f"endpoint {request.get('endpoint')!r} is not supported by the fake: only "
                               f"{BATCH_ENDPOINT}", "invalid_request_error", "endpoint")
        if request.get("completion_window") != "24h":
            return 400, _error("completion_window must be '24h'", "invalid_request_error", "completion_window")
        with self._lock:
            batch_id = f"batch_fake{len(self.batches) + 1}"
            now = int(time.time())
            self.batches[batch_id] = {
                "id": batch_id, "object": "batch", "endpoint": BATCH_ENDPOINT, "errors": None,
                "input_file_id": input_file, "completion_window": "24h", "status": "validating",
                "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
                "expires_at": now + 86400, "finalizing_at": None, "completed_at": None, "failed_at": None,
                "expired_at": None, "cancelling_at": None, "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": request.get("metadata"),
                "_polls": 0}
            return 200, self.public(batch_id)

    def public(self, batch_id: str) -> dict:
        return {k: v for k, v in self.batches[batch_id].items() if not k.startswith("_")}

    def retrieve_batch(self, batch_id: str) -> dict:
        """The batch, one step further on: validation on the first retrieve, then
        ``batch_progress`` one status a retrieve, then the answers."""
        with self._lock:
            batch = self.batches[batch_id]
            now = int(time.time())
            if batch["status"] == "cancelling":
                batch.update(status="cancelled", cancelled_at=now)
            if batch["status"] in TERMINAL or batch["status"] == "cancelling":
                return self.public(batch_id)
            batch["_polls"] += 1
            if batch["_polls"] == 1:
                lines, errors = _batch_lines(self.file_content(batch["input_file_id"]))
                if errors:
                    batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
                    return self.public(batch_id)
                batch["_lines"] = lines
                batch["request_counts"]["total"] = len(lines)
            if batch["_polls"] <= len(self.batch_progress):
                status = self.batch_progress[batch["_polls"] - 1]
                batch["status"] = status
                stamp = {"in_progress": "in_progress_at", "finalizing": "finalizing_at", "expired": "expired_at",
                         "failed": "failed_at"}.get(status)
                if stamp and batch[stamp] is None:
                    batch[stamp] = now
                return self.public(batch_id)
            self._answer_batch(batch)
            batch.update(status="completed", completed_at=now, in_progress_at=batch["in_progress_at"] or now,
                         finalizing_at=batch["finalizing_at"] or now)
            return self.public(batch_id)

    def cancel_batch(self, batch_id: str) -> tuple[int, dict]:
        with self._lock:
            batch = self.batches[batch_id]
            if batch["status"] in TERMINAL:
                return 409, _error(f"Cannot cancel a batch with status {batch['status']}.", "invalid_request_error",
                                   None)
            batch.update(status="cancelling", cancelling_at=int(time.time()))
            return 200, self.public(batch_id)

    def _answer_batch(self, batch: dict) -> None:
        answered, failed = [], []
        for n, line in enumerate(batch["_lines"]):
            self.batch_requests.append(Request(f"{batch['id']}:{line['custom_id']}", line["body"], {}, time.monotonic()))
            status, payload, _ = self.chat_completion(line["body"], len(self.batch_requests) - 1, wait=False)
            record = {"id": f"batch_req_{batch['id']}_{n}", "custom_id": line["custom_id"],
                      "response": {"status_code": status, "request_id": f"req_{batch['id']}_{n}", "body": payload},
                      "error": None}
            (answered if status == 200 else failed).append(record)
        shuffle = random.Random(batch["id"]).shuffle  # the real API keeps no order: clients key by custom_id
        for records, key in ((answered, "output_file_id"), (failed, "error_file_id")):
            if records:
                shuffle(records)
                text = "".join(json.dumps(r) + "\n" for r in records).encode()
                batch[key] = self.add_file(text, f"{batch['id']}_{key.split('_')[0]}.jsonl",
                                           "batch_output")["id"]
        batch["request_counts"].update(completed=len(answered), failed=len(failed))

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
                path = urlsplit(self.path).path.rstrip("/")
                file, batch = _FILE.fullmatch(path), _BATCH.fullmatch(path)
                if path.endswith("/models"):
                    data = [{"id": m, "object": "model", "created": int(time.time()), "owned_by": "fake",
                             **fake.model_info.get(m, {})} for m in fake.models]
                    self._send(200, {"object": "list", "data": data})
                elif file and file.group("id") in fake.files:
                    if file.group("content"):
                        self._send_bytes(200, fake.file_content(file.group("id")))
                    else:
                        self._send(200, fake.files[file.group("id")])
                elif path == "/v1/batches":
                    data = [fake.public(b) for b in reversed(fake.batches)]
                    self._send(200, {"object": "list", "data": data, "has_more": False,
                                     "first_id": data[0]["id"] if data else None,
                                     "last_id": data[-1]["id"] if data else None})
                elif batch and not batch.group("cancel") and batch.group("id") in fake.batches:
                    self._send(200, fake.retrieve_batch(batch.group("id")))
                else:
                    self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))

            def do_DELETE(self):
                fake._record(self, {})
                file = _FILE.fullmatch(urlsplit(self.path).path.rstrip("/"))
                if file and not file.group("content") and file.group("id") in fake.files:
                    with fake._lock:
                        del fake.files[file.group("id")]
                    self._send(200, {"id": file.group("id"), "object": "file", "deleted": True})
                else:
                    self._send(404, _error(f"no route {self.path}", "invalid_request_error", None))

            def do_POST(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                path = urlsplit(self.path).path.rstrip("/")
                if path == "/v1/files":
                    self._upload(raw)
                    return
                body = json.loads(raw or b"{}")
                index = fake._record(self, body)
                batch = _BATCH.fullmatch(path)
                if path == "/v1/batches":
                    self._send(*fake.create_batch(body))
                elif batch and batch.group("cancel") and batch.group("id") in fake.batches:
                    self._send(*fake.cancel_batch(batch.group("id")))
                elif not path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                else:
                    with fake._lock:
                        fake.in_flight += 1
                        fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                    try:
                        self._send(*fake.chat_completion(body, index))
                    finally:
                        with fake._lock:
                            fake.in_flight -= 1

            def _upload(self, raw: bytes) -> None:
                try:
                    fields = parse_multipart(self.headers.get("content-type") or "", raw)
                except ValueError as e:
                    fake._record(self, {})
                    self._send(400, _error(str(e), "invalid_request_error", None))
                    return
                filename, content = fields.get("file", (None, None))
                purpose = (fields.get("purpose") or (None, b""))[1].decode()
                fake._record(self, {"purpose": purpose, "filename": filename})
                if content is None or purpose not in {"batch", "assistants", "fine-tune", "vision", "user_data"}:
                    self._send(400, _error("a 'file' and a valid 'purpose' are required", "invalid_request_error",
                                           "file" if content is None else "purpose"))
                    return
                self._send(200, fake.add_file(content, filename or "upload", purpose))

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._send_bytes(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_bytes(self, status: int, data: bytes, content_type: str = "application/octet-stream",
                            headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("content-type", content_type)
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


def _error(message: str, kind: str, param: str | None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def _batch_lines(content: bytes) -> tuple[list[dict], list[dict]]:
    """The requests of a batch input file, or the errors that fail its validation (as the real
    API reports them: a code, a message and the 1-based line)."""
    lines, errors, seen = [], [], set()
    for number, text in enumerate(content.decode("utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            errors.append({"code": "invalid_json_line", "message": f"line is not JSON: {e}", "line": number,
                           "param": None})
            continue
        problem = None
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            problem = ("missing_required_parameter", "custom_id")
        elif line["custom_id"] in seen:
            problem = ("duplicate_custom_id", "custom_id")
        elif line.get("method") != "POST":
            problem = ("invalid_method", "method")
        elif line.get("url") != BATCH_ENDPOINT:
            problem = ("invalid_url", "url")
        elif not isinstance(line.get("body"), dict) or not isinstance(line["body"].get("messages"), list):
            problem = ("missing_required_parameter", "body")
        if problem:
            errors.append({"code": problem[0], "message": f"line {number}: bad {problem[1]}", "line": number,
                           "param": problem[1]})
            continue
        seen.add(line["custom_id"])
        lines.append(line)
    if not lines and not errors:
        errors.append({"code": "empty_file", "message": "the input file has no requests", "line": None,
                       "param": None})
    return lines, errors
