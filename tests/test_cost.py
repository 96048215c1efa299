"""What a run cost: GPU-hours, wall-clock and dollars over its sessions, priced by the spec or by a
dated list price, and shown by ``raygpt report`` beside tokens/s with the HellaSwag column."""

from __future__ import annotations

import csv
import io
import json

import pytest
from rich.console import Console

from raygpt.config import load_spec
from raygpt.cost import LIST_PRICES_DATE, list_price, run_cost
from raygpt.report import build_report, render_terminal, to_csv, to_json
from raygpt.storage import Storage


def test_a_gpu_run_is_priced_at_its_instance_types_list_price_over_all_sessions():
    price, source = list_price("NVIDIA A100-SXM4-40GB")
    assert price == pytest.approx(21.96 / 8) and source == f"p4d.24xlarge on-demand list price ({LIST_PRICES_DATE}, us-east-1)"
    first = run_cost(workers=8, use_gpu=True, session_s=1800, device="NVIDIA A100-SXM4-40GB", gpu_hour_usd=None)
    assert (first["sessions"], first["gpu_hours"], first["wall_clock_s"]) == (1, 4.0, 1800)
    assert first["usd"] == pytest.approx(4.0 * 21.96 / 8)
    second = run_cost(workers=4, use_gpu=True, session_s=3600, device="NVIDIA A100-SXM4-40GB", gpu_hour_usd=None,
                      previous=first)
    assert (second["sessions"], second["gpu_hours"], second["wall_clock_s"]) == (2, 8.0, 5400)
    assert second["usd"] == pytest.approx(8.0 * 21.96 / 8)
    assert list_price("NVIDIA H100 80GB HBM3")[0] == pytest.approx(55.04 / 8)


def test_the_specs_price_wins_and_unknown_gpus_or_cpu_runs_have_no_dollars_without_one():
    spot = run_cost(workers=8, use_gpu=True, session_s=3600, device="NVIDIA H100 80GB HBM3", gpu_hour_usd=2.5)
    assert spot["usd"] == pytest.approx(20.0) and spot["price_source"] == "train.gpu_hour_usd"
    unknown = run_cost(workers=2, use_gpu=True, session_s=3600, device="NVIDIA L4", gpu_hour_usd=None)
    assert unknown["gpu_hours"] == 2.0 and unknown["usd"] is None
    cpu = run_cost(workers=2, use_gpu=False, session_s=1800, device="cpu (Intel Xeon)", gpu_hour_usd=None)
    assert (cpu["gpu_hours"], cpu["worker_hours"], cpu["usd"]) == (0.0, 1.0, None)
    # A priced session after an unpriced one: the run's total is unknown, not understated.
    assert run_cost(workers=2, use_gpu=True, session_s=3600, device="NVIDIA A100", gpu_hour_usd=None,
                    previous=unknown)["usd"] is None


def test_spec_rejects_a_negative_price():
    with pytest.raises(Exception, match="train.gpu_hour_usd: must not be negative"):
        load_spec(None, ["train.gpu_hour_usd=-1"])


def test_report_shows_hellaswag_tokens_per_s_gpu_hours_and_cost(tmp_path):
    run = tmp_path / "big-run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 5_242_880, "loss": 4.0}) + "\n")
    (run / "run.json").write_text(json.dumps({
        "status": "finished", "hardware": {"workers": 8, "use_gpu": True, "devices": ["NVIDIA A100-SXM4-40GB"] * 8},
        "final": {"step": 10, "tokens": 5_242_880, "tokens_per_s": 1_234_567.0},
        "cost": {"sessions": 1, "wall_clock_s": 7200.0, "gpu_hours": 16.0, "usd": 43.92}}))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "test_loss.json").write_text(json.dumps({"test_tokens": 100, "results": [
        {"model": "big-run", "ref": "big-run", "test_loss": 3.3, "params": 124_000_000},
        {"model": "openai-gpt2", "ref": "openai:gpt2", "test_loss": 3.2, "params": 124_000_000}]}))
    (tmp_path / "eval" / "hellaswag.json").write_text(json.dumps({"items": 10042, "results": [
        {"model": "big-run", "ref": "big-run", "acc": 0.28, "acc_norm": 0.2911, "items": 10042},
        {"model": "openai-gpt2", "ref": "openai:gpt2", "acc": 0.2863, "acc_norm": 0.2955, "items": 10042}]}))
    report = build_report(load_spec(None, [f"storage_path={tmp_path}"]), Storage())
    rows = {row.model: row for row in report.rows}
    assert (rows["big-run"].hellaswag, rows["openai-gpt2"].hellaswag) == (0.2911, 0.2955)
    assert (rows["big-run"].tokens_per_s, rows["big-run"].gpu_hours, rows["big-run"].cost_usd) == (1_234_567.0, 16.0,
                                                                                                   43.92)
    console = Console(file=io.StringIO(), width=250)
    render_terminal(report, console)
    text = console.file.getvalue()
    for column in ("HellaSwag", "tokens/s", "GPU-h", "cost"):
        assert column in text
    assert "0.2911" in text and "1.2M" in text and "16.0" in text and "$43.92" in text
    written = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert {r["model"]: r["hellaswag"] for r in written} == {"big-run": "0.2911", "openai-gpt2": "0.2955"}
    assert to_json(report)["rows"][1]["cost_usd"] == 43.92
