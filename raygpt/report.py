"""``raygpt report``: which model is better, by test loss and by instruction-following score.

It joins what the other stages wrote, by model id:
- ``<eval.output or storage_path/eval>/test_loss.json`` (``raygpt eval``): test loss per model;
- ``hellaswag.json`` beside it (``raygpt eval --task hellaswag``): HellaSwag acc_norm per model;
- ``<judge.output or storage_path/judge>/summary.json`` (``raygpt judge``): IFT score, its 95%
  interval, passes, failures, the anchors, the judge's agreement and position bias;
- each run's ``metrics.jsonl`` and ``run.json`` under ``storage_path``: training curves,
  tokens/s, and the cost (GPU-hours, dollars) of the run a model came from.

One ``Report`` (its rows sorted by test loss) is rendered by several backends: a rich terminal
table, Markdown, JSON, CSV, and two PNGs (test loss against IFT score with error bars; the
runs' training curves). A missing piece leaves its columns empty and is named under the table.

A pool of the judge (``judge.pools``: base models that differ only in their pretraining seed)
is one row in place of its base models' rows: its score is the pool's, its test loss the mean
of theirs, its cost their sum.

Below the table: Spearman's rank correlation between test loss and IFT score across models,
in one sentence that says whether they agree (lower loss, higher score: a negative rho). Its
95% interval resamples the judged items (the same resample for every model, test losses
fixed) and, for models fine-tuned several times (``ift.seeds``), each model's fine-tuning
seeds; for a pool, its pretraining seeds (each with its test loss) and within each its
fine-tuning seeds (``stats.resampling.spearman_interval``): it says how much the agreement
depends on which instructions happened to be in the test set and how each run happened to
come out. With few models a rank correlation takes few values (with two, only -1 or +1), so
the number of models is shown beside it.

From the judge's summary the report also shows: the letters of the models that cannot be told
apart, the length-controlled score and the mean answer length, a sentence per pair of models
(whether the difference survives the seed noise, where there are replicates), what the length
control found, the judge's per-item agreement, its position bias with its noise floor, and
the anchors' warnings.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from raygpt.config import RunSpec
from raygpt.errors import RaygptError
from raygpt.stages import (
    EMPTY_ANCHOR,
    HELLASWAG_FILE,
    JUDGE_SUMMARY_FILE,
    METRICS_FILE,
    REFERENCE_ANCHOR,
    RUN_RECORD_FILE,
    STAGE_FOLDERS,
    TEST_LOSS_FILE,
    eval_dir,
    judge_dir,
)
from raygpt.stats.resampling import spearman_interval
from raygpt.stats.values import rounded
from raygpt.storage import Storage, join, write_local_atomically
from raygpt.train.attempts import describe_attempts


@dataclass
class ModelRow:
    """One model: what its test loss and its IFT score are, and how sure."""

    model: str
    ref: str | None = None
    params: int | None = None
    trained_tokens: int | None = None
    trained_on: str | None = None
    """Hardware of the training run, from its run.json (e.g. "8x NVIDIA A100-SXM4-40GB")."""
    test_loss: float | None = None
    ift_score: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    spread: float | None = None
    """Standard deviation of the per-pass mean scores."""
    passes: int | None = None
    failures: int | None = None
    """Judgements that failed after retries (counted, not averaged in)."""
    items_scored: int | None = None
    letters: str | None = None
    """The judge's letters: models that share one cannot be told apart."""
    lc_score: float | None = None
    """The IFT score with the answers' length taken out (AlpacaEval 2's length control)."""
    mean_length: float | None = None
    """Mean answer length in characters."""
    seeds: int | None = None
    """Fine-tuning runs pooled in the score (``ift.seeds``; a pool: all its runs); its interval
    then includes their variance."""
    pretraining_seeds: int | None = None
    """A pool's base models, which differ only in their pretraining seed (``judge.pools``)."""
    item_scores: list[float | None] = field(default_factory=list, repr=False)
    """Per-item scores (mean over passes and seeds), for the bootstrap; not a column."""
    item_scores_by_seed: list[list[float | None]] = field(default_factory=list, repr=False)
    """Per-item scores of each fine-tuning run (seeds, items), for the bootstrap; not a column."""
    item_scores_by_run: list[list[list[float | None]]] = field(default_factory=list, repr=False)
    """A pool's per-item scores by pretraining seed, then fine-tuning seed, for the bootstrap; not a column."""
    test_losses: list[float | None] = field(default_factory=list, repr=False)
    """A pool's test loss per pretraining seed (in ``item_scores_by_run``'s order); not a column."""
    replicate_scores: list[float | None] = field(default_factory=list, repr=False)
    """Each fine-tuning run's mean score, for the plot; not a column."""

    hellaswag: float | None = None
    """HellaSwag acc_norm (completion style, as llm.c and build-nanogpt score it)."""
    hellaswag_items: int | None = None
    tokens_per_s: float | None = None
    """Median training throughput of the run, from its run.json."""
    gpu_hours: float | None = None
    """GPU-hours of the run over all its sessions (workers x wall-clock)."""
    cost_usd: float | None = None
    """Dollars at the run's price per GPU-hour (train.gpu_hour_usd, else a dated list price)."""


HIDDEN_FIELDS = ("item_scores", "item_scores_by_seed", "item_scores_by_run", "test_losses", "replicate_scores")
"""ModelRow fields that feed statistics and plots, not the JSON rows or the CSV."""


@dataclass
class Report:
    rows: list[ModelRow]
    anchors: dict[str, dict] = field(default_factory=dict)
    correlation: dict | None = None
    judge: dict | None = None
    test_set: dict | None = None
    curves: dict[str, list[dict]] = field(default_factory=dict)
    """Per run, its metrics.jsonl records."""
    runs: dict[str, dict] = field(default_factory=dict)
    """Per run, a few facts from its run.json."""
    missing: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)



def build_report(spec: RunSpec, storage: Storage) -> Report:
    report = Report(rows=[])
    rows: dict[str, ModelRow] = {}

    test_loss_uri = join(eval_dir(spec), TEST_LOSS_FILE)
    if storage.exists(test_loss_uri):
        test_loss = storage.read_json(test_loss_uri)
        report.sources["test_loss"] = test_loss_uri
        report.test_set = {k: test_loss.get(k) for k in ("dataset", "manifest_sha256", "test_tokens")}
        for result in _list_of(test_loss, "results", test_loss_uri):
            row = rows.setdefault(result["model"], ModelRow(result["model"]))
            row.ref, row.params, row.test_loss = result.get("ref"), result.get("params"), result.get("test_loss")
            row.trained_tokens = result.get("trained_tokens")
    else:
        report.missing.append(f"test loss: no {test_loss_uri} (run `raygpt eval`)")

    hellaswag_uri = join(eval_dir(spec), HELLASWAG_FILE)
    if storage.exists(hellaswag_uri):
        report.sources["hellaswag"] = hellaswag_uri
        for result in _list_of(storage.read_json(hellaswag_uri), "results", hellaswag_uri):
            row = rows.setdefault(result["model"], ModelRow(result["model"], ref=result.get("ref")))
            row.hellaswag, row.hellaswag_items = result.get("acc_norm"), result.get("items")
            row.params = row.params or result.get("params")

    summary_uri = join(judge_dir(spec), JUDGE_SUMMARY_FILE)
    pools: dict[str, list[ModelRow | None]] = {}
    if storage.exists(summary_uri):
        summary = storage.read_json(summary_uri)
        report.sources["judge"] = summary_uri
        passes = summary.get("judge", {}).get("passes")
        for judged in _list_of(summary, "models", summary_uri):
            if judged.get("pool"):
                pools[judged["model"]] = _pool_members(judged, rows)
                row = rows.setdefault(judged["model"], ModelRow(judged["model"]))
            else:
                row = _row_for(judged, rows)
            row.ift_score = judged.get("mean")
            row.ci_low, row.ci_high = (judged.get("ci95") or [None, None])[:2]
            row.spread, row.failures, row.passes = judged.get("spread"), judged.get("failures"), passes
            row.items_scored, row.item_scores = judged.get("items_scored"), judged.get("item_scores") or []
            _judge_fields(row, judged)
        report.anchors = summary.get("anchors") or {}
        report.judge = {key: summary.get(key) for key in ("judge", "items", "rank_agreement", "position_bias",
                                                          "calls", "usage", "comparisons", "item_agreement",
                                                          "length", "warnings", "notes")}
    else:
        report.missing.append(f"IFT scores: no {summary_uri} (run `raygpt ift`, then `raygpt judge`)")

    _read_runs(spec, storage, report)
    for row in rows.values():
        run = _run_of(row.ref, report.runs)
        if run is not None:
            row.trained_on = row.trained_on or _hardware_label(run.get("hardware") or {})
            row.trained_tokens = row.trained_tokens or (run.get("final") or {}).get("tokens")
            row.tokens_per_s = (run.get("final") or {}).get("tokens_per_s")
            cost = run.get("cost") or {}
            row.gpu_hours = cost.get("gpu_hours") or None
            row.cost_usd = cost.get("usd")
    for name, members in pools.items():
        _fold_pool(rows, rows[name], members)
    report.rows = sorted(rows.values(), key=_sort_key)
    report.correlation = loss_score_correlation(report.rows, spec.report.bootstrap_samples, spec.report.seed)
    return report


def _judge_fields(row: ModelRow, judged: dict) -> None:
    """What summaries since raygpt-judge-summary/2 add: letters, length control, replicates."""
    row.letters, row.lc_score = judged.get("letters"), judged.get("length_controlled")
    row.mean_length = judged.get("mean_length")
    row.seeds = len(judged["seeds"]) if judged.get("seeds") else None
    row.item_scores_by_seed = judged.get("item_scores_by_seed") or ([row.item_scores] if row.item_scores else [])
    row.replicate_scores = [r.get("mean") for r in judged.get("replicates") or []]
    if judged.get("pool"):
        row.seeds = len(judged.get("replicates") or []) or None
        row.pretraining_seeds = len(judged["pool"])
        row.item_scores_by_run = judged.get("item_scores_by_run") or []


def _pool_members(judged: dict, rows: dict[str, ModelRow]) -> list[ModelRow | None]:
    """The rows of a pool's base models (by id, else by the ref of their answers' base model),
    None for one that was not evaluated."""
    refs = judged.get("pool_base_models") or [None] * len(judged["pool"])
    return [rows.get(member) or next((r for r in rows.values() if ref and r.ref == ref), None)
            for member, ref in zip(judged["pool"], refs)]


def _fold_pool(rows: dict[str, ModelRow], pool: ModelRow, members: list[ModelRow | None]) -> None:
    """The pool's row takes its base models' place: the mean of their test losses (and each,
    for the correlation), the sum of their cost, their size where they agree."""
    pool.test_losses = [m.test_loss if m else None for m in members]
    losses = [loss for loss in pool.test_losses if loss is not None]
    pool.test_loss = sum(losses) / len(losses) if losses else None
    found = [m for m in members if m is not None]
    for name in ("gpu_hours", "cost_usd"):
        values = [getattr(m, name) for m in found if getattr(m, name) is not None]
        setattr(pool, name, sum(values) if values else None)
    for name in ("params", "trained_tokens", "trained_on"):
        values = {getattr(m, name) for m in found}
        if len(values) == 1:
            setattr(pool, name, values.pop())
    for member in found:
        if member is not pool:
            rows.pop(member.model, None)


def _list_of(data: Any, key: str, uri: str) -> list[dict]:
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "model" in e for e in entries):
        raise RaygptError(f"{uri}: expected a {key!r} list of objects with a 'model' id")
    return entries


def _row_for(judged: dict, rows: dict[str, ModelRow]) -> ModelRow:
    """The row of the model these answers came from: the same id, else the model whose ref is
    the answers' base model; a new row when neither was evaluated."""
    if judged["model"] in rows:
        return rows[judged["model"]]
    for row in rows.values():
        if judged.get("base_model") and row.ref == judged["base_model"]:
            return row
    return rows.setdefault(judged["model"], ModelRow(judged["model"], ref=judged.get("base_model")))


def _run_of(ref: str | None, runs: dict[str, dict]) -> dict | None:
    """The run a model ref names: the run itself, or one of its checkpoint folders."""
    if not ref:
        return None
    parts = ref.rstrip("/").split("/")
    for name in (parts[-1], parts[-2] if len(parts) > 1 else None):
        if name in runs:
            return runs[name]
    return None


def _hardware_label(hardware: dict) -> str | None:
    devices = [d for d in hardware.get("devices") or [] if d]
    if devices:
        most = max(set(devices), key=devices.count)
        return f"{devices.count(most)}x {most}" if len(set(devices)) == 1 else f"{len(devices)} devices ({most}, ...)"
    if hardware.get("workers"):
        return f"{hardware['workers']}x {'GPU' if hardware.get('use_gpu') else 'CPU'} worker"
    return None


def _sort_key(row: ModelRow) -> tuple:
    # Lowest test loss first; models without one last, best score first among them.
    return (row.test_loss is None, row.test_loss or 0.0, -(row.ift_score or 0.0), row.model)


def loss_score_correlation(rows: list[ModelRow], samples: int, seed: int) -> dict | None:
    """Spearman(test loss, IFT score) across the models that have both, with an interval that
    resamples the judged items and each model's seeds (a pool's at both levels, its test losses
    with its pretraining seeds), and the sentence that says what it means (see the module
    docstring)."""
    both = [r for r in rows if r.test_loss is not None and r.ift_score is not None]
    if len(both) < 2:
        return None
    losses = [r.test_losses if r.test_losses and None not in r.test_losses else r.test_loss for r in both]
    per_item = [judged_item_scores(r.item_scores_by_run or [r.item_scores_by_seed]) for r in both]
    counts = {a.shape[-1] for groups in per_item for a in groups}
    if len(counts) != 1 or counts == {0}:
        # No per-item scores to resample (an older summary): the point estimate alone.
        per_item, losses = [np.array([[r.ift_score]]) for r in both], [r.test_loss for r in both]
        samples_used = 0
    else:
        samples_used = samples
    result = spearman_interval(losses, per_item, max(samples_used, 1), seed)
    ci = result["ci"] if samples_used else [None, None]
    return {"spearman": rounded(result["spearman"]), "ci95": [rounded(v) for v in ci], "models": len(both),
            "seeds": result["seeds"], "pretraining_seeds": result["pretraining_seeds"],
            "resampled": result["resampled"] if samples_used else "nothing",
            "bootstrap_samples": samples_used, "seed": seed, "sentence": describe_agreement(result["spearman"], ci)}


def read_curve(metrics_uri: str, storage: Storage) -> tuple[list[dict], int]:
    """A run's ``metrics.jsonl`` as step records, and how many lines could not be read (a
    report shows what it can of a run still being written)."""
    records, unreadable = [], 0
    for line in storage.read_bytes(metrics_uri).splitlines():  # line by line: one bad line spoils no other
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:  # not JSON, or not UTF-8
            unreadable += 1
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records, unreadable


def judged_item_scores(by_run: list[list[list[float | None]]]) -> list[np.ndarray]:
    """A judge summary entry's per-item scores as ``stats.resampling.spearman_interval`` takes
    them: one (fine-tuning seeds, items) array per pretraining seed, nan where none. ``by_run``
    is a pool's ``item_scores_by_run``, or ``[entry["item_scores_by_seed"]]`` for a base model."""
    return [np.atleast_2d(np.array([[math.nan if v is None else v for v in scores] for scores in runs], dtype=float))
            for runs in by_run]


def describe_agreement(rho: float | None, ci: list[float | None] | None, level: float = 0.95) -> str:
    """One plain sentence on whether test loss and the judged score agree.

    Agreement means lower loss goes with higher score, a negative Spearman(loss, score): "agree"
    when the whole interval is below 0, "disagree" when it is all above, and "cannot tell at
    this sample size" when it holds 0 or is undefined.
    """
    low, high = (None, None) if ci is None else ci
    if rho is None or low is None or high is None or not all(map(math.isfinite, (rho, low, high))):
        return "test loss and IFT score: cannot tell at this sample size (too few models or scores)"
    numbers = f"Spearman {rho:.2f}, {round(level * 100)}% CI {low:.2f} to {high:.2f}"
    if high < 0:
        return f"test loss and IFT score agree (lower loss, higher score): {numbers}"
    if low > 0:
        return f"test loss and IFT score disagree (lower loss, lower score): {numbers}"
    return f"test loss and IFT score: cannot tell at this sample size ({numbers})"


def _read_runs(spec: RunSpec, storage: Storage, report: Report) -> None:
    """Training curves (metrics.jsonl) and run records (run.json) of ``report.runs``, else of
    every folder under ``storage_path`` that has a metrics.jsonl."""
    names = spec.report.runs or [n for n in storage.list(spec.storage_path) if n not in STAGE_FOLDERS]
    for name in names:
        metrics_uri = join(spec.storage_path, name, METRICS_FILE)
        if not storage.exists(metrics_uri):
            if spec.report.runs:
                report.missing.append(f"training curve of {name}: no {metrics_uri}")
            continue
        records, unreadable = read_curve(metrics_uri, storage)
        if unreadable:
            report.missing.append(f"training curve of {name}: {unreadable} unreadable line(s) in {metrics_uri}")
        report.curves[name] = records
        run_uri = join(spec.storage_path, name, RUN_RECORD_FILE)
        if storage.exists(run_uri):
            record = storage.read_json(run_uri)
            if isinstance(record, dict):
                report.runs[name] = {k: record[k] for k in ("status", "hardware", "final", "git_commit", "attempts",
                                                            "cost")
                                     if k in record}
    if not report.curves:
        report.missing.append(f"training curves: no run with metrics.jsonl under {spec.storage_path}")


COLUMNS = ("model", "test loss", "HellaSwag", "IFT score", "95% CI", "group", "length-controlled", "answer length",
           "seeds", "pretraining seeds", "passes", "failures", "params", "trained tokens", "trained on", "tokens/s",
           "GPU-h", "cost")


OPTIONAL_COLUMNS = {"HellaSwag", "params", "trained tokens", "trained on", "group", "length-controlled",
                    "answer length", "seeds", "pretraining seeds", "tokens/s", "GPU-h", "cost"}
"""Shown only when some row has a value: the table stays narrow when they are unknown."""


def _table(report: Report) -> tuple[list[str], list[list[str]]]:
    """The header and cells of the table, shared by the terminal and Markdown backends."""
    cells = [_cells(row) for row in report.rows]
    keep = [k for k, name in enumerate(COLUMNS)
            if name not in OPTIONAL_COLUMNS or any(row[k] != "-" for row in cells)]
    return [COLUMNS[k] for k in keep], [[row[k] for k in keep] for row in cells]


def _cells(row: ModelRow) -> list[str]:
    ci = f"{row.ci_low:.2f} - {row.ci_high:.2f}" if row.ci_low is not None and row.ci_high is not None else "-"
    return [row.model, _fmt(row.test_loss, 3), _fmt(row.hellaswag, 4), _fmt(row.ift_score, 2), ci, row.letters or "-",
            _fmt(row.lc_score, 2), _fmt(row.mean_length, 0), _fmt(row.seeds), _fmt(row.pretraining_seeds),
            _fmt(row.passes), _fmt(row.failures),
            _count(row.params), _count(row.trained_tokens), row.trained_on or "-",
            _count(round(row.tokens_per_s)) if row.tokens_per_s else "-", _fmt(row.gpu_hours, 1),
            _dollars(row.cost_usd)]


def _dollars(usd: float | None) -> str:
    if usd is None:
        return "-"
    return f"${usd:,.0f}" if usd >= 100 else f"${usd:,.2f}"


def _count(n: int | None) -> str:
    if not n:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 10 * size else f"{n / size:.0f}{unit}"
    return str(n)


def _fmt(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits is not None else str(value)


def _notes(report: Report) -> list[str]:
    """The lines under the table: anchors, correlation, judge consistency, what is missing."""
    notes = []
    for name, label in ((REFERENCE_ANCHOR, "reference answer"), (EMPTY_ANCHOR, "empty answer")):
        anchor = report.anchors.get(name)
        if anchor:
            low, high = anchor.get("ci95") or [None, None]
            notes.append(f"anchor {label}: {_fmt(anchor.get('mean'), 2)} (95% CI {_fmt(low, 2)} - {_fmt(high, 2)})")
    c = report.correlation
    if c:
        small = "; two models: always -1 or +1" if c["models"] == 2 else ""
        notes.append(f"{c['sentence']} ({c['models']} models, {c['resampled']} resampled{small})")
    if report.judge:
        notes += _judge_notes(report.judge)
    for name, run in sorted(report.runs.items()):
        if len(run.get("attempts") or []) > 1:  # restarts: where its steps were trained and what it cost
            notes.append(f"run {name}: {describe_attempts(run['attempts'])}")
    notes += [f"missing: {m}" for m in report.missing]
    return notes


def _judge_notes(judge: dict) -> list[str]:
    """The judge's verdicts in sentences: groups, pairs, agreement, position bias, warnings."""
    notes = []
    j = judge.get("judge") or {}
    notes.append(f"judge: {j.get('model')} ({j.get('mode')}, template {j.get('template')}, "
                 f"{j.get('passes')} passes, {judge.get('items')} items)")
    comparisons = judge.get("comparisons")
    if comparisons:
        notes.append(f"group: models sharing a letter cannot be told apart ({comparisons.get('letters_from')})")
        robust = {(r["a"], r["b"]): r for r in comparisons.get("seed_robust") or []}
        for pair in comparisons.get("pairs") or []:
            # With replicates, the sentence that includes the fine-tuning noise says more.
            chosen = robust.get((pair["a"], pair["b"]))
            notes.append(chosen["sentence"] if chosen and chosen.get("survives") is not None else pair["sentence"])
    notes += (judge.get("length") or {}).get("sentences") or []
    agreement, ranks = judge.get("item_agreement"), judge.get("rank_agreement")
    if agreement and agreement.get("within_item") is not None:
        notes.append(f"agreement between passes on the same answers: Spearman {_fmt(agreement['within_item'], 2)} "
                     f"within items, ICC {_fmt(agreement.get('icc'), 2)}"
                     + (f" (the per-pass model means agree at {_fmt(ranks.get('spearman'), 2)}, which averages the "
                        f"judge's noise away)" if ranks else ""))
    elif ranks:
        notes.append(f"agreement between passes: Spearman {_fmt(ranks.get('spearman'), 2)}, "
                     f"Kendall {_fmt(ranks.get('kendall'), 2)}")
    bias = judge.get("position_bias")
    if bias and bias.get("range") is not None:
        floor = bias.get("noise_floor")
        low, high = bias.get("range_ci") or [None, None]
        detail = (f" (95% CI {_fmt(low, 1)} - {_fmt(high, 1)}; {_fmt(floor, 1)} with no bias at all, "
                  f"p {_fmt(bias.get('p_value'), 3)}; from the models' answers only)" if floor is not None else "")
        notes.append(f"position bias: {bias['range']:.1f} points between the most and least favoured position{detail}")
    notes += [f"warning: {w}" for w in judge.get("warnings") or []]
    return notes


def render_terminal(report: Report, console: Console) -> None:
    table = Table(title="raygpt: test loss and instruction-following score (sorted by test loss)")
    header, cells = _table(report)
    for column in header:
        # Names and numbers never wrap: a narrow terminal squeezes the hardware column instead.
        table.add_column(column, justify="left" if column in ("model", "trained on") else "right",
                         no_wrap=column != "trained on")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for note in _notes(report):
        console.print(note, style="yellow" if note.startswith(("missing", "warning")) else None)


def to_markdown(report: Report) -> str:
    header, cells = _table(report)
    lines = ["# raygpt report", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines.append("")
    lines += [f"- {note}" for note in _notes(report)]
    if any(r.test_loss is not None and r.ift_score is not None for r in report.rows):
        lines += ["", "![IFT score vs. test loss](loss_vs_score.png)"]
    if report.curves:
        lines += ["", "![training curves](training_curves.png)"]
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict:
    return {
        "format": "raygpt-report/1",
        "rows": [{k: v for k, v in asdict(row).items() if k not in HIDDEN_FIELDS} for row in report.rows],
        "anchors": {name: {k: v for k, v in a.items() if k != "item_scores"} for name, a in report.anchors.items()},
        "correlation": report.correlation,
        "judge": report.judge,
        "test_set": report.test_set,
        "runs": {name: {"points": len(report.curves.get(name, [])), **report.runs.get(name, {})}
                 for name in report.curves},
        "missing": report.missing,
        "sources": report.sources,
    }


def to_csv(report: Report) -> str:
    out = io.StringIO()
    names = [k for k in ModelRow.__dataclass_fields__ if k not in HIDDEN_FIELDS]
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({k: "" if v is None else v for k, v in asdict(row).items() if k not in HIDDEN_FIELDS})
    return out.getvalue()


def save_figure(fig, path: Path) -> bool:
    """Write a finished matplotlib figure as the reports' PNGs are written, and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_loss_vs_score(report: Report, path: Path) -> bool:
    """Test loss (x) against IFT score (y) with the score's 95% interval as error bars (over
    items and, for models fine-tuned several times, their seeds, whose own means are the small
    dots), and the anchors as horizontal lines. False when no model has both."""
    rows = [r for r in report.rows if r.test_loss is not None and r.ift_score is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    x = [r.test_loss for r in rows]
    y = [r.ift_score for r in rows]
    yerr = [[r.ift_score - r.ci_low if r.ci_low is not None else 0 for r in rows],
            [r.ci_high - r.ift_score if r.ci_high is not None else 0 for r in rows]]
    replicated = any(r.seeds and r.seeds > 1 for r in rows)
    ax.errorbar(x, y, yerr=yerr, fmt="o", capsize=4,
                label="IFT score, 95% CI over items and seeds" if replicated else "IFT score, 95% CI over items")
    runs = [(r.test_loss, score) for r in rows for score in r.replicate_scores if score is not None]
    if runs:
        ax.plot(*zip(*runs), ".", color="grey", alpha=0.7, label="one fine-tuning run")
    for row in rows:
        ax.annotate(row.model, (row.test_loss, row.ift_score), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for name, style in ((REFERENCE_ANCHOR, "--"), (EMPTY_ANCHOR, ":")):
        anchor = report.anchors.get(name)
        if anchor and anchor.get("mean") is not None:
            ax.axhline(anchor["mean"], linestyle=style, color="grey", linewidth=1, label=f"{name} anchor")
    ax.legend(loc="best", fontsize=8)
    title = "IFT score vs. test loss"
    c = report.correlation
    if c and c["spearman"] is not None:
        low, high = c["ci95"]
        interval = f", 95% CI {low:.2f} to {high:.2f}" if low is not None and high is not None else ""
        title += f" (Spearman {c['spearman']:.2f}{interval})"
    ax.set(xlabel="test loss (nats/token)", ylabel="IFT score (0-100, 95% CI)", title=title, ylim=(-2, 102))
    ax.margins(x=0.2)  # room for the model names beside the points
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_training_curves(report: Report, path: Path) -> bool:
    """Training loss (lines) and validation loss (dots) of every run against tokens seen."""
    if not report.curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    by_tokens = all("tokens" in r for records in report.curves.values() for r in records)
    key = "tokens" if by_tokens else "step"
    for name, records in report.curves.items():
        train = [(r[key], r["loss"]) for r in records if r.get("loss") is not None]
        val = [(r[key], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        color = None
        if train:
            (line,) = ax.plot(*zip(*train), linewidth=1.2, label=f"{name} train")
            color = line.get_color()
        if val:
            ax.plot(*zip(*val), "o--", color=color, markersize=3, linewidth=0.8, label=f"{name} val")
    ax.set(xlabel="tokens seen" if by_tokens else "step", ylabel="loss (nats/token)", title="training curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def check_report_output(output: str | Path) -> None:
    """A RaygptError, before any work, unless ``output`` is a folder or can be made one: a file
    (``/dev/null``, an earlier ``report.md``) where the folder or one of its parents should be."""
    out = Path(output)
    try:
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    except OSError as e:  # a name longer than the filesystem takes, say
        raise RaygptError(f"report.output: {str(out)[:60]}...: not a usable folder ({e.strerror})") from None
    if blocking is not None:
        where = "" if blocking == out else f" ({blocking} is one)"
        raise RaygptError(f"report.output: {out} must be a folder, but a file is in the way{where}; "
                          "give a folder with --output DIR or report.output")


def write_report(report: Report, output: str | Path) -> list[Path]:
    """Every file backend into ``output`` (a local directory); returns the paths written."""
    out = Path(output)
    check_report_output(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaygptError(f"report.output: cannot make the folder {out} ({e.strerror or e})") from None
    written = []
    for name, text in (("report.md", to_markdown(report)), ("report.json", json.dumps(to_json(report), indent=2) + "\n"),
                       ("report.csv", to_csv(report))):
        write_local_atomically(out / name, lambda tmp, text=text: tmp.write_text(text))
        written.append(out / name)
    for name, plot in (("loss_vs_score.png", plot_loss_vs_score), ("training_curves.png", plot_training_curves)):
        if write_local_atomically(out / name, lambda tmp, plot=plot: plot(report, tmp)):
            written.append(out / name)
        else:
            (out / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    return written
