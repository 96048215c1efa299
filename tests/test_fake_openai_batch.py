"""The fake server's Batch API, driven by the real ``openai`` client on loopback.

A batch must give, line by line (keyed by ``custom_id``), the same replies a direct chat
completion gets, move through its statuses over a few polls, be retrievable later by its id
alone (a resumed run), fail validation the way the real API says, and cancel.
"""

from __future__ import annotations

import json

import pytest
from fake_openai import FakeOpenAI, Reply, parse_multipart
from openai import BadRequestError, ConflictError, NotFoundError, OpenAI

KEY = "sk-test-not-a-real-key-0123456789"
COMPARATIVE = ("Judge the answers.\n<reference>\nMouse {i} was chased.\n</reference>\n"
               "<answer A>\nstrong says <q=80>\n</answer A>\n<answer B>\nweak says <q={q}>\n</answer B>")


def request_body(i: int, model: str = "judge-1", q: int = 30) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": COMPARATIVE.format(i=i, q=q)}],
            "temperature": 0, "seed": i}


def batch_input(bodies: dict[str, dict]) -> bytes:
    return "".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n"
                   for cid, body in bodies.items()).encode()


@pytest.fixture
def server():
    with FakeOpenAI(models=["judge-1"]) as fake:
        yield fake


@pytest.fixture
def client(server):
    return OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=5)


def run_batch(client: OpenAI, content: bytes, polls: int = 10):
    uploaded = client.files.create(file=("judge-batch.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"run": "test"})
    statuses = [batch.status]
    for _ in range(polls):
        if batch.status in {"completed", "failed", "expired", "cancelled"}:
            break
        batch = client.batches.retrieve(batch.id)
        statuses.append(batch.status)
    return uploaded, batch, statuses


def test_a_batch_answers_each_line_as_a_direct_call_would(server, client):
    bodies = {f"item-{i}": request_body(i, q=20 + i) for i in range(6)}
    content = batch_input(bodies)
    uploaded, batch, statuses = run_batch(client, content)
    assert statuses == ["validating", "in_progress", "finalizing", "completed"]
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", len(content), "judge-batch.jsonl")
    assert client.files.content(uploaded.id).read() == content  # the upload arrives byte for byte
    assert batch.request_counts.total == batch.request_counts.completed == 6 and batch.request_counts.failed == 0
    assert batch.metadata == {"run": "test"} and batch.error_file_id is None and batch.completed_at is not None

    lines = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert sorted(by_id) == sorted(bodies)
    assert [line["custom_id"] for line in lines] != list(bodies), "output order is shuffled: key by custom_id"
    direct = {cid: client.chat.completions.create(**body).choices[0].message.content for cid, body in bodies.items()}
    for cid, line in by_id.items():
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == direct[cid]
    scores = json.loads(direct["item-3"])["scores"]
    assert [s["score"] for s in scores] == [80, 23]
    assert len(server.batch_requests) == 6 and len(server.chat_requests) == 6  # the direct calls only


def test_a_batch_is_found_again_by_its_id_after_a_restart_of_the_client(server, client):
    uploaded = client.files.create(file=("in.jsonl", batch_input({"a": request_body(1)})), purpose="batch")
    batch_id = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h").id
    assert client.batches.retrieve(batch_id).status == "in_progress"
    resumed = OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=5)
    assert [b.id for b in resumed.batches.list()] == [batch_id]
    assert resumed.batches.retrieve(batch_id).status == "finalizing"
    done = resumed.batches.retrieve(batch_id)
    assert done.status == "completed" and resumed.batches.retrieve(batch_id).status == "completed"
    (line,) = resumed.files.content(done.output_file_id).text.splitlines()
    assert json.loads(line)["custom_id"] == "a" and len(server.batch_requests) == 1  # answered once


def test_failed_lines_go_to_the_error_file_and_scripted_replies_apply(server, client):
    server.script(Reply(content='{"scores": []}'), Reply.error(500))
    bodies = {"first": request_body(0), "second": request_body(1), "third": request_body(2),
              "unserved": request_body(3, model="no-such-model")}
    _, batch, _ = run_batch(client, batch_input(bodies))
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    output = {json.loads(l)["custom_id"]: json.loads(l) for l in client.files.content(batch.output_file_id).text.splitlines()}
    errors = {json.loads(l)["custom_id"]: json.loads(l) for l in client.files.content(batch.error_file_id).text.splitlines()}
    assert output["first"]["response"]["body"]["choices"][0]["message"]["content"] == '{"scores": []}'
    assert errors["second"]["response"]["status_code"] == 500
    assert errors["unserved"]["response"]["status_code"] == 404
    third = json.loads(output["third"]["response"]["body"]["choices"][0]["message"]["content"])
    assert [s["score"] for s in third["scores"]] == [80, 30]


def test_an_invalid_input_file_fails_validation_line_by_line(client):
    good = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": request_body(0)})
    elsewhere = good.replace('"x"', '"y"').replace("/v1/chat/completions", "/v1/embeddings")
    content = "\n".join([good, "{not json", good, elsewhere]).encode()
    _, batch, statuses = run_batch(client, content)
    assert statuses == ["validating", "failed"] and batch.failed_at is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [("invalid_json_line", 2), ("duplicate_custom_id", 3),
                                                             ("invalid_url", 4)]
    assert batch.output_file_id is None


def test_create_rejects_an_unknown_file_and_endpoint(client):
    uploaded = client.files.create(file=("in.jsonl", batch_input({"a": request_body(0)})), purpose="batch")
    with pytest.raises(NotFoundError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(BadRequestError, match="not supported"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(NotFoundError):
        client.batches.retrieve("batch_missing")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(NotFoundError):
        client.files.retrieve(uploaded.id)


def test_a_batch_cancels_and_a_long_or_expired_one_reports_so(server, client):
    uploaded = client.files.create(file=("in.jsonl", batch_input({"a": request_body(0)})), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert client.batches.cancel(batch.id).status == "cancelling"
    cancelled = client.batches.retrieve(batch.id)
    assert cancelled.status == "cancelled" and cancelled.output_file_id is None and not server.batch_requests
    with pytest.raises(ConflictError, match="Cannot cancel a batch with status cancelled"):
        client.batches.cancel(batch.id)

    server.batch_progress = ("in_progress",) * 4 + ("expired",)
    _, expired, statuses = run_batch(client, batch_input({"a": request_body(0)}))
    assert statuses == ["validating"] + ["in_progress"] * 4 + ["expired"] and expired.expired_at is not None
    assert not server.batch_requests


def test_multipart_fields_keep_their_bytes():
    body = (b'--xyz\r\ncontent-disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            b'--xyz\r\ncontent-disposition: form-data; name="file"; filename="a.jsonl"\r\n'
            b'content-type: application/octet-stream\r\n\r\n{"k": "\xc3\xa9"}\r\n\n\r\n--xyz--\r\n')
    assert parse_multipart('multipart/form-data; boundary="xyz"', body) == {
        "purpose": (None, b"batch"), "file": ("a.jsonl", b'{"k": "\xc3\xa9"}\r\n\n')}
    with pytest.raises(ValueError, match="no boundary"):
        parse_multipart("multipart/form-data", body)


def test_direct_chat_completions_still_behave(server, client):
    reply = client.chat.completions.create(**request_body(0))
    assert json.loads(reply.choices[0].message.content)["scores"][1]["score"] == 30
    plain = client.chat.completions.create(model="judge-1", messages=[{"role": "user", "content": "hello"}])
    assert plain.choices[0].message.content == "I cannot tell what to judge here."
    assert len(server.chat_requests) == 2 and server.peak_in_flight == 1 and not server.batch_requests
