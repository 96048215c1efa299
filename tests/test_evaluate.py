"""Test loss: one Ray task per model, the same fixed windows for every model, results merged
into test_loss.json in storage, a table on the terminal, clear errors."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.data.batches import eval_batches
from raygpt.data.manifest import load_manifest, manifest_hash
from raygpt.evaluate import evaluate, token_loss_sums
from raygpt.model import GPT, PRESETS
from raygpt.storage import Storage, join
from raygpt.train.components import RngState, TrainerState, choose_precision
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import save_model_dir, save_training_checkpoint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def models(ray_local, tiny_dataset, tmp_path_factory):
    """Two small models in the test store: a run (``short``, context 32, as a run folder with a
    checkpoint) and a model-only folder (``long``, context 64)."""
    root = f"s3://raygpt-test/eval-{os.urandom(4).hex()}"
    local = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    short = GPT(replace(PRESETS["tiny"], context_length=32)).eval()
    long = GPT(PRESETS["tiny"]).eval()
    state = TrainerState(WarmupCosine(1e-3, 1, 10), choose_precision("fp32", torch.device("cpu")).scaler, 0,
                         load_spec(None), 1)
    state.step, state.tokens_seen = 10, 10 * 1024
    save_training_checkpoint(local / "short", 0, model=short, optimizer=short.configure_optimizer(
        1e-3, 0.1, (0.9, 0.95), "cpu"), trainer=state, rng=RngState())
    save_model_dir(long, long.config, local / "long")
    Storage().upload(local / "short", join(root, "short", "checkpoint_00000010"))
    Storage().upload(local / "long", join(root, "ift", "long", "model"))
    (local / "spec.yaml").write_text(f"storage_path: {root}\neval:\n  dataset: {tiny_dataset}\n  batch_size: 4\n")
    return root, str(local / "spec.yaml"), {"short": short, "long": long}


def direct_loss(model, dataset: str, seq_len: int) -> float:
    total, count = token_loss_sums(model, eval_batches(dataset, Storage(), "test", seq_len, 7), "cpu")
    return total / count


def test_every_model_is_scored_on_the_same_windows(models, tiny_dataset, capsys):
    root, spec_path, nets = models
    long_ref = join(root, "ift", "long", "model")
    assert main(["eval", spec_path, "--model", "short", "--model", long_ref]) == 0
    out = capsys.readouterr().out
    assert "short" in out and "model" in out and "test loss" in out

    storage = Storage()
    document = storage.read_json(join(root, "eval", "test_loss.json"))
    manifest = load_manifest(tiny_dataset, storage)
    assert document["dataset"] == tiny_dataset and document["manifest_sha256"] == manifest_hash(manifest)
    assert document["seq_len"] == 32  # the shorter context of the two, for both
    windows = (manifest["splits"]["test"]["tokens"] - 1) // 32
    assert document["test_tokens"] == windows * 32
    results = {r["ref"]: r for r in document["results"]}
    assert set(results) == {"short", long_ref}
    assert results["short"]["model"] == "short" and results[long_ref]["model"] == "model"
    assert (results["short"]["step"], results["short"]["trained_tokens"]) == (10, 10240)
    for ref, net in (("short", nets["short"]), (long_ref, nets["long"])):
        # Deterministic, and independent of the batch size.
        assert results[ref]["test_loss"] == pytest.approx(direct_loss(net, tiny_dataset, 32), rel=1e-6)
        assert results[ref]["tokens"] == windows * 32 and results[ref]["params"] == net.num_params()

    # A later evaluation of one model keeps the other's result.
    spec = load_spec(spec_path)
    again = evaluate(spec, ["short"])
    assert {r["ref"] for r in again["results"]} == {"short", long_ref}
    assert [r["test_loss"] for r in again["results"] if r["ref"] == "short"] == [results["short"]["test_loss"]]


def test_a_missing_model_fails_before_any_task(models, capsys):
    root, spec_path, _ = models
    assert main(["eval", spec_path, "--model", "short", "--model", "no-such-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raygpt eval: error: model 'no-such-run': no checkpoint found") and "Traceback" not in err
    assert main(["eval", spec_path]) == 2
    assert "eval.models: no models to evaluate" in capsys.readouterr().err
    assert main(["eval", spec_path, "--model", "openai:gpt5"]) == 2
    assert "openai:gpt5: unknown OpenAI model" in capsys.readouterr().err


HELLASWAG_SAMPLE = [
    {"ind": 24, "ctx": "A man is sitting on a roof. he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "label": 3},
    {"ctx": "The cat sat on the mat. Then it",
     "endings": ["fell asleep.", "ate a sandwich with a fork and knife.", "flew.", "purred softly in the sun."],
     "label": 0},
    {"ctx": "She opened the oven and", "endings": ["took out the bread.", "sang.", "closed it again quickly.", "left."],
     "label": 2},
    {"ctx": "He tied his shoes and",
     "endings": ["went for a run.", "read a book.", "drove the bus to the city centre.", "slept."], "label": 0},
    {"ctx": "The children built a sandcastle, and then the tide", "endings": ["came in.", "sang.", "left.", "froze."],
     "label": 0},
]


def test_hellaswag_scores_checkpoints_and_is_merged_by_model(models, tmp_path, capsys):
    import json

    from rich.console import Console

    from raygpt.hellaswag import parse_items, score_items
    from raygpt.report import build_report, render_terminal

    root, spec_path, nets = models
    data = tmp_path / "hellaswag_sample.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in HELLASWAG_SAMPLE))
    long_ref = join(root, "ift", "long", "model")
    flags = ["--set", f"eval.hellaswag_data={data}", "--set", "eval.hellaswag_max_items=4"]
    assert main(["eval", spec_path, "--task", "hellaswag", "--model", "short", *flags]) == 0
    out = capsys.readouterr().out
    assert "HellaSwag on 4 items" in out and "acc_norm" in out
    assert main(["eval", spec_path, "--task", "hellaswag", "--model", long_ref, *flags]) == 0

    document = Storage().read_json(join(root, "eval", "hellaswag.json"))
    assert document["items"] == 4 and document["data"] == str(data) and len(document["data_sha256"]) == 64
    items = parse_items(data.read_bytes(), str(data))[:4]
    results = {r["ref"]: r for r in document["results"]}
    assert set(results) == {"short", long_ref}  # the second evaluation kept the first's result
    for ref, net in (("short", nets["short"]), (long_ref, nets["long"])):
        direct = score_items(net, items, "cpu")
        assert {k: results[ref][k] for k in ("acc", "acc_norm", "correct", "correct_norm", "items")} == direct
    assert results["short"]["step"] == 10

    # The report shows the column beside the test loss.
    report = build_report(load_spec(spec_path), Storage())
    by_model = {row.model: row for row in report.rows}
    assert by_model["short"].hellaswag == results["short"]["acc_norm"]
    render_terminal(report, Console(width=200))
    assert "HellaSwag" in capsys.readouterr().out


def test_hellaswag_source_problems_are_one_line(models, tmp_path, capsys):
    _, spec_path, _ = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"ctx": "x", "endings": ["a", "b"], "label": 0}\n')
    assert main(["eval", spec_path, "--task", "hellaswag", "--model", "short", "--set",
                 f"eval.hellaswag_data={bad}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raygpt eval: error: {bad}:1: 2 endings, expected 4") and "Traceback" not in err
    assert main(["eval", spec_path, "--task", "hellaswag", "--model", "nope", "--set",
                 f"eval.hellaswag_data={bad}"]) == 2  # a bad model fails before the data is read
    assert "model 'nope': no checkpoint found" in capsys.readouterr().err
