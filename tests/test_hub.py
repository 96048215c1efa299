"""``raygpt export --dtype --push-to-hub``: the model card written from run.json and the stages'
results, bf16 weights that transformers loads, and the Hub push against local HTTP servers on
127.0.0.1: one that takes the upload (a small fake of the Hub's create/preupload/commit API),
one that answers 503, one that never answers, and a port nobody listens on."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.model import GPT, PRESETS
from raygpt.storage import Storage, join
from raygpt.train.components import RngState, TrainerState, choose_precision
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import save_training_checkpoint

TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run as raygpt leaves it: a checkpoint, run.json, and eval, HellaSwag and judge results."""
    root = tmp_path_factory.mktemp("hub") / "runs"
    torch.manual_seed(0)
    model = GPT(PRESETS["tiny"]).eval()
    spec = load_spec(None, ["name=tiny-run", f"storage_path={root}", "model.preset=tiny", "data.source=fineweb"])
    state = TrainerState(WarmupCosine(1e-3, 1, 10), choose_precision("fp32", torch.device("cpu")).scaler, 0, spec, 2)
    state.step, state.tokens_seen = 10, 20480
    checkpoint = root / "tiny-run" / "checkpoint_00000010"
    save_training_checkpoint(checkpoint, 0, model=model, optimizer=model.configure_optimizer(1e-3, 0.1, (0.9, 0.95),
                             "cpu"), trainer=state, rng=RngState())
    storage = Storage()
    dataset = str(root.parent / "data")
    storage.write_json(join(dataset, "manifest.json"), {
        "source": "fineweb", "source_description": "FineWeb sample-10BT (HuggingFaceFW/fineweb)"})
    from raygpt.config import recorded_spec

    storage.write_json(str(root / "tiny-run" / "run.json"), {
        "name": "tiny-run", "status": "finished", "raygpt_version": "0.1.0", "git_commit": "abc123",
        "spec": recorded_spec(spec), "dataset": {"uri": dataset, "manifest_sha256": "f" * 64},
        "plan": {"global_batch_tokens": 2048}, "hardware": {"workers": 8, "use_gpu": True,
                                                            "devices": ["NVIDIA A100-SXM4-40GB"] * 8},
        "final": {"step": 10, "tokens": 20480, "session_s": 3000.0},
        "cost": {"sessions": 2, "wall_clock_s": 5400.0, "gpu_hours": 12.0, "usd": 32.94,
                 "usd_per_gpu_hour": 2.745}})
    storage.write_json(str(root / "eval" / "test_loss.json"), {
        "dataset": dataset, "test_tokens": 10000, "seq_len": 64,
        "results": [{"model": "tiny-run", "ref": "tiny-run", "checkpoint": str(checkpoint), "test_loss": 3.2109}]})
    storage.write_json(str(root / "eval" / "hellaswag.json"), {
        "items": 10042, "results": [{"model": "tiny-run", "ref": "tiny-run", "checkpoint": str(checkpoint),
                                     "acc": 0.2861, "acc_norm": 0.2955, "items": 10042}]})
    storage.write_json(str(root / "judge" / "summary.json"), {
        "judge": {"model": "gpt-4o-mini"}, "models": [{"model": "tiny-run", "base_model": "tiny-run", "mean": 31.5,
                                                        "ci95": [28.0, 35.1]}]})
    return root, model


def test_export_writes_a_model_card_from_run_json_and_bf16_weights(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file

    root, model = trained
    out = tmp_path / "export"
    assert main(["export", "tiny-run", str(out), "--set", f"storage_path={root}", "--dtype", "bf16"]) == 0
    assert "bf16) to" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "datasets:\n- HuggingFaceFW/fineweb\n" in card
    for fact in ("FineWeb sample-10BT", "| training tokens | 20,480 |", "| steps | 10 (2,048 tokens per step) |",
                 "| hardware | 8x NVIDIA A100-SXM4-40GB |", "| wall-clock | 90 min over 2 sessions |",
                 "12.0, $33 at $2.75/GPU-hour", "| test loss | 3.2109 on 10,000 held-out tokens",
                 "acc_norm 0.2955, acc 0.2861 on 10,042", "| IFT score | 31.5/100 (95% CI 28.0 - 35.1), judged by gpt-4o-mini",
                 "at commit `abc123`", "raygpt train spec.yaml", "name: tiny-run", "3.2M parameters: 2 layers"):
        assert fact in card, fact

    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out, dtype=torch.float32).eval()
    tokens = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (theirs(tokens).logits - model(tokens)[0]).abs().max().item()
    assert 0 < gap < 0.05  # bf16 rounding of the weights, nothing else


# ---------------------------------------------------------------------------------------------
# The Hub, served on 127.0.0.1


class FakeHub(BaseHTTPRequestHandler):
    """The part of the Hub's API that ``create_repo`` and ``upload_folder`` use: whoami, repo
    creation, the card's metadata check, preupload (every file "regular": sent inline) and the
    NDJSON commit."""

    received: dict[str, bytes] = {}
    calls: list[str] = []

    def log_message(self, *args):
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        self.calls.append(f"GET {self.path}")
        if self.path == "/api/whoami-v2":
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                return self._reply(401, {"error": "Invalid credentials"})
            return self._reply(200, {"type": "user", "name": "tester"})
        self._reply(404, {"error": f"not in the fake: {self.path}"})

    def do_POST(self):
        self.calls.append(f"POST {self.path}")
        body = self._body()
        endpoint = f"http://{self.headers['Host']}"
        if self.path == "/api/repos/create":
            request = json.loads(body)
            return self._reply(200, {"url": f"{endpoint}/{request['organization']}/{request['name']}",
                                     "name": f"{request['organization']}/{request['name']}"})
        if self.path == "/api/validate-yaml":  # the model card's metadata
            return self._reply(200, {"errors": [], "warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.received[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return self._reply(200, {"commitUrl": f"{endpoint}/tester/tiny/commit/{'0' * 40}",
                                     "commitOid": "0" * 40, "success": True})
        self._reply(404, {"error": f"not in the fake: {self.path}"})


class Unavailable(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(503, "Service Unavailable")
        self.send_header("Content-Length", "0")
        self.end_headers()


class Silent(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        time.sleep(5)  # never answers within the timeout


@pytest.fixture
def hub(monkeypatch):
    servers = []

    def serve(handler) -> str:
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        return endpoint

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_push_uploads_the_folder_with_its_card(trained, hub, tmp_path, capsys):
    pytest.importorskip("huggingface_hub")
    root, _ = trained
    FakeHub.received, FakeHub.calls = {}, []
    endpoint = hub(FakeHub)
    out = tmp_path / "export"
    assert main(["export", "tiny-run", str(out), "--set", f"storage_path={root}", "--push-to-hub", "tester/tiny"]) == 0
    assert f"pushed to {endpoint}/tester/tiny" in capsys.readouterr().out
    assert FakeHub.calls[0] == "GET /api/whoami-v2"
    assert {"README.md", "config.json", "model.safetensors"} <= set(FakeHub.received)
    for name, data in FakeHub.received.items():
        assert data == (out / name).read_bytes(), name
    assert "\n# tester/tiny\n" in FakeHub.received["README.md"].decode()  # the card names the repo


@pytest.mark.parametrize("handler, message", [
    (Unavailable, "the Hugging Face Hub at {endpoint} answered HTTP 503 Service Unavailable"),
    (Silent, "the Hugging Face Hub at {endpoint} cannot be reached (no answer within 1 s)"),
    (None, "the Hugging Face Hub at {endpoint} cannot be reached (Connection refused)"),
    ("bad token", "the Hugging Face Hub at {endpoint} rejects the token (HTTP 401)"),
])
def test_an_unreachable_or_refusing_hub_is_one_message_within_seconds(trained, hub, tmp_path, monkeypatch, capsys,
                                                                      handler, message):
    pytest.importorskip("huggingface_hub")
    root, _ = trained
    monkeypatch.setattr("raygpt.weights.hub.HUB_TIMEOUT_S", 1.0)
    if handler is None:  # a port nobody listens on
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
    elif handler == "bad token":
        endpoint = hub(FakeHub)
        monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    else:
        endpoint = hub(handler)
    started = time.monotonic()
    out = tmp_path / "export"
    assert main(["export", "tiny-run", str(out), "--set", f"storage_path={root}", "--push-to-hub", "tester/tiny"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("raygpt export: error: --push-to-hub tester/tiny: " + message.format(endpoint=endpoint))
    assert "nothing was exported" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # it failed before any work


def test_push_without_a_token_says_how_to_log_in(trained, monkeypatch, tmp_path, capsys):
    pytest.importorskip("huggingface_hub")
    root, _ = trained
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    assert main(["export", "tiny-run", str(tmp_path / "x"), "--set", f"storage_path={root}",
                 "--push-to-hub", "tester/tiny"]) == 2
    assert "no Hugging Face token: set HF_TOKEN or run `hf auth login`" in capsys.readouterr().err
