"""``raygpt report`` of a sweep: which change made a better model, with noise bands.

``gather`` reads what the stages left (each run's ``run.json`` and ``metrics.jsonl``, the
sweep's ``eval/test_loss.json`` and ``judge/summary.json``) and compares the variants
(``raygpt.sweep.compare``, ``raygpt.sweep.pairing``); ``sentences`` words it; ``write``
puts ``sweep.json``, ``sweep.md``, ``sweep.csv`` (a row per variant), ``runs.csv`` and two
plots (validation curves with a band over seeds, the baseline highlighted; each variant's
paired difference with its interval) under ``<sweep>/report``; ``render`` prints the tables.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from raygpt.report import read_curve, save_figure
from raygpt.stages import JUDGE_SUMMARY_FILE, METRICS_FILE, RUN_RECORD_FILE, TEST_LOSS_FILE
from raygpt.storage import Storage, join
from raygpt.sweep.compare import compare_variants
from raygpt.sweep.pairing import data_order, initialisation
from raygpt.sweep.spec import Sweep

FORMAT = "raygpt-sweep/1"
REPORT_FOLDER = "report"


def sweep_folders(sweep: Sweep) -> dict[str, str]:
    """Where the stages after training write, under the sweep's folder."""
    return {stage: join(sweep.folder, stage) for stage in ("eval", "ift", "judge", REPORT_FOLDER)}


def gather(sweep: Sweep, storage: Storage, run_errors: dict[str, str] | None = None,
           stage_errors: dict[str, str] | None = None) -> dict[str, Any]:
    """The sweep's comparison as one JSON-ready document. ``run_errors``: run name -> why it
    failed in this session (a run that failed before its record was written has only that);
    ``stage_errors``: stage -> why it failed in this session."""
    folders = sweep_folders(sweep)
    tests = _test_losses(join(folders["eval"], TEST_LOSS_FILE), storage)
    runs, curves = [], {}
    for run in sweep.runs:
        record = storage.read_json_or_none(join(sweep.stage_spec.storage_path, run.name, RUN_RECORD_FILE)) or {}
        metrics_uri = join(sweep.stage_spec.storage_path, run.name, METRICS_FILE)
        records = read_curve(metrics_uri, storage)[0] if storage.exists(metrics_uri) else []
        final, cost = record.get("final") or {}, record.get("cost") or {}
        test = tests["results"].get(run.name) or {}
        stale = test and final.get("step") is not None and test.get("step") != final.get("step")
        runs.append({
            "run": run.name, "variant": run.variant, "seed": run.seed,
            "status": record.get("status", "not started"),
            "error": (run_errors or {}).get(run.name) or record.get("error"),
            "started": record.get("started"), "finished": record.get("finished"), "step": final.get("step"),
            "test_loss": None if stale else test.get("test_loss"), "val_loss": final.get("val_loss"),
            "gpu_hours": cost.get("gpu_hours"), "worker_hours": cost.get("worker_hours"), "usd": cost.get("usd"),
        })
        curves[run.name] = {
            "val": {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None},
            "losses": {int(s): v for r in records for s, v in (r.get("step_losses") or {}).items()},
            "batches": {int(s): d for r in records for s, d in (r.get("step_batches") or {}).items()},
        }
    comparison = compare_variants(runs, sweep.variants, sweep.config.baseline)
    for row in comparison["variants"]:
        row["settings"] = sweep.settings[row["variant"]]
        if not row["baseline"]:
            row["pairing"] = _pairing(sweep, row["variant"], curves)
    return {
        "format": FORMAT, "sweep": sweep.name, "folder": sweep.folder, "spec": sweep.path, "base": sweep.base_path,
        "seeds": sweep.config.seeds, "baseline": sweep.config.baseline, "stages": sweep.config.stages,
        "test_set": tests["about"], **comparison, "runs": runs,
        "val_curves": {name: c["val"] for name, c in curves.items()},
        "judge": _judge(join(folders["judge"], JUDGE_SUMMARY_FILE), storage, sweep, runs),
        "stage_errors": stage_errors or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _pairing(sweep: Sweep, variant: str, curves: dict[str, dict]) -> dict[str, Any]:
    """Per seed: whether the variant's run read the baseline's batches at every step, and
    whether its training losses are bitwise the baseline's; once: the shared initialisation."""
    seeds = []
    baseline_runs = {r.seed: r for r in sweep.runs_of(sweep.config.baseline)}
    for run in sweep.runs_of(variant):
        base = baseline_runs.get(run.seed)
        if base is None:
            continue
        mine, theirs = curves[run.name], curves[base.name]
        common = sorted(set(mine["losses"]) & set(theirs["losses"]))
        seeds.append({"seed": run.seed, "data_order": data_order(mine["batches"], theirs["batches"]),
                      "same_losses": (all(mine["losses"][s] == theirs["losses"][s] for s in common)
                                      if common else None), "steps_compared": len(common)})
    first = sweep.runs_of(variant)[0]
    base = baseline_runs.get(first.seed) or sweep.runs_of(sweep.config.baseline)[0]
    return {"seeds": seeds, "initialisation": initialisation(first.spec, base.spec)}


def _test_losses(uri: str, storage: Storage) -> dict[str, Any]:
    document = storage.read_json_or_none(uri) or {}
    about = {k: document.get(k) for k in ("dataset", "manifest_sha256", "seq_len", "test_tokens")} if document else None
    return {"about": about, "results": {r["ref"]: r for r in document.get("results", []) if isinstance(r, dict)}}


def _judge(uri: str, storage: Storage, sweep: Sweep, runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The judge's score of each variant (its runs pooled: pretraining seeds, and fine-tuning
    seeds within them), letters, the pair sentences that involve the baseline, and whether the
    variants' loss ranking and judge ranking agree (Spearman with an interval that resamples
    items and both seed levels, the report's for models)."""
    from raygpt.report import describe_agreement, judged_item_scores
    from raygpt.stats.resampling import spearman_interval
    from raygpt.weights.refs import model_id

    summary = storage.read_json_or_none(uri)
    if not isinstance(summary, dict):
        return None
    models = {m["model"]: m for m in summary.get("models", []) if isinstance(m, dict) and "model" in m}
    variants = [{"variant": v, "mean": models[v].get("mean"), "ci95": models[v].get("ci95"),
                 "ci95_items": models[v].get("ci95_items"), "letters": models[v].get("letters"),
                 "runs": len(models[v].get("pool") or []) or 1, "ci95_includes_seeds": models[v].get("ci95_includes_seeds"),
                 "pretraining_sd": ((models[v].get("variance") or {}).get("components") or {}).get("pretraining",
                                                                                                   {}).get("sd")}
                for v in sweep.variants if v in models]
    comparisons = summary.get("comparisons") or {}
    rows = comparisons.get("seed_robust") or comparisons.get("pairs") or []
    pairs = [r.get("sentence") for r in rows if isinstance(r, dict) and sweep.config.baseline in (r.get("a"), r.get("b"))]
    test_loss = {model_id(r["run"]): r["test_loss"] for r in runs}
    losses, scores = [], []
    for entry in (models[v["variant"]] for v in variants):
        members = entry.get("pool") or [entry["model"]]
        if entry.get("item_scores_by_run") and all(test_loss.get(m) is not None for m in members):
            losses.append([test_loss[m] for m in members])
            scores.append(judged_item_scores(entry["item_scores_by_run"]))
    agreement = None
    if len(losses) >= 2:
        result = spearman_interval(losses, scores, sweep.stage_spec.report.bootstrap_samples, sweep.stage_spec.report.seed)
        agreement = {"spearman": result["spearman"], "ci95": result["ci"], "variants": len(losses),
                     "resampled": result["resampled"],
                     "sentence": "variants: " + describe_agreement(result["spearman"], result["ci"])}
    return {"summary": uri, "judge": (summary.get("judge") or {}).get("model"), "variants": variants,
            "letters_from": comparisons.get("letters_from"), "pairs": [p for p in pairs if p], "agreement": agreement}


# ---------------------------------------------------------------------------------------------
# Words


def _nats(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:+.{digits}f}"


def variant_sentence(row: dict[str, Any], noise_sd: float | None) -> str:
    """One sentence per variant against the baseline."""
    d = row["vs_baseline"]
    name = row["variant"]
    noise = f"sd {noise_sd:.3f}" if noise_sd is not None else "seed sd unknown: one baseline seed"
    if d["identical"] and d["n"] >= 2:
        return (f"{name}: +0.000 nats at each of {d['n']} seeds, within the run-to-run noise ({noise}): exactly "
                "the baseline's test loss, the change did not act")
    if d["verdict"] == "too few seeds":
        if d["n"] == 0:
            return f"{name}: no test loss of a seed the baseline has too: nothing to compare yet"
        return (f"{name}: {_nats(d['difference'])} nats on {d['n']} paired seed: too few seeds for an interval "
                "(run 2 or more)")
    low, high = d["ci"]
    head = f"{name}: {_nats(d['difference'])} nats (95% CI {_nats(low)} to {_nats(high)})"
    holm = f"Holm p {d['p_holm']:.2g}" if d.get("p_holm") is not None else "no p-value"
    if d["verdict"] in ("better", "worse"):
        return f"{head}, {d['verdict']} than the seed noise ({noise}; {holm})"
    return f"{head}, within the run-to-run noise ({noise}; {holm})"


def pairing_sentence(row: dict[str, Any]) -> str:
    pairing = row["pairing"]
    seeds = pairing["seeds"]
    same_order = [s["seed"] for s in seeds if s["data_order"]["same"]]
    other = [f"{s['seed']} (from step {s['data_order']['first_difference']})" for s in seeds
             if s["data_order"]["same"] is False]
    if not seeds:
        order = "no seed in common with the baseline"
    elif len(same_order) == len(seeds):
        order = f"the baseline's sequences at every step, at each of its {len(seeds)} seed(s)"
    elif other:
        order = f"other sequences than the baseline at seed(s) {', '.join(other)}"
    else:
        order = "data order not recorded"
    init = pairing["initialisation"]
    start = (f"the baseline's initial values in {init['shared']} of its {init['parameters']} parameter tensors"
             if init["same_seed"] else "other initial values (another seed)")
    extra = []
    if init["own"]:
        extra.append(f"new: {', '.join(_short(init['own']))}")
    if init["baseline_only"]:
        extra.append(f"the baseline's alone: {', '.join(_short(init['baseline_only']))}")
    if init["drawn_otherwise"]:
        extra.append(f"drawn otherwise: {', '.join(_short(init['drawn_otherwise']))}")
    same_losses = [s["seed"] for s in seeds if s["same_losses"]]
    losses = (f"; its training losses are bitwise the baseline's at every step of seed(s) "
              f"{', '.join(map(str, same_losses))}" if same_losses else "")
    return f"{row['variant']}: {order}; starts from {start}" + (f" ({'; '.join(extra)})" if extra else "") + losses


def _short(names: list[str], limit: int = 3) -> list[str]:
    """Parameter names, the per-block ones folded (``transformer.h.*.attn.c_attn.bias``)."""
    import re

    folded = list(dict.fromkeys(re.sub(r"\.h\.\d+\.", ".h.*.", n) for n in names))
    return folded[:limit] + ([f"{len(folded) - limit} more"] if len(folded) > limit else [])


def noise_sentence(document: dict[str, Any]) -> str:
    test, val = document["noise"]["test_loss"], document["noise"]["val_loss"]
    if test["sd"] is None and val["sd"] is None:
        return f"run-to-run noise: unknown with {test['n']} baseline seed(s) (run 2 or more)"
    parts = []
    for label, spread in (("test loss", test), ("final validation loss", val)):
        if spread["sd"] is not None:
            low, high = spread["ci_sd"]
            parts.append(f"{label} sd {spread['sd']:.4f} (95% CI {low:.4f} to {high:.4f})")
    return f"run-to-run noise of the baseline over {test['n']} seeds: " + "; ".join(parts)


def cost_sentence(document: dict[str, Any]) -> str:
    cost = document["cost"]
    hours = cost["gpu_hours"]
    worker_hours = sum(r["worker_hours"] or 0 for r in document["runs"])
    money = f", ${cost['usd']:,.2f}" if cost["usd"] is not None else ", no price (set train.gpu_hour_usd)"
    if hours:
        return f"cost: {hours:,.2f} GPU-hours{money} in all"
    return f"cost: {worker_hours:,.3f} worker-hours on CPUs{money} in all"


def sentences(document: dict[str, Any]) -> list[str]:
    noise_sd = document["noise"]["test_loss"]["sd"]
    lines = [variant_sentence(row, noise_sd) for row in document["variants"] if not row["baseline"]]
    lines.append(noise_sentence(document))
    lines += [pairing_sentence(row) for row in document["variants"] if not row["baseline"]]
    judge = document.get("judge")
    if judge:
        lines += judge["pairs"]
        if judge.get("agreement"):
            lines.append(judge["agreement"].get("sentence", ""))
    failed = [r for r in document["runs"] if r["status"] == "failed" or r["error"]]
    lines += [f"{r['run']} failed: {r['error']}" for r in failed]
    lines += [f"the {stage} stage failed: {error}" for stage, error in document.get("stage_errors", {}).items()]
    missing = [r["run"] for r in document["runs"] if r["test_loss"] is None and r["status"] == "finished"]
    if missing:
        lines.append(f"no test loss yet for {', '.join(missing)} (the eval stage)")
    lines.append(cost_sentence(document))
    return [line for line in lines if line]


# ---------------------------------------------------------------------------------------------
# Tables, files and plots


def variant_columns(document: dict[str, Any]) -> tuple[str, ...]:
    hours = "GPU-h" if any(r["gpu_hours"] for r in document["variants"]) else "worker-h"
    return ("variant", "runs", "test loss", "sd", "vs baseline", "95% CI", "Holm p", "verdict", "val loss",
            "IFT score", hours, "cost")


def variant_cells(document: dict[str, Any]) -> list[list[str]]:
    judged = {v["variant"]: v for v in (document.get("judge") or {}).get("variants", [])}
    worker_hours: dict[str, float] = {}
    for run in document["runs"]:
        worker_hours[run["variant"]] = worker_hours.get(run["variant"], 0.0) + (run["worker_hours"] or 0.0)
    by_gpu = "GPU-h" in variant_columns(document)
    rows = []
    for row in document["variants"]:
        d = row.get("vs_baseline")
        test, val = row["test_loss"], row["val_loss"]
        score = judged.get(row["variant"])
        hours = row["gpu_hours"] if by_gpu else worker_hours.get(row["variant"])
        rows.append([
            row["variant"] + ("" if row["variant"] == "baseline" or not row["baseline"] else " (baseline)"),
            str(row["runs"]), _fixed(test["mean"], 4),
            _fixed(test["sd"], 4), _nats(d["difference"], 4) if d else "", _ci(d["ci"]) if d else "",
            f"{d['p_holm']:.2g}" if d and d.get("p_holm") is not None else "", d["verdict"] if d else "",
            _fixed(val["mean"], 4),
            f"{score['mean']:.1f} {_ci(score['ci95'], 1)} {score.get('letters') or ''}".strip() if score else "",
            _fixed(hours, 2 if by_gpu else 3), f"${row['usd']:,.2f}" if row["usd"] is not None else "",
        ])
    return rows


RUN_FIELDS = ("run", "variant", "seed", "status", "step", "test_loss", "val_loss", "gpu_hours", "worker_hours", "usd",
              "started", "finished", "error")


def _fixed(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _ci(ci: list | None, digits: int = 4) -> str:
    if not ci or ci[0] is None:
        return ""
    return f"[{ci[0]:+.{digits}f}, {ci[1]:+.{digits}f}]" if digits > 1 else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def render(document: dict[str, Any], console: Console) -> None:
    table = Table(title=f"sweep {escape(document['sweep'])}: test loss by variant, each against "
                        f"{escape(document['baseline'])} seed by seed")
    cells, columns = variant_cells(document), variant_columns(document)
    shown = [i for i, c in enumerate(columns) if any(row[i] for row in cells) or c in ("variant", "test loss")]
    for i in shown:
        table.add_column(columns[i], justify="left" if i == 0 else "right", no_wrap=True)
    for row in cells:
        table.add_row(*(escape(row[i]) for i in shown))
    console.print(table)
    for line in sentences(document):
        console.print(escape(line), highlight=False, style="yellow" if " failed: " in line else None)


def to_markdown(document: dict[str, Any]) -> str:
    cells, columns = variant_cells(document), variant_columns(document)
    lines = [f"# Sweep {document['sweep']}", "",
             f"Base spec `{document['base']}`, seeds {document['seeds']}, baseline `{document['baseline']}`.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    lines += ["", *[f"- {line}" for line in sentences(document)], "",
              "![validation loss by variant](val_loss.png)", "", "![paired differences](differences.png)", "",
              "| " + " | ".join(RUN_FIELDS) + " |", "|" + "---|" * len(RUN_FIELDS)]
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in RUN_FIELDS) + " |" for r in document["runs"]]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def to_csv(document: dict[str, Any]) -> str:
    out = io.StringIO()
    fields = ["variant", "baseline", "runs", "test_loss_mean", "test_loss_sd", "val_loss_mean", "val_loss_sd",
              "difference", "ci_low", "ci_high", "p_value", "p_holm", "verdict", "paired_seeds", "gpu_hours", "usd"]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in document["variants"]:
        d = row.get("vs_baseline") or {}
        writer.writerow({
            "variant": row["variant"], "baseline": row["baseline"], "runs": row["runs"],
            "test_loss_mean": row["test_loss"]["mean"], "test_loss_sd": row["test_loss"]["sd"],
            "val_loss_mean": row["val_loss"]["mean"], "val_loss_sd": row["val_loss"]["sd"],
            "difference": d.get("difference"), "ci_low": (d.get("ci") or [None])[0],
            "ci_high": (d.get("ci") or [None, None])[1], "p_value": d.get("p_value"), "p_holm": d.get("p_holm"),
            "verdict": d.get("verdict"), "paired_seeds": d.get("n"), "gpu_hours": row["gpu_hours"], "usd": row["usd"]})
    return out.getvalue()


def runs_csv(document: dict[str, Any]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=RUN_FIELDS, lineterminator="\n")
    writer.writeheader()
    for run in document["runs"]:
        writer.writerow({k: "" if run.get(k) is None else run[k] for k in RUN_FIELDS})
    return out.getvalue()


def plot_val_curves(document: dict[str, Any], path: Path) -> bool:
    """Validation loss against step: per variant the mean over seeds, a band from the lowest to
    the highest seed, the baseline in black and thicker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    curves = document["val_curves"]
    by_variant: dict[str, list[dict]] = {}
    for run in document["runs"]:
        points = {int(step): loss for step, loss in (curves.get(run["run"]) or {}).items()}
        if points:
            by_variant.setdefault(run["variant"], []).append(points)
    if not by_variant:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for row in document["variants"]:
        runs = by_variant.get(row["variant"])
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r) for r in runs)))
        if not steps:
            continue
        values = np.array([[r[s] for s in steps] for r in runs])
        style = {"color": "black", "linewidth": 2.4, "zorder": 3} if row["baseline"] else {"linewidth": 1.2}
        (line,) = ax.plot(steps, values.mean(axis=0), label=f"{row['variant']} ({len(runs)} seeds)", **style)
        if len(runs) > 1:
            ax.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set(xlabel="step", ylabel="validation loss (nats/token)",
           title=f"sweep {document['sweep']}: validation loss, mean and range over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_differences(document: dict[str, Any], path: Path) -> bool:
    """Each variant's paired difference in test loss from the baseline with its 95% interval,
    the baseline's seed sd as a grey band around 0."""
    rows = [r for r in document["variants"] if r.get("vs_baseline") and r["vs_baseline"]["difference"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.6))
    noise = document["noise"]["test_loss"]["sd"]
    if noise:
        ax.axvspan(-noise, noise, color="grey", alpha=0.2, label=f"baseline seed sd ({noise:.3f})")
    ax.axvline(0, color="black", linewidth=1)
    for y, row in enumerate(rows):
        d = row["vs_baseline"]
        low, high = d["ci"]
        err = [[d["difference"] - low], [high - d["difference"]]] if low is not None else None
        color = {"better": "tab:green", "worse": "tab:red"}.get(d["verdict"], "tab:blue")
        ax.errorbar([d["difference"]], [y], xerr=err, fmt="o", color=color, capsize=4)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows])
    ax.invert_yaxis()
    ax.set(xlabel=f"test loss - {document['baseline']} (nats/token, 95% CI over paired seeds)",
           title="paired difference from the baseline")
    if noise:
        ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3, axis="x")
    return save_figure(fig, path)


def unchanged(document: dict[str, Any], storage: Storage, folder: str) -> bool:
    """Whether ``folder`` holds this report already (all but the time it was made): a finished
    sweep started again rewrites nothing."""
    stored = storage.read_json_or_none(join(folder, "sweep.json"))
    same = json.loads(json.dumps(document))  # as JSON has it (int keys become strings)
    return isinstance(stored, dict) and {**stored, "created": None} == {**same, "created": None}


def write(document: dict[str, Any], storage: Storage, folder: str, local: str | Path | None = None) -> list[str]:
    """Every file of the report into ``folder`` (local or ``s3://``) and, when given, the
    ``local`` directory too; returns the URIs written."""
    files: dict[str, bytes] = {
        "sweep.json": (json.dumps(document, indent=2) + "\n").encode(),
        "sweep.md": to_markdown(document).encode(),
        "sweep.csv": to_csv(document).encode(),
        "runs.csv": runs_csv(document).encode(),
    }
    with tempfile.TemporaryDirectory(prefix="raygpt-sweep-report-") as tmp:
        for name, plot in (("val_loss.png", plot_val_curves), ("differences.png", plot_differences)):
            if plot(document, Path(tmp) / name):
                files[name] = (Path(tmp) / name).read_bytes()
    written = []
    for name, data in files.items():
        storage.write_bytes(join(folder, name), data)
        written.append(join(folder, name))
        if local is not None:
            Path(local).mkdir(parents=True, exist_ok=True)
            (Path(local) / name).write_bytes(data)
    return written
