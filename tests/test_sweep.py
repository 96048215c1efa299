"""Ablation sweeps: the spec and its refusals, the paired statistics, and real sweeps on a local
Ray with SeaweedFS: a harmful and a null variant against the baseline over 3 seeds, 2 runs at
a time; a sweep whose driver is killed while runs are in flight, started again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as scipy_stats

from raygpt.cli import main
from raygpt.errors import RaygptError
from raygpt.sweep.compare import compare_variants, paired_difference, seed_spread
from raygpt.sweep.spec import load_sweep

BASE = """\
name: base
storage_path: {storage}
model: {{preset: tiny}}
train:
  dataset: {dataset}
  seq_len: 32
  global_batch_tokens: 512
  micro_batch_size: 16
  num_workers: 1
  max_steps: 20
  warmup_steps: 2
  lr: 1.0e-2
  log_interval: 5
  val_interval: 10
  val_tokens: 1024
  max_failures: 0
checkpoint: {{interval: 10, keep: 2}}
eval: {{batch_size: 16}}
log: {{sample_prompts: []}}
"""

# The design: a harmful variant (a learning rate 30x too low for 20 steps), a null one
# (how often metrics are reported cannot change training), 3 seeds, 2 runs at a time.
SWEEP = """\
sweep:
  name: {name}
  base: base.yaml
  seeds: {seeds}
  variants:
    baseline: {{}}
    lr-div-30: {{train.lr: 3.3e-4}}
{extra}  max_concurrent: 2
  stages: {stages}
"""
NULL_VARIANT = "    log-every-10: {train.log_interval: 10}\n"


def write_sweep(folder: Path, name: str, seeds="[1, 2, 3]", extra=NULL_VARIANT, stages="[train, eval, report]",
                storage: str = "", dataset: str = "", more: str = "") -> Path:
    if not (folder / "base.yaml").exists():
        (folder / "base.yaml").write_text(BASE.format(storage=storage, dataset=dataset))
    path = folder / f"{name}.yaml"
    path.write_text(SWEEP.format(name=name, seeds=seeds, extra=extra, stages=stages) + more)
    return path


# ---------------------------------------------------------------------------------------------
# The spec


def test_a_sweep_is_one_ordinary_run_per_variant_and_seed(tmp_path):
    path = write_sweep(tmp_path, "abl", storage=str(tmp_path / "runs"), dataset="data",
                       more="  common: {train.max_steps: 12}\n  combine: [[lr-div-30, log-every-10]]\n")
    sweep = load_sweep(path, ["train.warmup_steps=3"])
    assert sweep.variants == ["baseline", "lr-div-30", "log-every-10", "lr-div-30+log-every-10"]
    names = [run.name for run in sweep.runs]
    assert names[:3] == ["abl/baseline@1", "abl/baseline@2", "abl/baseline@3"] and len(names) == 12
    for run in sweep.runs:
        assert run.spec.train.seed == run.seed and run.spec.storage_path == str(tmp_path / "runs")
        assert run.spec.train.max_steps == 12 and run.spec.train.warmup_steps == 3  # common, then --set
        assert run.spec.log.tags == ["sweep:abl", f"variant:{run.variant}", f"seed:{run.seed}"]
    stacked = sweep.runs_of("lr-div-30+log-every-10")[0].spec
    assert stacked.train.lr == 3.3e-4 and stacked.train.log_interval == 10
    assert sweep.runs_of("baseline")[0].spec.train.lr == 1e-2
    assert sweep.folder == f"{tmp_path / 'runs'}/abl"


def test_combining_variants_that_set_one_key_differently_is_refused(tmp_path):
    path = write_sweep(tmp_path, "abl", extra="    hot: {train.lr: 0.1}\n", storage="runs", dataset="data")
    with pytest.raises(RaygptError, match=r"lr-div-30 sets train.lr to 0.00033 and hot to 0.1"):
        load_sweep(path, combine=[["lr-div-30", "hot"]])
    with pytest.raises(RaygptError, match=r"'hott' is not a variant \(did you mean 'hot'\?\)"):
        load_sweep(path, combine=[["lr-div-30", "hott"]])


def test_an_unknown_key_in_one_variant_refuses_the_whole_sweep_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a sweep that should have been refused")

    monkeypatch.setattr(ray, "init", no_ray)
    path = write_sweep(tmp_path, "abl", extra="    typo: {train.grad_clipp: 1.0}\n", storage=str(tmp_path / "runs"),
                       dataset="data")
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2, err  # one message: the sweep file and variant, then the key
    assert f"{path}: variant 'typo': invalid run spec" in err
    assert "train.grad_clipp: unknown key (did you mean 'grad_clip'?)" in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    # Settings the sweep makes for every run are no variant's to change.
    path.write_text(path.read_text().replace("train.grad_clipp: 1.0", "train.seed: 5"))
    assert main(["sweep", str(path)]) == 2
    assert "sweep.variants.typo: train.seed: set by the sweep for every run" in capsys.readouterr().err


@pytest.mark.parametrize("text, problem", [
    ("sweep: {name: a/b, base: base.yaml, variants: {baseline: {}}}", "sweep.name"),
    ("sweep: {name: s, base: base.yaml, variants: {baseline: {}}, seeds: [1, 1]}", "sweep.seeds: lists 1 twice"),
    ("sweep: {name: s, base: base.yaml, variants: {baseline: {}}, stages: [judge]}", "list ift too"),
    ("sweep: {name: s, base: base.yaml, variants: {x: {}}}", "'baseline' is not a variant"),
    ("sweep: {name: s, base: base.yaml, variants: {baseline: {}}, max_concurent: 2}",
     "max_concurent: unknown key (did you mean 'max_concurrent'?)"),
    ("sweep: {name: s, base: missing.yaml, variants: {baseline: {}}}", "missing.yaml: no such run spec"),
    ("sweep: {name: s, base: base.yaml, variants: {baseline: {}, null: {}}}", "the name None is not text"),
    ("name: x\ntrain: {lr: 1}\n", "not a sweep spec"),
])
def test_a_bad_sweep_spec_is_one_clear_error(tmp_path, text, problem):
    (tmp_path / "base.yaml").write_text(BASE.format(storage="runs", dataset="data"))
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(RaygptError, match=problem.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        load_sweep(tmp_path / "s.yaml")


# ---------------------------------------------------------------------------------------------
# The statistics


def test_the_paired_difference_is_the_t_test_on_seed_paired_differences():
    rng = np.random.default_rng(0)
    seed_luck = rng.normal(0, 0.05, 5)
    baseline = {s: 3.69 + seed_luck[s] for s in range(5)}
    variant = {s: 3.69 - 0.03 + seed_luck[s] + rng.normal(0, 0.004) for s in range(5)}
    row = paired_difference(variant, baseline)
    reference = scipy_stats.ttest_rel([variant[s] for s in range(5)], [baseline[s] for s in range(5)])
    assert row["p_value"] == pytest.approx(reference.pvalue) and row["t"] == pytest.approx(reference.statistic)
    low, high = reference.confidence_interval(0.95)
    assert row["ci"] == pytest.approx([low, high])
    # Pairing is the point: the seed's luck (sd 0.05) cancels, the effect (0.03) shows.
    assert high < 0
    unpaired = scipy_stats.ttest_ind([variant[s] for s in range(5)], [baseline[s] for s in range(5)])
    assert unpaired.pvalue > 0.05 > row["p_value"]


def test_verdicts_after_holm_and_the_noise_band():
    runs = []
    for seed, luck in zip((1, 2, 3), (0.0, 0.01, -0.012)):
        runs += [{"variant": "baseline", "seed": seed, "test_loss": 3.69 + luck, "val_loss": 3.7 + luck},
                 {"variant": "wd-0.01", "seed": seed, "test_loss": 3.69 - 0.049 + luck * 1.05, "val_loss": None},
                 {"variant": "null", "seed": seed, "test_loss": 3.69 + luck, "val_loss": None},
                 {"variant": "wobble", "seed": seed, "test_loss": 3.69 + luck + (0.02, -0.015, 0.001)[seed - 1],
                  "val_loss": None}]
    runs.append({"variant": "one-seed", "seed": 1, "test_loss": 3.5, "val_loss": None})
    result = compare_variants(runs, ["baseline", "wd-0.01", "null", "wobble", "one-seed"], "baseline")
    rows = {r["variant"]: r for r in result["variants"]}
    assert rows["wd-0.01"]["vs_baseline"]["verdict"] == "better"
    assert rows["null"]["vs_baseline"]["verdict"] == "noise" and rows["null"]["vs_baseline"]["identical"]
    assert rows["wobble"]["vs_baseline"]["verdict"] == "noise"
    assert rows["one-seed"]["vs_baseline"]["verdict"] == "too few seeds"
    p = [rows[v]["vs_baseline"]["p_value"] for v in ("wd-0.01", "null", "wobble")]
    holm = [rows[v]["vs_baseline"]["p_holm"] for v in ("wd-0.01", "null", "wobble")]
    assert holm[0] == pytest.approx(min(1.0, 3 * min(p)))  # the smallest of 3 tested p-values, times 3
    noise = result["noise"]["test_loss"]
    spread = seed_spread([3.69, 3.70, 3.678])
    assert noise["sd"] == pytest.approx(np.std([3.69, 3.70, 3.678], ddof=1)) == pytest.approx(spread["sd"])
    low, high = noise["ci_sd"]
    assert low < noise["sd"] < high and high / noise["sd"] == pytest.approx(math.sqrt(2 / scipy_stats.chi2.ppf(0.025, 2)))


def test_which_parameters_a_variant_shares_with_the_baseline_at_init(tmp_path):
    from raygpt.sweep.pairing import initialisation

    path = write_sweep(tmp_path, "abl", storage="runs", dataset="data",
                       extra="    qkv-bias: {model.qkv_bias: true}\n    tied: {model.tie_weights: true}\n")
    sweep = load_sweep(path)
    base = sweep.runs_of("baseline")[0].spec
    qkv = initialisation(sweep.runs_of("qkv-bias")[0].spec, base)
    assert qkv["shared"] == qkv["baseline_parameters"] == 27 and qkv["own"] == [
        "transformer.h.0.attn.c_attn.bias", "transformer.h.1.attn.c_attn.bias"]
    tied = initialisation(sweep.runs_of("tied")[0].spec, base)
    assert tied["shared"] == 26 and tied["baseline_only"] == ["lm_head.weight"]
    other_seed = initialisation(sweep.runs_of("qkv-bias")[1].spec, base)
    assert not other_seed["same_seed"] and other_seed["shared"] == 0


def test_a_sweep_job_uploads_its_base_spec_beside_it(tmp_path, monkeypatch):
    from raygpt.cli.jobs import entrypoint_for, stage_working_dir

    (tmp_path / "jobs").mkdir()
    path = write_sweep(tmp_path / "jobs", "abl", storage="s3://bucket/runs", dataset="s3://bucket/data")
    (tmp_path / "jobs" / "abl.yaml").write_text(path.read_text().replace("base: base.yaml", "base: jobs/base.yaml"))
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("jobs/abl.yaml")
    staged, relpath = stage_working_dir(Path("jobs/abl.yaml"), None, tmp_path / "staging", (Path(sweep.base_path),))
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == [
        "jobs/abl.yaml", "jobs/base.yaml"]
    assert entrypoint_for("sweep", relpath, ["train.max_steps=5"]) == "raygpt sweep jobs/abl.yaml --set train.max_steps=5"
    monkeypatch.chdir(staged)  # where the job runs: the base is found again
    assert load_sweep(relpath).base_path == "jobs/base.yaml"


def test_the_shipped_sweep_specs_load(monkeypatch):
    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    sweep = load_sweep("jobs/sweep-gpt2-small-ablations.yaml")
    assert len(sweep.config.seeds) == 3 and sweep.config.baseline in sweep.variants
    for variant, change in (("grad-clip", ("train", "grad_clip", 1.0)), ("no-dropout", ("model", "dropout", 0.0)),
                            ("qkv-bias", ("model", "qkv_bias", True)), ("wd-0.01", ("train", "weight_decay", 0.01)),
                            ("tied", ("model", "tie_weights", True))):
        section, key, value = change
        assert getattr(getattr(sweep.runs_of(variant)[0].spec, section), key) == value
    assert sweep.runs_of("baseline")[0].spec.model.preset == "gpt2-small"
    tiny = load_sweep("jobs/sweep-tiny-cpu.yaml")
    assert tiny.runs_of("baseline")[0].spec.model.preset == "tiny" and not tiny.runs[0].spec.train.use_gpu


# ---------------------------------------------------------------------------------------------
# Real sweeps


def _started(run: dict) -> datetime:
    return datetime.fromisoformat(run["started"])


@pytest.fixture(scope="module")
def finished_sweep(ray_local, tiny_dataset, tmp_path_factory):
    """The issue's sweep, uninterrupted: baseline, lr-div-30 and log-every-10 x 3 seeds, at most
    2 at a time, on the session's local Ray and the test store."""
    from rich.console import Console

    from raygpt.sweep.run import run_sweep

    folder = tmp_path_factory.mktemp("sweep")
    storage = f"s3://raygpt-test/sweeps-{os.urandom(3).hex()}"
    path = write_sweep(folder, "abl", storage=storage, dataset=tiny_dataset)
    console = Console(file=open(folder / "console.txt", "w"), width=200)
    document = run_sweep(load_sweep(path), console)
    return {"folder": folder, "storage": storage, "document": document, "path": path}


@pytest.mark.integration
def test_the_report_calls_the_harmful_variant_worse_and_the_null_one_within_noise(finished_sweep):
    from raygpt.storage import Storage

    document = finished_sweep["document"]
    assert [r["status"] for r in document["runs"]] == ["finished"] * 9
    rows = {r["variant"]: r for r in document["variants"]}
    harmful, null = rows["lr-div-30"]["vs_baseline"], rows["log-every-10"]["vs_baseline"]
    assert harmful["verdict"] == "worse" and harmful["p_holm"] < 0.05 and harmful["ci"][0] > 0
    assert null["verdict"] == "noise" and null["difference"] == 0 and null["identical"]
    assert document["noise"]["test_loss"]["n"] == 3 and document["noise"]["test_loss"]["sd"] > 0
    # Paired by design, and checked: the same sequences at every step and the same initial weights.
    for row in (rows["lr-div-30"], rows["log-every-10"]):
        assert all(s["data_order"]["same"] for s in row["pairing"]["seeds"])
        init = row["pairing"]["initialisation"]
        assert init["shared"] == init["parameters"] == init["baseline_parameters"]
    # The files, through the store.
    report = f"{finished_sweep['storage']}/abl/report"
    stored = json.loads(Storage().read_text(f"{report}/sweep.json"))
    assert stored["variants"] == json.loads(json.dumps(document["variants"]))
    for name in ("sweep.md", "sweep.csv", "runs.csv", "val_loss.png", "differences.png"):
        assert Storage().stored_size(f"{report}/{name}") > 0
    markdown = Storage().read_text(f"{report}/sweep.md")
    assert "lr-div-30: +" in markdown and "worse than the seed noise" in markdown
    assert "log-every-10: +0.000 nats at each of 3 seeds, within the run-to-run noise" in markdown


@pytest.mark.integration
def test_the_null_variant_trains_bitwise_like_the_baseline_seed_by_seed(finished_sweep):
    from raygpt.storage import Storage, join
    from raygpt.train.metrics import read_metrics, step_losses

    storage = finished_sweep["storage"]
    for seed in (1, 2, 3):
        baseline = step_losses(read_metrics(join(storage, f"abl/baseline@{seed}"), Storage()))
        null = step_losses(read_metrics(join(storage, f"abl/log-every-10@{seed}"), Storage()))
        assert sorted(baseline) == list(range(1, 21)) and null == baseline  # every step, bitwise
    other_seed = step_losses(read_metrics(join(storage, "abl/baseline@2"), Storage()))
    assert other_seed != baseline


@pytest.mark.integration
def test_two_runs_train_at_the_same_time_when_two_may(finished_sweep):
    runs = finished_sweep["document"]["runs"]
    spans = [(_started(r), datetime.fromisoformat(r["finished"])) for r in runs]
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1]]
    assert overlapping, spans
    # Never more than 2 at once: at every start, at most one other run is between its start and end.
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2


@pytest.mark.integration
def test_a_finished_sweep_started_again_only_prints_its_report(finished_sweep):
    from rich.console import Console

    from raygpt.storage import Storage, join
    from raygpt.sweep.run import run_sweep

    storage = finished_sweep["storage"]
    files = [join(storage, f"abl/{v}@{s}", name) for v in ("baseline", "lr-div-30", "log-every-10") for s in (1, 2, 3)
             for name in ("run.json", "metrics.jsonl")] + [join(storage, "abl/eval/test_loss.json"),
                                                           join(storage, "abl/report/sweep.json")]
    before = {uri: Storage().read_bytes(uri) for uri in files}
    console = Console(record=True, width=200)
    document = run_sweep(load_sweep(finished_sweep["path"]), console)
    assert {uri: Storage().read_bytes(uri) for uri in files} == before
    printed = console.export_text()
    assert "9 runs under" in printed and "9 finished before" in printed and "is up to date" in printed
    assert "lr-div-30: +" in printed and document["variants"] == finished_sweep["document"]["variants"]


@pytest.mark.integration
def test_no_credential_reaches_a_trial_or_a_ray_log(finished_sweep, s3_server):
    """Ray Tune would copy the driver's AWS keys into each trial's runtime env, which Ray's
    runtime-env agent logs in plain text; the sweep keeps them out."""
    import ray

    secret = s3_server.secret_key.encode()
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    assert any(p.name == "runtime_env_agent.log" for p in logs.iterdir())
    leaked = [p for p in logs.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaked
    assert secret not in (finished_sweep["folder"] / "console.txt").read_bytes()


def _records(storage: str, runs: list[str]) -> dict[str, dict]:
    from raygpt.storage import Storage, join

    # A read may meet the driver's rewrite of a record: that record is read at the next poll.
    records = {run: Storage().read_json_or_none(join(storage, run, "run.json")) for run in runs}
    return {run: record for run, record in records.items() if record is not None}


INSTRUCTION_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma".split()


@pytest.fixture(scope="module")
def killed_sweep(finished_sweep, ray_local, s3_server):
    """The driver of a sweep (baseline and lr-div-30 x seeds 1 and 2; train, eval, ift, report)
    on the session's Ray, SIGKILLed while runs are in flight (one finished, another past its
    first checkpoint), then, once Ray has stopped the killed driver's trials, the same command
    again."""
    from ray._private.state import actors

    from raygpt.storage import Storage, join
    from raygpt.train.lease import holder_alive, read_lease
    from raygpt.weights.integrity import stored_checkpoint_problem

    folder, storage = finished_sweep["folder"], finished_sweep["storage"]
    instructions = [{"instruction": f"Say {w} {k} times.", "input": "" if k % 2 else w, "output": f"{w} " * k}
                    for k in range(1, 9) for w in INSTRUCTION_WORDS]  # 96: 81 train, 10 test, 5 val
    (folder / "instructions.json").write_text(json.dumps(instructions))
    ift = (f"  common: {{ift.data: {folder / 'instructions.json'}, ift.epochs: 1, ift.batch_size: 8, "
           "ift.eval_interval: 100, ift.max_new_tokens: 8, ift.generation_batch_size: 16}\n")
    path = write_sweep(folder, "killed", seeds="[1, 2]", extra="", stages="[train, eval, ift, report]", more=ift)
    runs = [f"killed/{v}@{s}" for v in ("baseline", "lr-div-30") for s in (1, 2)]
    command = [sys.executable, "-m", "raygpt.cli", "sweep", str(path),
               "--address", ray_local.get_runtime_context().gcs_address]

    def fate_shared():
        """The live actors that die with their job's driver: not Ray Train's detached helpers (its
        state actor, and a placement-group cleaner that lives on when its controller dies before
        telling it to watch)."""
        return {i: a["ActorClassName"] for i, a in actors(actor_state_name="ALIVE").items() if not a["IsDetached"]}

    before_driver = set(fate_shared())
    env = {**os.environ, **s3_server.env()}
    env.pop("RAY_ADDRESS", None)
    with open(folder / "killed-first.log", "w") as log:
        driver = subprocess.Popen(command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)
        deadline = time.time() + 900
        try:
            while True:
                assert driver.poll() is None, (folder / "killed-first.log").read_text()[-3000:]
                assert time.time() < deadline, "no run finished while another was past its first checkpoint"
                records = _records(storage, runs)
                finished = [r for r, rec in records.items() if rec["status"] == "finished"]
                in_flight = [r for r, rec in records.items() if rec["status"] == "running" and stored_checkpoint_problem(
                             join(storage, r, "checkpoint_00000010"), Storage(), hashes=False) is None]
                if finished and in_flight:
                    break
                time.sleep(0.2)
        finally:
            driver.kill()
            driver.wait()
    # The killed driver's job ends and Ray stops its actors: the trials, each the driver of one
    # run, and their workers. A trial gets a moment past the kill: a run may finish in it.
    ceiling = time.time() + 120
    while left := {i: name for i, name in fate_shared().items() if i not in before_driver}:
        assert time.time() < ceiling, f"the killed sweep's actors are still alive: {sorted(left.values())}"
        time.sleep(0.2)
    # ... and their processes have exited: no run's lease names a live driver.
    while held := [r for r in runs if (lease := read_lease(join(storage, r), Storage())) and holder_alive(lease)]:
        assert time.time() < ceiling, f"the killed sweep's drivers still hold {held}"
        time.sleep(0.2)
    before = {r: (Storage().read_bytes(join(storage, r, "run.json")), Storage().read_bytes(join(storage, r, "metrics.jsonl")))
              for r in finished}
    restarted_over = [r for r, rec in _records(storage, runs).items() if rec["status"] == "finished"]
    again = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=1200, env=env)
    report = Storage().read_json_or_none(join(storage, "killed/report/sweep.json")) or {}
    errors = {r["run"]: r["error"] for r in report.get("runs", []) if r.get("error")}
    assert again.returncode == 0, f"{errors}\n{again.stdout[-3000:]}{again.stderr[-3000:]}"
    return {"path": path, "runs": runs, "finished": finished, "in_flight": in_flight, "before": before,
            "records": _records(storage, runs), "stdout": again.stdout, "restarted_over": restarted_over}


@pytest.mark.integration
def test_a_killed_sweep_started_again_skips_finished_runs_and_resumes_the_rest(finished_sweep, killed_sweep,
                                                                               tmp_path):
    """Every run finishes; no finished run is trained again (not even its record rewritten);
    an in-flight one resumes from its checkpoint; the report equals the report of an
    uninterrupted sweep of the same runs."""
    from raygpt.storage import Storage, join

    storage, records = finished_sweep["storage"], killed_sweep["records"]
    assert all(records[r]["status"] == "finished" for r in killed_sweep["runs"]), records
    for run, (record, metrics) in killed_sweep["before"].items():
        assert Storage().read_bytes(join(storage, run, "run.json")) == record
        assert Storage().read_bytes(join(storage, run, "metrics.jsonl")) == metrics
    for run in killed_sweep["in_flight"]:
        # The killed session's attempt is in the record, ended as its driver was lost; the next
        # session resumed the run from a checkpoint (or, had the run reached its last step
        # before its trial stopped, only completed its record, or found it finished).
        attempts = records[run]["attempts"]
        if attempts[0]["ended"] == "finished":  # the trial finished the run before Ray stopped it
            assert records[run]["sessions"] == 1 and attempts[0]["last_step"] == 20, records[run]
            continue
        assert attempts[0]["ended"] == "driver lost" and attempts[0]["last_step"] >= 10, attempts
        assert records[run]["sessions"] == 2 or attempts[0]["last_step"] == 20, records[run]
        if records[run]["sessions"] == 2:
            assert records[run]["resumed_from"]["checkpoint"].startswith("checkpoint_0000001")
    # Those finished when it started again: a run may finish in the moment past the kill.
    assert f"{len(killed_sweep['restarted_over'])} finished before" in killed_sweep["stdout"]

    # An uninterrupted sweep of these variants and seeds: the finished sweep's runs, reported
    # under this design (the same base, seeds and settings: the same models, bitwise).
    reference = write_sweep(finished_sweep["folder"], "reference", seeds="[1, 2]", extra="")
    reference.write_text(reference.read_text().replace("name: reference", "name: abl"))
    assert main(["report", str(reference), "--output", str(tmp_path / "reference")]) == 0
    expected = json.loads((tmp_path / "reference" / "sweep.json").read_text())
    killed = json.loads(Storage().read_text(join(storage, "killed/report/sweep.json")))
    numbers = ("test_loss", "val_loss", "step", "status", "variant", "seed")
    assert [{k: r[k] for k in numbers} for r in killed["runs"]] == [{k: r[k] for k in numbers} for r in expected["runs"]]
    for mine, theirs in zip(killed["variants"], expected["variants"]):
        assert (mine["test_loss"], mine["val_loss"], mine.get("vs_baseline")) == (
            theirs["test_loss"], theirs["val_loss"], theirs.get("vs_baseline"))
        if "pairing" in mine:
            assert mine["pairing"]["seeds"] == theirs["pairing"]["seeds"]
    assert killed["noise"] == expected["noise"]


@pytest.mark.integration
def test_the_judge_pools_each_variant_over_its_pretraining_seeds(finished_sweep, killed_sweep, tmp_path,
                                                                 monkeypatch, capsys):
    """The judge stage added to the killed sweep (nothing is trained, evaluated or fine-tuned
    again), against the local OpenAI-compatible server, scoring each run's answers with a
    planted pretraining-seed effect of 20 points: each variant is one score whose interval
    includes the pretraining-seed variance."""
    from fake_openai import _ANSWER_BLOCK, _REFERENCE_BLOCK, FakeOpenAI, Reply, score_answer

    from raygpt.storage import Storage, join

    storage = finished_sweep["storage"]
    planted = {}
    for run in killed_sweep["runs"]:
        variant, seed = run.split("/")[1].split("@")
        answers = json.loads(Storage().read_text(join(storage, f"killed/ift/answers/{variant}-{seed}.json")))
        for index, item in enumerate(answers["items"]):
            planted.setdefault((item["output"].strip(), item["response"].strip()), 40 + 20 * (seed == "2") + index % 3)
    items = len(answers["items"])

    def judge(body, index):
        text = "\n".join(m["content"] for m in body["messages"] if isinstance(m.get("content"), str))
        reference = _REFERENCE_BLOCK.search(text).group("text")
        scores = [{"label": b.group("label"), "reason": "planted", "score": planted.get(
            (reference.strip(), b.group("text").strip()), score_answer(b.group("text"), reference))}
            for b in _ANSWER_BLOCK.finditer(text)]
        return Reply(content=json.dumps({"scores": scores}))

    monkeypatch.setenv("OPENAI_API_KEY", "sk-sweep-test")
    monkeypatch.chdir(finished_sweep["folder"])
    before = {r: Storage().read_bytes(join(storage, r, "run.json")) for r in killed_sweep["runs"]}
    with FakeOpenAI(models=["judge-1"]) as server:
        server.policy = judge
        text = killed_sweep["path"].read_text().replace("stages: [train, eval, ift, report]",
                                                          "stages: [train, eval, ift, judge, report]")
        text = text.replace("ift.generation_batch_size: 16}", f"ift.generation_batch_size: 16, judge.base_url: "
                            f"{server.base_url}, judge.model: judge-1, judge.passes: 2, judge.cache_dir: "
                            f"{tmp_path / 'cache'}, judge.bootstrap_samples: 400, report.bootstrap_samples: 400}}")
        path = finished_sweep["folder"] / "killed-judged.yaml"
        path.write_text(text)
        assert main(["sweep", str(path)]) == 0, capsys.readouterr().err
        assert len(server.chat_requests) == 2 * items  # one call per item and pass: 4 runs + 2 anchors each
        summary = Storage().read_bytes(join(storage, "killed/judge/summary.json"))
        server.reset_counts()
        assert main(["sweep", str(path)]) == 0  # finished: judged already, nothing asked or rewritten
        assert not server.requests and Storage().read_bytes(join(storage, "killed/judge/summary.json")) == summary
    assert {r: Storage().read_bytes(join(storage, r, "run.json")) for r in killed_sweep["runs"]} == before
    document = json.loads(Storage().read_text(join(storage, "killed/report/sweep.json")))
    judged = {v["variant"]: v for v in document["judge"]["variants"]}
    assert set(judged) == {"baseline", "lr-div-30"}
    for entry in judged.values():
        assert entry["runs"] == 2 and entry["ci95_includes_seeds"]
        assert entry["pretraining_sd"] > 5  # the planted 20 points between the two pretraining seeds
        width, items_only = entry["ci95"][1] - entry["ci95"][0], entry["ci95_items"][1] - entry["ci95_items"][0]
        assert width > 2 * items_only
    assert document["judge"]["pairs"] and all("lr-div-30" in p for p in document["judge"]["pairs"])
    assert document["judge"]["agreement"]["sentence"].startswith("variants: test loss and IFT score")
    assert "IFT score" in Storage().read_text(join(storage, "killed/report/sweep.md"))
