"""``raygpt sweep SPEC``: the stages of an ablation sweep, each skipping what is done already.

train (``raygpt.sweep.train``: Ray Tune trials, each driving one run) -> eval (every trained
run's test loss on one fixed test split, ``<sweep>/eval``) -> ift (every trained run fine-tuned
and answering the held-out instructions, ``<sweep>/ift``) -> judge (the answers scored, pooled
per variant over its pretraining and fine-tuning seeds, ``<sweep>/judge``) -> report
(``raygpt.sweep.report``, ``<sweep>/report``). A sweep stopped anywhere and started again with
the same command skips the finished runs, resumes the unfinished ones, evaluates only what has
no test loss at its final step, fine-tunes only what has no answers, and the judge replays its
cache; a finished sweep does nothing but print its report.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from rich.console import Console
from rich.markup import escape

from raygpt.config import spec_to_dict
from raygpt.errors import RaygptError
from raygpt.stages import JUDGE_SUMMARY_FILE, TEST_LOSS_FILE
from raygpt.storage import Storage, join
from raygpt.sweep.report import REPORT_FOLDER, gather, render, sweep_folders, unchanged, write
from raygpt.sweep.spec import Sweep
from raygpt.sweep.train import is_trained, run_record, train_runs


def run_sweep(sweep: Sweep, console: Console, address: str | None = None, num_cpus: int | None = None,
              local_report: str | None = None) -> dict[str, Any]:
    """Run the sweep's stages; returns the report's document. A run that failed is in the
    report with its error, and the stages after training go on with the runs that trained."""
    from raygpt.sweep.progress import SweepView

    storage = Storage.from_config(sweep.stage_spec.storage)
    storage.check_access(sweep.stage_spec.storage_path, write=True)
    errors: dict[str, str] = {}
    if "train" in sweep.config.stages:
        view = SweepView(console)
        try:
            outcomes = train_runs(sweep, storage, view, address, num_cpus)
        finally:
            view.stop()
        errors = {o.run.name: o.error for o in outcomes if o.error}
    trained = [run for run in sweep.runs if is_trained(run_record(run, storage), run)]
    folders = sweep_folders(sweep)
    stage_errors: dict[str, str] = {}
    later = {"eval": lambda: evaluate_runs(sweep, trained, storage, folders["eval"], console, address, num_cpus),
             "ift": lambda: fine_tune_runs(sweep, trained, folders["ift"], console, address, num_cpus),
             "judge": lambda: judge_runs(sweep, trained, storage, folders, console)}
    for stage, work in later.items():
        if stage in sweep.config.stages and trained:
            try:
                work()
            except RaygptError as e:  # the report still shows what the other stages made
                stage_errors[stage] = str(e)
                console.print(f"[yellow]{stage}: {escape(str(e))}[/]", highlight=False)
    document = gather(sweep, storage, errors, stage_errors)
    if "report" in sweep.config.stages:
        render(document, console)
        if unchanged(document, storage, folders[REPORT_FOLDER]) and local_report is None:
            console.print(f"the report in {folders[REPORT_FOLDER]} is up to date", highlight=False)
        else:
            written = write(document, storage, folders[REPORT_FOLDER], local_report)
            console.print(f"wrote {', '.join(written)}", soft_wrap=True, highlight=False)
    return document


def evaluate_runs(sweep: Sweep, runs, storage: Storage, output: str, console: Console, address: str | None,
                  num_cpus: int | None) -> None:
    """Test loss of every run that has none at its final step, all on one test split in
    windows of one length (the shortest context among all the sweep's runs)."""
    from raygpt.evaluate import evaluate, show_results
    from raygpt.model import config_from_spec

    spec = copy.deepcopy(sweep.stage_spec)
    spec.eval.output = output
    spec.eval.dataset = sweep.config.eval_dataset or sweep.runs_of(sweep.config.baseline)[0].spec.train.dataset
    spec.eval.seq_len = spec.eval.seq_len or min(config_from_spec(r.spec.model).context_length for r in sweep.runs)
    uri = join(output, TEST_LOSS_FILE)
    done = {}
    if storage.exists(uri):
        document = storage.read_json(uri)
        if document.get("seq_len") == spec.eval.seq_len and document.get("dataset") == spec.eval.dataset:
            done = {r["ref"]: r.get("step") for r in document.get("results", [])}
    todo = [r.name for r in runs if done.get(r.name) is None
            or done[r.name] != (run_record(r, storage).get("final") or {}).get("step")]
    if not todo:
        return
    console.print(f"eval: test loss of {len(todo)} run(s) on {spec.eval.dataset}", highlight=False)
    show_results(evaluate(spec, todo, address=address, num_cpus=num_cpus), console)


def fine_tune_runs(sweep: Sweep, runs, output: str, console: Console, address: str | None,
                   num_cpus: int | None) -> None:
    """Fine-tune every run (``raygpt ift``, which skips a model whose answers are there from the
    same base checkpoint and settings); a model that fails is a RaygptError naming it, after
    the others finished."""
    from raygpt.ift import print_summary, run_ift

    spec = copy.deepcopy(sweep.stage_spec)
    spec.ift.output = output
    spec.ift.models = [r.name for r in runs]
    summaries, folder = run_ift(spec, address=address, num_cpus=num_cpus)
    print_summary(summaries, folder, console)


JUDGED_INPUTS_FILE = "sweep-inputs.sha256"
"""Beside the judge's summary: the digest of the judge settings and answers it judged."""


def judge_pools(sweep: Sweep, runs, answered: set[str]) -> dict[str, list[str]]:
    """Variant -> the model ids of its runs that have answers (``raygpt ift`` names a run's
    answers after the run), for the judge to pool each variant over its seeds."""
    from raygpt.weights.refs import model_id

    pools: dict[str, list[str]] = {}
    for run in runs:
        if model_id(run.name) in answered:
            pools.setdefault(run.variant, []).append(model_id(run.name))
    return pools


def judge_runs(sweep: Sweep, runs, storage: Storage, folders: dict[str, str], console: Console) -> None:
    from raygpt.judge.run import run_judge
    from raygpt.stages import answers_dir, replicate_of

    spec = copy.deepcopy(sweep.stage_spec)
    spec.ift.output = folders["ift"]
    spec.judge.output = folders["judge"]
    names = sorted(n for n in storage.list(answers_dir(spec)) if n.endswith(".json")) \
        if storage.exists(answers_dir(spec)) else []
    answered = {replicate_of(name.removesuffix(".json"))[0] for name in names}
    spec.judge.pools = judge_pools(sweep, runs, answered)
    # What the judgement depends on: the judge's settings and every answer. Unchanged since the
    # last summary, the stage is done (its cache would replay it, but rewrite the summary).
    inputs = {"judge": spec_to_dict(spec.judge),
              "answers": {name: storage.sha256(join(answers_dir(spec), name)) for name in names}}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()
    marker = join(folders["judge"], JUDGED_INPUTS_FILE)
    summary = join(folders["judge"], JUDGE_SUMMARY_FILE)
    if storage.exists(summary) and storage.exists(marker) and storage.read_text(marker) == digest:
        return
    run_judge(spec, storage, console)
    storage.write_text(marker, digest)
