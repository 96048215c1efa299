"""Every stage on the same models, chained through their files: data prepare -> eval -> ift ->
judge -> report, for OpenAI's GPT-2 (a random stand-in under ``$RAYGPT_HF_DIR``) next to a
raygpt model, through the CLI, on a local Ray and a local OpenAI-compatible judge."""

from __future__ import annotations

import json

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


def test_all_stages_chain_for_openai_weights_and_a_raygpt_model(ray_local, workspace, capsys):
    root = workspace
    models = ["openai:gpt2", str(root / "ours")]
    with FakeOpenAI(models=["judge-1"]) as judge:
        spec = root / "pipeline.yaml"
        spec.write_text(f"""
name: pipeline
storage_path: {root / 'runs'}
data: {{source: {root / 'docs'}, output: {root / 'data'}, heldout_permille: 500, val_tokens: 200,
       test_tokens: 600, shard_tokens: 4000, num_proc: 1}}
eval: {{models: {json.dumps(models)}, dataset: {root / 'data'}, batch_size: 4, seq_len: 32}}
ift: {{data: {root / 'instructions.json'}, models: {json.dumps(models)}, epochs: 1, batch_size: 4,
      eval_interval: 2, max_new_tokens: 6}}
judge: {{base_url: {judge.base_url}, model: judge-1, passes: 2, backoff_s: 0.001,
        cache_dir: {root / 'judge-cache'}, bootstrap_samples: 200}}
report: {{output: {root / 'report'}, bootstrap_samples: 200}}
""")
        for verb in ("data", "eval", "ift", "judge", "report"):
            argv = ["data", "prepare", str(spec)] if verb == "data" else [verb, str(spec)]
            assert main(argv) == 0, f"raygpt {verb} failed: {capsys.readouterr().err}"

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
