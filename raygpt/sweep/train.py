"""A sweep's training stage: one Ray Tune trial per unfinished run, each driving that run's
own ``TorchTrainer`` through ``raygpt.train.launch.train`` (Ray Train V2's pattern for sweeps
of distributed runs), as many at once as ``max_concurrent`` or the cluster allows.

A run is an ordinary raygpt run, so everything a run has holds for each trial: its lease,
checkpoints, run record, trackers, spot and elastic handling. Which runs need training is read
from their run records, not from Tune's own experiment state: a sweep started again skips the
finished runs (their records untouched), resumes the unfinished ones from their checkpoints
and starts the rest, whatever stopped it. A run that fails for good is one failed trial; the
others go on.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from raygpt.stages import RUN_RECORD_FILE, run_dir
from raygpt.storage import Storage, join
from raygpt.sweep.spec import Sweep, SweepRun


@dataclass
class RunOutcome:
    """How a sweep's run stands after the training stage."""

    run: SweepRun
    status: str
    """``finished`` (now or before: ``skipped`` says which), ``failed``, ``not run``."""
    skipped: bool = False
    """Finished before this sweep started: not trained again."""
    error: str | None = None


def run_record(run: SweepRun, storage: Storage) -> dict[str, Any] | None:
    return storage.read_json_or_none(join(run_dir(run.spec), RUN_RECORD_FILE))


def is_trained(record: dict[str, Any] | None, run: SweepRun) -> bool:
    """Whether a run's record says it reached the step it trains to: ``finished``, or
    ``stopped`` at ``train.stop_at_step`` (a session that ends early on purpose)."""
    if record is None:
        return False
    step = (record.get("final") or {}).get("step")
    stop = run.spec.train.stop_at_step
    return record.get("status") == "finished" or (
        record.get("status") == "stopped" and stop is not None and step is not None and step >= stop)


def default_concurrency(runs: list[SweepRun], resources: dict[str, float]) -> int:
    """Runs the cluster holds at once: its GPUs over the GPUs of the largest run, or on a
    cluster without GPUs its CPUs over the largest run's CPUs; at least one."""
    def workers(run: SweepRun) -> int:
        n = run.spec.train.num_workers
        return max(n) if isinstance(n, list) else n

    largest = max(runs, key=workers)
    use_gpu = largest.spec.train.use_gpu if largest.spec.train.use_gpu is not None else resources.get("GPU", 0) > 0
    if use_gpu:
        return max(1, math.floor(resources.get("GPU", 0) / workers(largest)))
    need = max(workers(r) * r.spec.train.cpus_per_worker for r in runs)
    return max(1, math.floor(resources.get("CPU", 0) / need))


CREDENTIAL_ENV = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"})
"""What Ray Tune copies from the driver's environment into every trial's runtime env."""


def keep_credentials_out_of_trials() -> None:
    """Stop Ray Tune from putting the driver's AWS credentials into each trial actor's runtime
    env: Ray's runtime-env agent logs a runtime env in plain text (``runtime_env_agent.log``),
    and raygpt puts no credential in a job. A trial reads S3 as every Ray worker of a run does,
    from its node's environment, config files or instance profile. Tune keeps the list in a
    module global that it reads at each trial start; without that global (another Ray) this
    does nothing, and the sweep tests' log scan says so."""
    from ray.tune.execution import class_cache

    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if names is not None:
        class_cache.ENV_VARS_TO_PROPAGATE = frozenset(names) - CREDENTIAL_ENV


def train_runs(sweep: Sweep, storage: Storage, progress, address: str | None = None,
               num_cpus: int | None = None) -> list[RunOutcome]:
    """Train every run of the sweep that its record does not call trained; returns each run's outcome."""
    outcomes = {r.name: RunOutcome(r, "not run") for r in sweep.runs}
    pending = []
    for run in sweep.runs:
        if is_trained(run_record(run, storage), run):
            outcomes[run.name] = RunOutcome(run, "finished", skipped=True)
        else:
            pending.append(run)
    progress.start(sweep, [o for o in outcomes.values()])
    if pending:
        _fit(sweep, pending, outcomes, progress, address, num_cpus)
    return [outcomes[r.name] for r in sweep.runs]


def _fit(sweep: Sweep, pending: list[SweepRun], outcomes: dict[str, RunOutcome], progress,
         address: str | None, num_cpus: int | None) -> None:
    import ray
    from ray import tune

    from raygpt.cluster import ON_HEAD_NODE, connect, failure_message, poll_reports_often

    # A trial stays in the folder the sweep started from (Tune hands this to every trial), so a
    # run spec's relative paths mean there what they mean to `raygpt train`.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    keep_credentials_out_of_trials()
    poll_reports_often()
    connect(address, num_cpus)
    concurrency = sweep.config.max_concurrent or default_concurrency(pending, ray.cluster_resources())
    progress.note(f"training {len(pending)} run(s), at most {concurrency} at once")
    specs = {run.name: run.spec for run in pending}
    # The trial only drives its run's TorchTrainer, which asks for the workers' resources itself.
    trainable = tune.with_resources(tune.with_parameters(train_trial, specs=specs), ON_HEAD_NODE)
    experiment = tempfile.mkdtemp(prefix="raygpt-sweep-")  # Tune's own state: the run records are the truth
    try:
        tuner = tune.Tuner(
            trainable,
            param_space={"run": tune.grid_search([run.name for run in pending])},
            # A trial's process, Ray and raygpt imported, drives the next run too: no start per run.
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, reuse_actors=True),
            run_config=tune.RunConfig(name=sweep.name, storage_path=experiment, verbose=0,
                                      callbacks=[progress.tune_callback()],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        results = tuner.fit()
        for result in results:
            name = (result.config or {}).get("run")
            if name not in outcomes:
                continue
            if result.error is not None:
                outcomes[name].status, outcomes[name].error = "failed", failure_message(result.error)
            else:
                outcomes[name].status = "finished"
    finally:
        shutil.rmtree(experiment, ignore_errors=True)


def train_trial(config: dict[str, Any], specs: dict[str, Any]) -> None:
    """One Tune trial: train one run, handing Ray Tune its reports on the way."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback
    from rich.console import Console

    from raygpt.train.launch import train

    begun = time.time()
    # The trial's output reaches the sweep's driver through Ray's log forwarding; the
    # sweep's own view shows the runs, so a run's progress view stays quiet.
    record = train(specs[config["run"]], console=Console(quiet=True), callbacks=[TuneReportCallback()])
    final = record.get("final") or {}
    tune.report({"run_status": record.get("status"), "step": final.get("step"), "loss": final.get("loss"),
                 "val_loss": final.get("val_loss"), "trial_s": time.time() - begun})
