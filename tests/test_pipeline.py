"""Every stage on the same models, chained through their files: data prepare -> train ->
export -> eval -> ift -> judge -> report, for OpenAI's GPT-2 (a random stand-in under
``$RAYGPT_HF_DIR``) next to a raygpt model, through the CLI, on a local Ray and a local
OpenAI-compatible judge. Every URL of the spec carries a password, which works where a URL
can use one and appears in no file any stage writes, nor in anything printed."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from fake_openai import EMPTY_SCORE, REFERENCE_SCORE, FakeOpenAI

from raygpt.cli import main
from raygpt.model import GPT, GPTConfig
from raygpt.weights.checkpoint import save_model_dir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

RAYGPT_TINY = GPTConfig(n_layer=1, n_head=2, n_embd=32, context_length=96)
WORDS = "the of and to in is was for on that with as by at from which have an be this are".split()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A corpus, an instruction file, OpenAI's 'gpt2' (random, tiny) and a raygpt model folder."""
    generator = torch.Generator().manual_seed(3)
    (tmp_path / "docs").mkdir()
    for i in range(40):
        picks = torch.randint(0, len(WORDS), (120,), generator=generator).tolist()
        (tmp_path / "docs" / f"{i:02d}.txt").write_text(" ".join(WORDS[j] for j in picks))
    instructions = [{"instruction": f"Repeat the word {w}.", "input": "" if i % 2 else w, "output": f"{w} {w}"}
                    for i, w in enumerate(WORDS)]
    (tmp_path / "instructions.json").write_text(json.dumps(instructions))

    torch.manual_seed(1)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(hf_config).save_pretrained(tmp_path / "hf" / "gpt2", safe_serialization=True)
    monkeypatch.setenv("RAYGPT_HF_DIR", str(tmp_path / "hf"))
    monkeypatch.setenv("RAYGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-pipeline-test-key")
    torch.manual_seed(2)
    save_model_dir(GPT(RAYGPT_TINY), RAYGPT_TINY, tmp_path / "ours")
    return tmp_path


PASSWORD = "pw-7Q2xVz9-never-recorded"
HELLASWAG = [{"ctx": "The cat sat on the mat. Then it", "label": 0,
              "endings": ["fell asleep.", "ate a sandwich.", "flew.", "purred."]},
             {"ctx": "She opened the oven and", "label": 2,
              "endings": ["took out bread.", "sang.", "closed it.", "left."]}]


class PasswordFiles:
    """Files served on loopback only to HTTP Basic auth with ``user:PASSWORD``."""

    def __init__(self, root: Path):
        expected = "Basic " + base64.b64encode(f"user:{PASSWORD}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                path = root / self.path.lstrip("/")
                ok = self.headers.get("Authorization") == expected and path.is_file()
                body = path.read_bytes() if ok else b""
                self.send_response(200 if ok else 401)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://user:{PASSWORD}@127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_all_stages_chain_for_openai_weights_and_a_raygpt_model(ray_local, workspace, capsys, monkeypatch):
    pytest.importorskip("wandb")
    root = workspace
    (root / "hellaswag.jsonl").write_text("".join(json.dumps(item) + "\n" for item in HELLASWAG))
    monkeypatch.setenv("WANDB_SILENT", "true")
    models = ["openai:gpt2", str(root / "ours")]
    with FakeOpenAI(models=["judge-1"]) as judge, PasswordFiles(root) as files:
        judge_url = judge.base_url.replace("http://", f"http://judge:{PASSWORD}@")
        spec = root / "pipeline.yaml"
        spec.write_text(f"""
name: pipeline
storage_path: {root / 'runs'}
data: {{source: {root / 'docs'}, output: {root / 'data'}, heldout_permille: 500, val_tokens: 200,
       test_tokens: 600, shard_tokens: 4000, num_proc: 1}}
model: {{preset: tiny}}
train: {{dataset: {root / 'data'}, seq_len: 32, global_batch_tokens: 128, micro_batch_size: 4, max_steps: 2,
        warmup_steps: 1, log_interval: 1, val_interval: 0, precision: fp32}}
checkpoint: {{interval: 1}}
eval: {{models: {json.dumps(models)}, dataset: {root / 'data'}, batch_size: 4, seq_len: 32,
       tasks: [test_loss, hellaswag], hellaswag_data: {files.url}/hellaswag.jsonl}}
ift: {{data: {files.url}/instructions.json, models: {json.dumps(models)}, epochs: 1, batch_size: 4,
      eval_interval: 2, max_new_tokens: 6}}
judge: {{base_url: {judge_url}, model: judge-1, passes: 2,
        cache_dir: {root / 'judge-cache'}, bootstrap_samples: 200}}
report: {{output: {root / 'report'}, bootstrap_samples: 200}}
log: {{trackers: [tensorboard, wandb], wandb_mode: offline, wandb_dir: {root / 'wandb'}, sample_prompts: []}}
""")
        printed = []
        for argv in (["data", "prepare", str(spec)], ["train", str(spec)],
                     ["export", "pipeline", str(root / "hf-out"), str(spec)], ["eval", str(spec)],
                     # ift's tracker config holds no URL: TensorBoard shows that alike, without W&B's start-up
                     ["ift", str(spec), "--set", "log.trackers=[tensorboard]"], ["judge", str(spec)],
                     ["report", str(spec)]):
            code = main(argv)
            printed.append(capsys.readouterr())
            assert code == 0, f"raygpt {argv[0]} failed: {printed[-1].err}"

    # The judge URL's user:password lost to the API key: one Authorization header, the key's.
    sent = {value for r in judge.chat_requests for key, value in r.headers.items() if key.lower() == "authorization"}
    assert sent == {"Bearer sk-pipeline-test-key"}
    # The password reached what it was for, and nothing else: no file any stage wrote (records,
    # checkpoints, the model card, tracker files, results, caches) and nothing printed.
    hellaswag = json.loads((root / "runs" / "eval" / "hellaswag.json").read_text())
    assert hellaswag["data"] == f"{files.url}/hellaswag.jsonl".replace(f"user:{PASSWORD}@", "")
    assert "model.safetensors" in {p.name for p in (root / "hf-out").iterdir()}
    written = [p for p in root.rglob("*") if p.is_file() and p != spec]
    assert any(p.name == "trainer_state.json" for p in written) and any("wandb" in p.parts for p in written)
    assert [p for p in written if PASSWORD.encode() in p.read_bytes()] == []
    assert not any(PASSWORD in out.out + out.err for out in printed)
    worker_logs = Path(ray_local._private.worker._global_node.get_logs_dir_path())  # what Ray workers printed
    assert [p for p in worker_logs.rglob("*") if p.is_file() and PASSWORD.encode() in p.read_bytes()] == []

    report = json.loads((root / "report" / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"openai-gpt2", "ours"}
    losses = [row["test_loss"] for row in report["rows"]]
    assert losses == sorted(losses) and all(loss > 0 for loss in losses)  # sorted by test loss
    for row in rows.values():
        assert 0 <= row["ift_score"] <= 100 and row["ci_low"] <= row["ift_score"] <= row["ci_high"]
        assert row["passes"] == 2 and row["failures"] == 0
    # The hidden anchors got what the judge gives a perfect and an empty answer.
    assert {name: anchor["mean"] for name, anchor in report["anchors"].items()} == {
        "@reference": REFERENCE_SCORE, "@empty": EMPTY_SCORE}
    # 2 models + 2 anchors, one comparative call per test item and pass.
    answers = json.loads((root / "runs" / "ift" / "answers" / "openai-gpt2.json").read_text())
    assert len(judge.chat_requests) == 2 * len(answers["items"])
    for name in ("report.md", "report.csv", "loss_vs_score.png"):
        assert (root / "report" / name).stat().st_size > 0
