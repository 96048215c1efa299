"""HellaSwag: loading the JSON-lines file (local, s3 through the storage seam, a URL cached once)
with errors that name the line, and completion-style scoring checked against losses computed by
hand, token by token."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import torch

from raygpt import hellaswag
from raygpt.errors import RaygptError
from raygpt.hellaswag import Item, load_items, render_item, score_items
from raygpt.model import GPT, GPTConfig
from raygpt.storage.download import default_cache_dir
from raygpt.tokenizer import VOCAB_SIZE, encode

PADDED_VOCAB = 50304  # GPT-2's 50,257 rounded up to a multiple of 64, as a padded model would have

SAMPLE = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3, "split": "val"},
    {"ind": 92, "activity_label": "Clean and jerk",
     "ctx": "A lady walks to a barbell. She bends down and grabs the pole.",
     "endings": ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
                 "stands and lifts the weight over her head."], "label": 3},
    {"ctx": "The cat sat on the mat. Then it",
     "endings": ["fell asleep.", "ate a sandwich with a fork and knife.", "flew.", "purred softly in the sun."],
     "label": 0},
    {"ctx": "She opened the oven and", "endings": ["took out the bread.", "sang.", "closed it again quickly.", "left."],
     "label": "2"},
    {"ctx": "He tied his shoes and",
     "endings": ["went for a run.", "read a book.", "drove the bus to the city centre.", "slept."], "label": 0},
    {"ctx": "The children built a sandcastle, and then the tide", "endings": ["came in.", "sang.", "left.", "froze."],
     "label": 0},
]


def write_jsonl(path, records) -> bytes:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(data)
    return data


def sample_items() -> list[Item]:
    return hellaswag.parse_items("".join(json.dumps(r) + "\n" for r in SAMPLE).encode(), "sample")


def tiny_gpt(context_length: int = 64) -> GPT:
    """A 1-layer GPT with a padded vocabulary; a wide head so the endings' losses differ clearly."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=PADDED_VOCAB, n_layer=1, n_head=1, n_embd=8, context_length=context_length))
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model


def hand_losses(model, item: Item, context_length: int) -> tuple[list[float], list[float]]:
    """Summed and mean loss of each ending, one row and one token at a time, in float64:
    -log softmax(logits over GPT-2's tokens)[next token], for each ending token after the prefix."""
    ctx = encode(item.ctx)
    sums, means = [], []
    for ending in item.endings:
        ending_tokens = encode(" " + ending)
        row = (ctx + ending_tokens)[-context_length:]
        with torch.no_grad():
            logits, _ = model(torch.tensor([row]))
        losses = []
        for p in range(max(len(row) - len(ending_tokens), 1), len(row)):
            scores = logits[0, p - 1, :VOCAB_SIZE].double()
            losses.append(float(torch.logsumexp(scores, dim=0) - scores[row[p]]))
        sums.append(sum(losses))
        means.append(sum(losses) / len(losses))
    return sums, means


def argmin(values: list[float]) -> int:
    return min(range(len(values)), key=values.__getitem__)


# -- scoring ----------------------------------------------------------------------------------


def test_scores_match_hand_computed_losses():
    model = tiny_gpt().eval()
    items = sample_items()
    result = score_items(model, items, "cpu", batch_size=4, per_item=True)

    expected_correct = expected_correct_norm = 0
    for item, scored in zip(items, result["per_item"]):
        sums, means = hand_losses(model, item, 64)
        assert scored["sum_loss"] == pytest.approx(sums, rel=1e-5)
        assert scored["mean_loss"] == pytest.approx(means, rel=1e-5)
        assert (scored["pred"], scored["pred_norm"]) == (argmin(sums), argmin(means))
        expected_correct += argmin(sums) == item.label
        expected_correct_norm += argmin(means) == item.label
    assert result["items"] == len(items)
    assert (result["correct"], result["correct_norm"]) == (expected_correct, expected_correct_norm)
    assert result["acc"] == expected_correct / len(items)
    assert result["acc_norm"] == expected_correct_norm / len(items)


class UnigramStub(torch.nn.Module):
    """Logits that ignore the context: every position gives token k the logit ``weights[k]``.
    Favoured tokens get ``boost``; the padding columns past GPT-2's vocabulary get a huge logit
    that would swamp every loss if they were counted."""

    def __init__(self, favoured: set[int], boost: float):
        super().__init__()
        weights = torch.zeros(PADDED_VOCAB)
        weights[sorted(favoured)] = boost
        weights[VOCAB_SIZE:] = 30.0
        self.register_buffer("weights", weights)
        self.config = SimpleNamespace(context_length=64)

    def forward(self, idx):
        return self.weights.expand(*idx.shape, -1), None


def test_acc_and_acc_norm_disagree_on_a_long_likely_ending():
    # The right ending is long, every token of it likely; a wrong one is a single unlikely token.
    # Its total loss is lower (acc picks it), its mean is higher (acc_norm picks the right one).
    long_ending, short_ending = "and then it slowly fell asleep in the warm afternoon sun", "yes"
    item = Item(ctx="The cat sat on the mat", endings=(long_ending, short_ending, "no no", "maybe not"), label=0)
    favoured = set(encode(" " + long_ending))
    assert len(encode(" " + short_ending)) == 1
    assert not favoured & {t for e in item.endings[1:] for t in encode(" " + e)}
    boost = 8.0
    model = UnigramStub(favoured, boost)

    # By hand: log-sum-exp over the 50,257 real tokens, minus the target's logit.
    lse = math.log(VOCAB_SIZE - len(favoured) + len(favoured) * math.exp(boost))
    n_long = len(encode(" " + long_ending))
    sums = [n_long * (lse - boost), lse, 2 * lse, len(encode(" maybe not")) * lse]
    means = [lse - boost, lse, lse, lse]
    assert argmin(sums) == 1 and argmin(means) == 0

    result = score_items(model, [item], "cpu", per_item=True)
    scored = result["per_item"][0]
    assert scored["sum_loss"] == pytest.approx(sums, rel=1e-4)  # fp32 log-sum-exp over 50,257 logits: ~1e-5 relative
    assert scored["mean_loss"] == pytest.approx(means, rel=1e-4)
    assert (scored["pred"], scored["pred_norm"]) == (1, 0)
    assert (result["acc"], result["acc_norm"], result["correct"], result["correct_norm"]) == (0.0, 1.0, 0, 1)


def test_batching_across_items_gives_the_same_scores_as_one_at_a_time():
    model = tiny_gpt()
    items = sample_items()
    one = score_items(model, items, "cpu", batch_size=1, per_item=True)
    for batch_size in (4, 64):
        many = score_items(model, items, "cpu", batch_size=batch_size, per_item=True)
        assert {k: many[k] for k in ("correct", "correct_norm", "items")} == \
            {k: one[k] for k in ("correct", "correct_norm", "items")}
        for a, b in zip(one["per_item"], many["per_item"]):
            assert (a["pred"], a["pred_norm"]) == (b["pred"], b["pred_norm"])
            assert a["sum_loss"] == pytest.approx(b["sum_loss"], rel=1e-5)
            assert a["mean_loss"] == pytest.approx(b["mean_loss"], rel=1e-5)


def test_rows_longer_than_the_context_are_cut_from_the_left():
    context_length = 16
    model = tiny_gpt(context_length)
    long_ctx = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen."
    long_ending = "a b c d e f g h i j k l m n o p q r s t"
    item = Item(ctx=long_ctx, endings=("ended.", long_ending, "stopped there.", "went on."), label=0)
    assert len(encode(long_ctx)) > context_length and len(encode(" " + long_ending)) > context_length

    rows = render_item(item, context_length)
    assert all(len(tokens) <= context_length for tokens, _ in rows)
    assert rows[0] == ((encode(long_ctx) + encode(" ended."))[-context_length:], len(encode(" ended.")))
    assert rows[1][1] == context_length - 1  # the row's first token has no prefix to predict it

    scored = score_items(model, [item], "cpu", per_item=True)["per_item"][0]
    sums, means = hand_losses(model, item, context_length)
    assert scored["sum_loss"] == pytest.approx(sums, rel=1e-5)
    assert scored["mean_loss"] == pytest.approx(means, rel=1e-5)


def test_the_model_gets_its_training_mode_back():
    model = tiny_gpt().train()
    score_items(model, sample_items()[:2], "cpu")
    assert model.training
    assert "per_item" not in score_items(model.eval(), sample_items()[:2], "cpu")
    assert not model.training


def test_no_items_is_an_error():
    with pytest.raises(RaygptError, match="no items"):
        score_items(tiny_gpt(), [], "cpu")


# -- loading ----------------------------------------------------------------------------------


def test_a_local_file_gives_its_items_and_sha256(tmp_path):
    path = tmp_path / "sample.jsonl"
    data = write_jsonl(path, SAMPLE)
    items, sha256 = load_items(str(path))
    assert sha256 == hashlib.sha256(data).hexdigest()
    assert len(items) == len(SAMPLE)
    assert items[0] == Item(ctx=SAMPLE[0]["ctx"], endings=tuple(SAMPLE[0]["endings"]), label=3, ind=24,
                            activity_label="Roof shingle removal")
    assert (items[2].ind, items[2].activity_label) == (None, None)
    assert items[3].label == 2  # a string label, as some exports write it


def test_an_s3_uri_is_read_through_the_storage_seam():
    data = "".join(json.dumps(r) + "\n" for r in SAMPLE[:2]).encode()
    reads = []

    class FakeStorage:
        def read_bytes(self, uri, max_bytes=None):
            reads.append(uri)
            return data

    items, sha256 = load_items("s3://bucket/hellaswag_val.jsonl", storage=FakeStorage())
    assert reads == ["s3://bucket/hellaswag_val.jsonl"]
    assert len(items) == 2 and sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad_line, complaint", [
    ('{"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 1', "not valid JSON"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c"], "label": 1}), "3 endings, expected 4"),
    (json.dumps({"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 7}), "label 7 is not an ending index"),
    (json.dumps({"endings": ["a", "b", "c", "d"], "label": 1}), "missing 'ctx'"),
    ("[1, 2]", "expected a JSON object"),
])
def test_a_bad_line_is_one_error_naming_the_file_and_line(tmp_path, bad_line, complaint):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(SAMPLE[0]) + "\n" + bad_line + "\n" + json.dumps(SAMPLE[1]) + "\n")
    with pytest.raises(RaygptError) as error:
        load_items(str(path))
    assert str(error.value).startswith(f"{path}:2: ")
    assert complaint in str(error.value)


def test_a_missing_or_empty_file_is_an_error(tmp_path):
    with pytest.raises(RaygptError, match="not found"):
        load_items(str(tmp_path / "absent.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RaygptError, match="no HellaSwag items"):
        load_items(str(tmp_path / "empty.jsonl"))


class CountingServer:
    """A loopback HTTP server with one file; counts the requests it answers."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests, self.authorizations = files, 0, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                if self.headers.get("Authorization"):
                    server.authorizations.append(self.headers["Authorization"])
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    data = "".join(json.dumps(r) + "\n" for r in SAMPLE).encode()
    with CountingServer({"/data/hellaswag_val.jsonl": data}) as s:
        yield s


@pytest.mark.integration
def test_a_url_is_downloaded_once_then_read_from_the_cache(server, tmp_path):
    url = f"{server.url}/data/hellaswag_val.jsonl"
    first = load_items(url, cache_dir=tmp_path / "cache")
    second = load_items(url, cache_dir=tmp_path / "cache")
    assert server.requests == 1
    assert first == second and len(first[0]) == len(SAMPLE)
    assert first[1] == hashlib.sha256(server.files["/data/hellaswag_val.jsonl"]).hexdigest()
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-hellaswag_val.jsonl")  # no temporary file left


@pytest.mark.integration
def test_the_default_cache_is_under_raygpt_cache_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir("hellaswag") == tmp_path / "hellaswag"
    load_items(f"{server.url}/data/hellaswag_val.jsonl")
    assert [p.name.endswith("-hellaswag_val.jsonl") for p in (tmp_path / "hellaswag").iterdir()] == [True]


@pytest.mark.integration
def test_an_http_error_is_one_message_and_caches_nothing(server, tmp_path):
    url = f"{server.url}/data/missing.jsonl"
    with pytest.raises(RaygptError, match="HTTP 404") as error:
        load_items(url, cache_dir=tmp_path)
    assert str(error.value).startswith(f"{url}: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_the_official_url_must_give_all_validation_items(server, tmp_path, monkeypatch):
    url = f"{server.url}/data/hellaswag_val.jsonl"
    monkeypatch.setattr(hellaswag, "HELLASWAG_VAL_URL", url)
    with pytest.raises(RaygptError, match=r"6 items, but the HellaSwag validation file has 10,042.*delete the file"):
        load_items(url, cache_dir=tmp_path)


def test_an_unreachable_url_fails_fast_with_one_message(tmp_path):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hellaswag_val.jsonl"
    start = time.monotonic()
    with pytest.raises(RaygptError) as error:
        load_items(url, cache_dir=tmp_path)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert message.startswith(f"{url}: cannot download") and "local path" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_a_url_password_is_sent_as_basic_auth_and_shown_nowhere(server, tmp_path):
    url = f"{server.url}/data/hellaswag_val.jsonl".replace("http://", "http://user:pw-Qe7@")
    items, _ = load_items(url, cache_dir=tmp_path / "cache")
    assert len(items) == len(SAMPLE) and server.authorizations == ["Basic dXNlcjpwdy1RZTc="]  # user:pw-Qe7
    assert all("pw-Qe7" not in p.name for p in (tmp_path / "cache").iterdir())
    with pytest.raises(RaygptError) as error:
        load_items(url.replace("hellaswag_val", "missing"), cache_dir=tmp_path / "cache")
    assert "HTTP 404" in str(error.value) and "pw-Qe7" not in str(error.value)
