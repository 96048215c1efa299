"""The report: rows joined from eval, judge and runs, sorted by test loss, in every backend."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
from rich.console import Console

from raygpt.cli import main
from raygpt.config import load_spec
from raygpt.report import build_report, describe_agreement, loss_score_correlation, render_terminal, write_report
from raygpt.storage import Storage

# (model, test loss, IFT score, params); deliberately not in test-loss order.
MODELS = [("gpt2-small-run", 3.674, 17.09, 163_000_000), ("openai-gpt2-medium", 3.231, 38.53, 355_000_000),
          ("tiny-run", 5.9, 4.0, 10_000_000)]


def write_eval(root: Path, models=MODELS, extra: list[dict] = ()) -> None:
    (root / "eval").mkdir(parents=True, exist_ok=True)
    results = [{"model": m, "ref": m, "test_loss": loss, "tokens": 10_000, "params": params,
                "trained_tokens": 2_000_000} for m, loss, _, params in models]
    (root / "eval" / "test_loss.json").write_text(json.dumps(
        {"dataset": "s3://bucket/fineweb", "manifest_sha256": "ab" * 32, "test_tokens": 10_000,
         "results": results + list(extra)}))


def item_scores(mean: float, n: int = 40, spread: float = 10.0, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    scores = np.clip(mean + rng.normal(0, spread, n), 0, 100)
    return [float(s) for s in scores - scores.mean() + mean]  # exactly ``mean`` on average


def write_summary(root: Path, models=MODELS, base_models: dict[str, str] | None = None, spread: float = 10.0) -> None:
    (root / "judge").mkdir(parents=True, exist_ok=True)
    entries = []
    for k, (m, _, score, _) in enumerate(models):
        entries.append({"model": m, "base_model": (base_models or {}).get(m, m), "mean": score,
                        "ci95": [score - 2.5, score + 2.5], "spread": 0.8, "failures": k, "items_scored": 40,
                        "item_scores": item_scores(score, spread=spread, seed=k)})
    anchors = {"@reference": {"mean": 93.2, "ci95": [91.0, 95.0]}, "@empty": {"mean": 1.5, "ci95": [0.5, 2.5]}}
    (root / "judge" / "summary.json").write_text(json.dumps({
        "format": "raygpt-judge-summary/1", "items": 40, "models": entries, "anchors": anchors,
        "judge": {"model": "gpt-4o-mini", "mode": "comparative", "template": "comparative/comparative-v1", "passes": 3},
        "rank_agreement": {"spearman": 1.0, "kendall": 1.0, "item_kendall": 0.8},
        "position_bias": {"range": 2.5, "by_position": []}, "calls": {}, "usage": {}}))


def write_run(root: Path, name: str, steps: int = 30, devices: list[str] | None = None) -> None:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(0, steps, 2):
        record = {"step": step, "tokens": step * 4096, "loss": 3 + 8 * np.exp(-step / 8), "lr": 1e-3}
        if step % 10 == 0:
            record["val_loss"] = record["loss"] + 0.05
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    hardware = {"workers": len(devices or [1]), "use_gpu": bool(devices), "devices": devices or []}
    (run / "run.json").write_text(json.dumps({"name": name, "status": "finished", "hardware": hardware,
                                              "final": {"step": steps - 2, "tokens": (steps - 2) * 4096}}))


def spec_for(root: Path, *settings: str):
    return load_spec(None, [f"storage_path={root}", f"report.output={root / 'report'}", "report.bootstrap_samples=400",
                            *settings])


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 500
    assert pixels[..., :3].std() > 0.05, "a blank image"
    rgb = (pixels[..., :3] * 255).astype(np.uint32)
    colours = np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2])
    assert len(colours) > 50, "too few colours for a plot"


def test_rows_sorted_by_test_loss_in_every_backend(tmp_path):
    write_eval(tmp_path)
    write_summary(tmp_path)
    write_run(tmp_path, "gpt2-small-run", devices=["NVIDIA A100-SXM4-40GB"] * 8)
    write_run(tmp_path, "tiny-run")
    spec = spec_for(tmp_path)
    report = build_report(spec, Storage())
    assert [r.model for r in report.rows] == ["openai-gpt2-medium", "gpt2-small-run", "tiny-run"]
    small = report.rows[1]
    assert (small.test_loss, small.ift_score, small.ci_low, small.ci_high, small.failures) == (3.674, 17.09, 14.59, 19.59, 0)
    assert small.trained_on == "8x NVIDIA A100-SXM4-40GB" and report.rows[2].trained_on == "1x CPU worker"
    assert report.rows[0].trained_on is None  # OpenAI's weights: no run of ours

    written = write_report(report, spec.report.output)
    out = tmp_path / "report"
    assert sorted(p.name for p in written) == ["loss_vs_score.png", "report.csv", "report.json", "report.md",
                                               "training_curves.png"]
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert [r["model"] for r in rows] == ["openai-gpt2-medium", "gpt2-small-run", "tiny-run"]
    assert rows[0]["test_loss"] == "3.231" and rows[0]["ift_score"] == "38.53" and rows[2]["failures"] == "2"

    data = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in data["rows"]] == [r["model"] for r in rows]
    assert data["anchors"]["@reference"]["mean"] == 93.2
    assert data["correlation"]["spearman"] == -1.0 and data["correlation"]["models"] == 3
    assert set(data["runs"]) == {"gpt2-small-run", "tiny-run"} and data["missing"] == []

    markdown = (out / "report.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| model | test loss | IFT score | 95% CI |")
    assert table[1].startswith("| openai-gpt2-medium | 3.231 | 38.53 | 36.03 - 41.03 | 3 | 1 | 355M | 2.0M | - |")
    assert table[2].startswith("| gpt2-small-run | 3.674 | 17.09 |")
    assert "anchor reference answer: 93.20" in markdown
    assert "test loss and IFT score agree (lower loss, higher score): Spearman -1.00, 95% CI -1.00 to" in markdown
    assert "![IFT score vs. test loss](loss_vs_score.png)" in markdown

    assert_real_png(out / "loss_vs_score.png")
    assert_real_png(out / "training_curves.png")

    console = Console(file=io.StringIO(), width=160)
    render_terminal(report, console)
    text = console.file.getvalue()
    assert text.index("openai-gpt2-medium") < text.index("gpt2-small-run") < text.index("tiny-run")
    assert "anchor empty answer: 1.50" in text and "(3 models, items resampled)" in text


def test_spearman_of_loss_and_score_with_an_item_bootstrap(tmp_path):
    models = [("a", 3.0, 60.0, 1), ("b", 3.2, 70.0, 1), ("c", 3.4, 40.0, 1), ("d", 3.6, 30.0, 1)]
    write_eval(tmp_path, models)
    write_summary(tmp_path, models, spread=30)  # noisy enough per item for ranks to swap in resamples
    report = build_report(spec_for(tmp_path), Storage())
    c = report.correlation
    # Loss ranks 1,2,3,4 against score ranks 3,4,2,1: rho = 1 - 6 * 18 / (4 * 15) = -0.8.
    assert c["spearman"] == pytest.approx(-0.8)
    assert c["ci95"][0] <= c["spearman"] <= c["ci95"][1] and c["ci95"][0] < c["ci95"][1]
    assert c["ci95"][0] >= -1 and c["ci95"][1] <= 1
    again = loss_score_correlation(report.rows, 400, 123)
    other_seed = loss_score_correlation(report.rows, 400, 7)
    assert again == c and other_seed["ci95"] != c["ci95"]


def test_answers_join_their_base_models_row(tmp_path):
    write_eval(tmp_path)
    write_summary(tmp_path, [("gpt2-small-run-ift", 0, 17.09, 0)], base_models={"gpt2-small-run-ift": "gpt2-small-run"})
    report = build_report(spec_for(tmp_path), Storage())
    joined = next(r for r in report.rows if r.model == "gpt2-small-run")
    assert (joined.test_loss, joined.ift_score) == (3.674, 17.09)
    assert len(report.rows) == 3
    assert report.correlation is None  # one model with both numbers: no correlation to speak of


def test_missing_pieces_leave_gaps_and_are_named(tmp_path):
    write_eval(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "loss_vs_score.png").write_bytes(b"stale")
    spec = spec_for(tmp_path)
    report = build_report(spec, Storage())
    written = {p.name for p in write_report(report, spec.report.output)}
    assert written == {"report.md", "report.json", "report.csv"}
    assert not (tmp_path / "report" / "loss_vs_score.png").exists(), "a stale plot would mislead"
    assert all(r.ift_score is None for r in report.rows) and report.rows[0].test_loss == 3.231
    assert any("no " in m and "summary.json" in m and "raygpt judge" in m for m in report.missing)
    assert any("training curves" in m for m in report.missing)
    assert "missing: IFT scores" in (tmp_path / "report" / "report.md").read_text()

    # Nothing at all: still a report, saying what to run.
    empty = build_report(spec_for(tmp_path / "nothing"), Storage())
    assert empty.rows == [] and len(empty.missing) == 3


def test_report_command_writes_into_output(tmp_path, capsys):
    write_eval(tmp_path)
    write_summary(tmp_path)
    out = tmp_path / "elsewhere"
    assert main(["report", "--set", f"storage_path={tmp_path}", "--set", "report.bootstrap_samples=100",
                 "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"report.md", "report.json", "report.csv", "loss_vs_score.png"}
    out = capsys.readouterr().out
    assert "openai-gpt2-medium" in out and "trained on" not in out, "no run records: no hardware column"


def test_malformed_inputs_are_one_clear_error(tmp_path, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "test_loss.json").write_text('{"results": [{"loss": 3.2}]}')
    assert main(["report", "--set", f"storage_path={tmp_path}", "--output", str(tmp_path / "r")]) == 2
    assert "test_loss.json: expected a 'results' list of objects with a 'model' id" in capsys.readouterr().err


@pytest.mark.integration
def test_judge_then_report_end_to_end(tmp_path, monkeypatch):
    from fake_openai import FakeOpenAI
    from test_judge import QUALITY, make_spec, quiet, write_answers

    from raygpt.judge.run import run_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    write_answers(tmp_path)
    with FakeOpenAI(models=["judge-1"]) as server:
        run_judge(make_spec(tmp_path, server), Storage(), quiet())
    losses = {"strong": 3.1, "medium": 3.5, "weak": 4.2}
    write_eval(tmp_path, [(m, losses[m], None, 124_000_000) for m in QUALITY])
    report = build_report(spec_for(tmp_path), Storage())
    assert [(r.model, r.ift_score) for r in report.rows] == [("strong", 80), ("medium", 55), ("weak", 30)]
    assert report.correlation["spearman"] == -1.0
    assert report.anchors["@reference"]["mean"] == 95 and report.rows[0].passes == 2


@pytest.mark.integration
def test_judge_and_report_over_s3(s3_env, tmp_path, monkeypatch):
    """Answers, cache, judgements and the report's inputs all in the object store."""
    import uuid

    from fake_openai import FakeOpenAI
    from test_judge import QUALITY, make_spec, quiet, write_answers

    from raygpt.judge.run import run_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    storage = Storage()
    root = f"s3://{s3_env.bucket}/report-test-{uuid.uuid4().hex[:8]}"
    for path in write_answers(tmp_path, n_items=3):
        storage.upload(path, f"{root}/ift/answers/{path.name}")
    storage.write_json(f"{root}/eval/test_loss.json", {"results": [
        {"model": m, "ref": m, "test_loss": 5 - q / 100} for m, q in QUALITY.items()]})
    with FakeOpenAI(models=["judge-1"]) as server:
        spec = make_spec(tmp_path, server, f"storage_path={root}", f"judge.cache_dir={root}/cache")
        run_judge(spec, storage, quiet())
        server.reset_counts()
        assert run_judge(spec, storage, quiet())["calls"]["cache_hits"] == 6 and server.requests == []
    assert storage.exists(f"{root}/judge/summary.json") and storage.exists(f"{root}/judge/judgements.jsonl")
    report = build_report(spec_for(tmp_path, f"storage_path={root}"), storage)
    assert [(r.model, r.ift_score) for r in report.rows] == [("strong", 80), ("medium", 55), ("weak", 30)]
    assert report.sources["judge"] == f"{root}/judge/summary.json"


@pytest.mark.integration
def test_replicates_groups_length_and_pair_sentences_reach_the_report(tmp_path, monkeypatch):
    from fake_openai import FakeOpenAI
    from test_judge import make_spec, noisy_judge, quiet, write_scored_answers

    from raygpt.judge.run import run_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    rng = np.random.default_rng(0)
    item = rng.normal(0, 10, 30)
    qualities = {f"{m}@seed{k}": np.round(q + offset + item + rng.normal(0, 3, 30))
                 for m, q in (("big", 75), ("mid", 55), ("small", 35)) for k, offset in ((1, -3), (2, 0), (3, 3))}
    write_scored_answers(tmp_path, qualities)
    with FakeOpenAI(models=["judge-1"]) as server:
        server.policy = noisy_judge(server, sd=4)
        run_judge(make_spec(tmp_path, server), Storage(), quiet())
    write_eval(tmp_path, [("big", 3.1, None, 1), ("mid", 3.5, None, 1), ("small", 4.0, None, 1)])
    spec = spec_for(tmp_path)
    report = build_report(spec, Storage())
    assert [(r.model, r.letters, r.seeds) for r in report.rows] == [("big", "a", 3), ("mid", "b", 3), ("small", "c", 3)]
    assert all(r.lc_score is not None and r.mean_length > 10 and len(r.replicate_scores) == 3 for r in report.rows)
    c = report.correlation
    assert c["resampled"] == "items and seeds" and c["seeds"] == [3, 3, 3]
    assert c["sentence"].startswith("test loss and IFT score agree (lower loss, higher score): Spearman -1.00")

    write_report(report, spec.report.output)
    markdown = (tmp_path / "report" / "report.md").read_text()
    header = "| model | test loss | IFT score | 95% CI | group | length-controlled | answer length | seeds | passes |"
    assert header in markdown
    assert markdown.count("survives fine-tuning noise") == 3, "one sentence per pair, with the seed variance"
    assert "big - mid: +" in markdown and "with 3 fine-tuning seeds each" in markdown
    assert "agreement between passes on the same answers: Spearman" in markdown
    assert "with no bias at all" in markdown and "points per 100 characters" in markdown
    assert_real_png(tmp_path / "report" / "loss_vs_score.png")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert "item_scores_by_seed" not in data["rows"][0] and data["judge"]["comparisons"]["seed_robust"]


@pytest.mark.integration
def test_pools_reach_the_report_as_one_row_each_with_their_letters_and_sentences(tmp_path, monkeypatch, capsys):
    from fake_openai import FakeOpenAI
    from test_judge import POOLS, make_spec, noisy_judge, quiet, write_pooled_answers

    from raygpt.judge.run import run_judge

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    write_pooled_answers(tmp_path)
    with FakeOpenAI(models=["judge-1"]) as server:
        server.policy = noisy_judge(server, sd=3)
        run_judge(make_spec(tmp_path, server, POOLS), Storage(), quiet())
    losses = {"wd@1337": 3.30, "wd@1": 3.32, "wd@2": 3.31, "base@1337": 3.60, "base@1": 3.62, "base@2": 3.58,
              "other": 4.0}
    write_eval(tmp_path, [(m, loss, None, 124_000_000) for m, loss in losses.items()])
    for member in ("wd@1337", "wd@1"):
        write_run(tmp_path, member)
        record = json.loads((tmp_path / member / "run.json").read_text())
        (tmp_path / member / "run.json").write_text(json.dumps({**record, "cost": {"gpu_hours": 1.5, "usd": 3.0}}))
    spec = spec_for(tmp_path)
    report = build_report(spec, Storage())

    # Each pool is one row in place of its base models: their mean test loss, its own score and letters.
    assert [(r.model, r.letters, r.pretraining_seeds, r.seeds) for r in report.rows] == [
        ("wd", "a", 3, 6), ("base", "b", 3, 6), ("other", "c", None, 2)]
    wd = report.rows[0]
    assert wd.test_loss == pytest.approx(3.31) and wd.test_losses == [3.30, 3.32, 3.31]
    assert (wd.gpu_hours, wd.cost_usd, wd.params) == (3.0, 6.0, 124_000_000)
    assert wd.ci_low < wd.ift_score < wd.ci_high and len(wd.replicate_scores) == 6
    c = report.correlation
    assert c["resampled"] == "items, pretraining and fine-tuning seeds" and c["pretraining_seeds"] == [3, 3, 1]
    assert c["spearman"] == -1.0 and c["seeds"] == [6, 6, 2]

    write_report(report, spec.report.output)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| seeds | pretraining seeds |" in markdown and "| wd | 3.310 |" in markdown
    assert "wd@1337 |" not in markdown, "a pooled base model has no row of its own"
    assert "with 3 pretraining seeds each): the difference survives seed noise" in markdown
    assert "with 3 pretraining seeds and 2 fine-tuning seeds): the difference survives seed noise" in markdown
    assert "group: models sharing a letter cannot be told apart (tests that include the pretraining and " \
           "fine-tuning seed variance, Holm-adjusted)" in markdown
    assert "(3 models, items, pretraining and fine-tuning seeds resampled)" in markdown
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["rows"][0]["pretraining_seeds"] == 3 and "item_scores_by_run" not in data["rows"][0]
    assert_real_png(tmp_path / "report" / "loss_vs_score.png")

    assert main(["report", "--set", f"storage_path={tmp_path}", "--set", "report.bootstrap_samples=100",
                 "--output", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "pretraining seeds" in out and "wd - base: +" in out


def test_the_loss_score_sentence_says_agree_disagree_or_cannot_tell():
    assert describe_agreement(-1.0, [-1.0, -0.6]) == \
        "test loss and IFT score agree (lower loss, higher score): Spearman -1.00, 95% CI -1.00 to -0.60"
    assert describe_agreement(0.4, [-0.5, 0.9]) == \
        "test loss and IFT score: cannot tell at this sample size (Spearman 0.40, 95% CI -0.50 to 0.90)"
    assert describe_agreement(0.8, [0.2, 1.0]).startswith("test loss and IFT score disagree")
    assert "cannot tell" in describe_agreement(None, [None, None])
