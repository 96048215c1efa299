"""The driver of ``raygpt train``: check everything before a worker starts, then launch.

``train`` takes the run's lease (``raygpt.train.lease``: a second driver of a run being
trained refuses), then goes through four parts: ``preflight`` checks storage, the dataset's
manifest and shards, the batch arithmetic, the model a resumed run must match and the
cluster's size; ``open_run_record`` prepares ``run.json``; ``build_trainer`` makes the
``TorchTrainer`` (DDP over NCCL on GPUs or Gloo on CPUs, checkpoints to ``storage_path/name``,
where a run started again under the same name resumes from its newest one, and
``FailureConfig(max_failures)`` restarts after a lost worker or node); a ``Session`` follows
it, every report going through the run's metrics stream, and finishes the record.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
)
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from raygpt.cluster import (
    classify_failure,
    cluster_has_gpus,
    connect,
    failure_message,
    forwarded_env,
    poll_reports_often,
    store_outage,
)
from raygpt.config import RunSpec, recorded_spec
from raygpt.cost import run_cost
from raygpt.data.batches import count_eval_windows, shard_sequences
from raygpt.data.manifest import check_dataset, manifest_hash
from raygpt.errors import RaygptError, last_line
from raygpt.model import GPT, config_from_spec
from raygpt.stages import METRICS_FILE, RUN_RECORD_FILE
from raygpt.storage import Storage, StoreUnreachableError, join
from raygpt.train.attempts import AttemptLog, close_orphaned, describe_attempts
from raygpt.train.elastic import SurvivorSizing, shrink_without_waiting
from raygpt.train.lease import RunLease
from raygpt.train.loop import train_loop_per_worker
from raygpt.train.metrics import (
    MetricsStream,
    describe_steps,
    read_metrics,
    recover_records,
    startup_times,
    summarize,
)
from raygpt.train.plan import TrainPlan, plan_run
from raygpt.train.progress import ProgressView
from raygpt.train.resume import check_resume, prepare_resume
from raygpt.train.retention import CheckpointRetention
from raygpt.train.runrecord import RunRecord
from raygpt.train.sinks import MetricsFile, QueueSink, end_tracker_runs, prepare_trackers, tracker_sinks
from raygpt.weights.integrity import ResumeChoice
from raygpt.weights.retention import Retention

logger = logging.getLogger(__name__)


def check_splits(manifest: dict[str, Any], plan: TrainPlan, spec: RunSpec) -> None:
    """A RaygptError, before Ray starts, when the train split holds less than one global batch
    (whatever ``train.max_steps`` says) or the val split less than one sequence."""
    sequences = int(shard_sequences(manifest["splits"]["train"]["shards"], plan.seq_len).sum())
    if sequences < plan.global_batch_size:
        raise RaygptError(f"train.global_batch_tokens: a step reads {plan.global_batch_size:,} sequences of "
                          f"{plan.seq_len + 1} tokens, but the train split of {spec.train.dataset} holds "
                          f"{sequences:,}; lower train.global_batch_tokens or prepare more data")
    if spec.train.val_interval > 0 and count_eval_windows(manifest, "val", plan.seq_len, spec.train.val_tokens) == 0:
        raise RaygptError(f"train.val_interval: the val split of {spec.train.dataset} has "
                          f"{manifest['splits']['val']['tokens']:,} tokens, fewer than one sequence of "
                          f"{plan.seq_len + 1}; prepare more val tokens or set train.val_interval: 0")


def check_cluster(plan: TrainPlan, spec: RunSpec, started_locally: bool) -> None:
    """A local instance that cannot hold the (fewest) workers is an error; a cluster may still grow."""
    workers = plan.min_workers
    need = {"CPU": workers * spec.train.cpus_per_worker, "GPU": workers if plan.use_gpu else 0}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short and started_locally:
        raise RaygptError(f"train.num_workers: {workers} workers need {' and '.join(short)}; lower "
                          "train.num_workers / train.cpus_per_worker or pass --num-cpus")
    if short:
        logger.warning("raygpt train: waiting for the cluster to grow: %d workers need %s", workers, " and ".join(short))


class MetricsCallback(UserCallback):
    """Feeds Ray Train's reports into the run's ``MetricsStream``. A Ray Train callback runs in
    the Train controller, which outlives worker restarts, so the stream sees every attempt.

    Neither hook ever raises: Ray Train ends the whole run at an error in a callback (its
    failure policy allows none), and a store outage or a lost queue must not do that."""

    def __init__(self, stream: MetricsStream, survivors: SurvivorSizing | None = None):
        self.stream, self.survivors = stream, survivors
        self._devices_seen = False
        self._actors: list[str | None] = []  # the current attempt's workers' Ray actors, by rank

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        try:
            self._take(metrics, checkpoint)
        except Exception as e:
            logger.warning("the metrics stream lost a report of step %s (%s: %s); training goes on",
                           metrics[0].get("step"), type(e).__name__, last_line(str(e)), exc_info=True)

    def _take(self, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = dict(metrics[0])
        if "step" not in report:  # a setup error every worker agreed on: the driver reports it
            self.stream.event(report)
            return
        if "node" in report:  # an attempt's first report: where its workers run, by rank
            report["nodes"] = [m.get("node") for m in metrics]
            self._actors = [m.get("actor") for m in metrics]
            report.pop("actor", None)
            if not self._devices_seen:
                report["devices"] = [m.get("device") for m in metrics]
                self._devices_seen = True
        self.stream.add(report, checkpoint=os.path.basename(checkpoint.path) if checkpoint is not None else None)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        try:
            nodes = (self.stream.attempts.current or {}).get("nodes") or []
            rank, kind, lost = classify_failure(worker_exceptions, nodes, self._actors)
            error = worker_exceptions.get(rank)
            self.stream.failed(last_line(str(error)) or type(error).__name__ if error is not None else
                               UNREPORTED_FAILURE[kind], rank, kind)
            if self.survivors is not None and lost:  # continue on the nodes that answer
                self.survivors.node_lost(lost)
        except Exception as e:
            logger.warning("could not record the failure of the workers (%s: %s)", type(e).__name__,
                           last_line(str(e)), exc_info=True)
        finally:
            self._actors = []  # the attempt is over; the next one reports its own


UNREPORTED_FAILURE = {"node lost": "its node does not answer", "worker lost": "its process died"}
"""What a failed rank whose error Ray had not collected yet is said to have failed of."""


def recover_metrics(run_uri: str, storage: Storage, resume: ResumeChoice,
                    state: dict[str, Any] | None) -> dict[str, Any]:
    """Complete ``metrics.jsonl`` up to the resume checkpoint's step from the records the
    checkpoint carries (a driver lost after the checkpoint, before it wrote them, left them
    there), and say so; returns the steps ``restored`` and ``lost`` (in neither)."""
    if state is None:
        return {"restored": [], "lost_steps": []}
    records, restored, lost = recover_records(read_metrics(run_uri, storage), state, resume.name)
    if restored:
        storage.write_text(join(run_uri, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in records))
        logger.warning("raygpt train: restored step(s) %s to %s from %s", describe_steps(restored),
                       join(run_uri, METRICS_FILE), resume.name)
    if lost:
        logger.warning("raygpt train: the metrics of step(s) %s are lost: neither %s nor %s holds them "
                       "(run.json lists them under lost_steps)", describe_steps(lost), METRICS_FILE, resume.name)
    return {"restored": restored, "lost_steps": lost}


def complete_record(spec: RunSpec, plan: TrainPlan, record: RunRecord, resume: ResumeChoice, step: int,
                    recovery: dict[str, Any]) -> dict[str, Any]:
    """The run already reached its last step. When an earlier session did not finish the run
    record (its driver was lost during the final upload, so run.json still says ``running``),
    finish it now from the checkpoint and ``metrics.jsonl``."""
    previous = record.previous()
    done = (previous is not None and previous.get("status") in ("finished", "stopped")
            and (previous.get("final") or {}).get("step") == step and not recovery["restored"])
    if done:
        print(f"raygpt train: {spec.name} is already at step {step} of {plan.stop_step}; nothing to do")
        return previous
    records = read_metrics(join(spec.storage_path, spec.name), record.storage)
    final = summarize(records)
    final["step"] = step
    status = "finished" if step == plan.max_steps else "stopped"
    lost = record.record.get("lost_steps") or []
    completed = record.complete(status, final=final, checkpoint=resume.uri, attempts=record.record.get("attempts", []),
                                **({"lost_steps": lost} if lost else {}))
    print(f"raygpt train: {spec.name} is already at step {step} of {plan.stop_step}, but its run record was left "
          f"{(previous or {}).get('status', 'missing')!r}: completed it as {status!r} from {resume.name}"
          + (f" (metrics of step(s) {describe_steps(lost)} are lost)" if lost else ""))
    return completed


def compile_cache_env() -> dict[str, str]:
    """The driver's ``TORCHINDUCTOR_CACHE_DIR``, when set, for the workers; otherwise each
    worker keeps its compiled kernels in ``~/.cache/raygpt/inductor`` on its node
    (``raygpt.train.step.persistent_compile_cache``)."""
    return {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR",) if k in os.environ}


def train(spec: RunSpec, address: str | None = None, num_cpus: int | None = None, console=None,
          callbacks: list[UserCallback] | None = None) -> dict[str, Any]:
    """Check, launch and follow a training run; returns its summary (the final run record).
    ``callbacks``: more Ray Train callbacks beside the metrics stream's (a sweep's trial hands
    Ray Tune its reports this way)."""
    storage = Storage.from_config(spec.storage)
    run_uri = join(spec.storage_path, spec.name)
    storage.check_access(spec.storage_path, write=True)
    # One driver per run: a second one refuses here, before it reads or writes anything of the run's.
    lease = RunLease(spec.name, run_uri, storage, spec.train.lease_timeout_s,
                     on_lost=_interrupt_this_driver()).acquire(take_over=spec.train.take_over)
    try:
        return _train(spec, address, num_cpus, console, storage, run_uri, lease, callbacks or [])
    finally:
        lease.release()


def _interrupt_this_driver():
    """What to do when another driver takes the lease over: say so and, when ``train`` runs in
    the main thread (``raygpt train``), interrupt it, which stops the workers."""
    in_main = threading.current_thread() is threading.main_thread()

    def interrupt(why: str) -> None:
        logger.warning("raygpt train: %s", why)
        if in_main:
            _thread.interrupt_main()

    return interrupt


def _train(spec: RunSpec, address: str | None, num_cpus: int | None, console, storage: Storage, run_uri: str,
           lease: RunLease, callbacks: list[UserCallback]) -> dict[str, Any]:
    checked = preflight(spec, address, num_cpus, storage, run_uri)
    record, recovery = open_run_record(spec, checked, storage, run_uri)
    record.record["lease"] = lease.record()
    if checked.start_step >= checked.plan.stop_step:
        return complete_record(spec, checked.plan, record, checked.resume, checked.start_step, recovery)
    return Session(spec, checked, record, storage, run_uri, console, callbacks).run(lease)


@dataclass(frozen=True)
class Preflight:
    """What the checks before the first worker found: the dataset, where the run resumes, and
    the plan for the cluster it runs on."""

    manifest: dict[str, Any]
    resume: ResumeChoice
    resume_state: dict[str, Any] | None
    """The resume checkpoint's trainer state; None for a new run."""
    retention: Retention
    """What ``checkpoint.keep`` keeps in this session (the resume checkpoint among them)."""
    plan: TrainPlan
    ray_init_at: float
    ray_ready_at: float
    """When joining the cluster began and ended (``run.json``'s ``startup``)."""

    @property
    def start_step(self) -> int:
        return self.resume_state["step"] if self.resume_state else 0


def preflight(spec: RunSpec, address: str | None, num_cpus: int | None, storage: Storage, run_uri: str) -> Preflight:
    """Check the dataset, the checkpoint to resume from and the batch arithmetic before Ray
    starts, then join the cluster and check that it can hold the workers."""
    manifest = check_dataset(spec.train.dataset, storage)
    resume, resume_state = check_resume(run_uri, spec, storage, manifest_hash(manifest))
    retention = prepare_resume(run_uri, spec, storage, resume)
    # The plan's arithmetic does not depend on the cluster: checked before Ray starts, and only
    # whether it uses GPUs is filled in after.
    plan = plan_run(spec, manifest["splits"]["train"]["tokens"], use_gpu=False)
    check_splits(manifest, plan, spec)

    started_locally = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    ray_init_at = time.time()
    connect(address, num_cpus)
    ray_ready_at = time.time()
    use_gpu = spec.train.use_gpu if spec.train.use_gpu is not None else cluster_has_gpus()
    plan = replace(plan, use_gpu=use_gpu)
    check_cluster(plan, spec, started_locally)
    return Preflight(manifest, resume, resume_state, retention, plan, ray_init_at, ray_ready_at)


def open_run_record(spec: RunSpec, checked: Preflight, storage: Storage,
                    run_uri: str) -> tuple[RunRecord, dict[str, Any]]:
    """This session's run record (not written yet), and the metrics it restored or lost
    (``recover_metrics``); an attempt the previous session's driver left open is closed."""
    plan = checked.plan
    config = config_from_spec(spec.model)
    with torch.device("meta"):  # shapes only: no memory, no init time
        params = GPT(config)
    model_info = {"config": asdict(config), "params": params.num_params(),
                  "flops_per_token": params.flops_per_token(plan.seq_len)}
    hardware = {"workers": plan.num_workers, "use_gpu": plan.use_gpu, "cpus_per_worker": spec.train.cpus_per_worker,
                "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}}
    record = RunRecord(spec, storage, manifest_sha256=manifest_hash(checked.manifest), plan=asdict(plan),
                       model=model_info, hardware=hardware)
    resume = checked.resume
    if resume.uri is not None or resume.skipped:
        record.record["resumed_from"] = {"checkpoint": resume.name, "checked": resume.checked if resume.uri else None,
                                         "skipped": [{"checkpoint": n, "problem": p} for n, p in resume.skipped]}
    recovery = recover_metrics(run_uri, storage, resume, checked.resume_state)
    if recovery["lost_steps"]:
        record.record["lost_steps"] = sorted({*record.earlier.get("lost_steps", []), *recovery["lost_steps"]})
    if record.earlier.get("attempts"):
        record.record["attempts"] = close_orphaned(record.earlier["attempts"], read_metrics(run_uri, storage))
    return record, recovery


def build_trainer(spec: RunSpec, plan: TrainPlan, stream: MetricsStream, storage: Storage,
                  retention: Retention, callbacks: list[UserCallback]) -> TorchTrainer:
    """Ray Train's ``TorchTrainer`` for the plan: its workers run ``train_loop_per_worker``,
    its checkpoints go to the run folder (raygpt keeps ``checkpoint.keep`` of them), and its
    reports into ``stream`` and ``callbacks``."""
    ray_storage_path, ray_filesystem = storage.ray_storage(spec.storage_path)
    resources = {"CPU": spec.train.cpus_per_worker, **({"GPU": 1} if plan.use_gpu else {})}
    survivors = SurvivorSizing(resources, plan.min_workers) if plan.elastic else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "plan": plan, "env": {**forwarded_env(), **compile_cache_env()}},
        scaling_config=ScalingConfig(
            num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers,
            use_gpu=plan.use_gpu, resources_per_worker=resources,
            **({"elastic_resize_monitor_interval_s": spec.train.elastic_resize_s} if plan.elastic else {})),
        run_config=RunConfig(
            name=spec.name, storage_path=ray_storage_path, storage_filesystem=ray_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=None),  # raygpt keeps them: CheckpointRetention
            failure_config=FailureConfig(
                max_failures=spec.train.max_failures, max_preemption_failures=spec.train.max_preemption_failures,
                relax_collectives_on_preemption=spec.train.relax_collectives_on_preemption,
                preemption_grace_s=spec.train.preemption_grace_s),
            callbacks=[MetricsCallback(stream, survivors), CheckpointRetention(retention),
                       *([survivors] if survivors else []), *callbacks],
            # Ray Train's per-report INFO lines would drown the progress view.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


class Session:
    """One driver's session of a run: its trackers, the metrics stream, the ``TorchTrainer``
    and the progress view; writes the run record as the session goes (each attempt and
    checkpoint: a driver killed mid-run leaves its attempts and cost) and when it ends."""

    def __init__(self, spec: RunSpec, checked: Preflight, record: RunRecord, storage: Storage, run_uri: str,
                 console=None, callbacks: list[UserCallback] = ()):
        self.spec, self.plan, self.record, self.storage, self.run_uri = spec, checked.plan, record, storage, run_uri
        self.start_step, self.checked = checked.start_step, checked
        config_record = recorded_spec(spec)
        self.trackers = prepare_trackers(spec.log, spec.name, join(run_uri, "tensorboard"), config_record,
                                         record.earlier.get("trackers"))
        if self.trackers:
            record.record["trackers"] = self.trackers
        record.write()
        attempts = record.record.get("attempts", [])
        # The queue to the progress view lives on the driver's node: a lost worker node must not take it along.
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
            ray.get_runtime_context().get_node_id(), soft=False)})
        sinks = [MetricsFile(run_uri, storage), QueueSink(self.queue),
                 *tracker_sinks(self.trackers, storage, config_record, final_step=self.plan.stop_step)]
        stream = MetricsStream(read_metrics(run_uri, storage), sinks, attempts=attempts)
        self.trainer = build_trainer(spec, self.plan, stream, storage, checked.retention, list(callbacks))
        self.view = ProgressView(self.plan, self.start_step, self.queue, console, attempts=attempts,
                                 skipped_checkpoints=[name for name, _ in checked.resume.skipped],
                                 on_record=self._note)
        self.begun = time.time()

    def run(self, lease: RunLease) -> dict[str, Any]:
        """Train to the session's last step; returns the final run record."""
        poll_reports_often()
        try:
            with self.view, shrink_without_waiting(self.plan.elastic):
                result = self.trainer.fit()
        except TrainingFailedError as e:
            message = failure_message(e)
            outage = store_outage(e)
            if outage is not None:
                logger.warning("%s; run.json is marked failed and the lease released once the store answers "
                               "(storage.retry_minutes: %g)", message, self.spec.storage.retry_minutes)
            try:
                self.end("failed", error=message)
            except StoreUnreachableError as unwritten:
                message += (f"; {join(self.run_uri, RUN_RECORD_FILE)} still says 'running': the store did not "
                            f"answer when it was marked failed ({unwritten})")
            raise RaygptError(message) from None
        except (KeyboardInterrupt, SystemExit):
            if lease.lost:  # another driver owns the run now: its run.json is not this one's to write
                raise RaygptError(lease.lost) from None
            # On Ctrl-C, Ray Train aborts the workers and exits the driver with status 0; the run is
            # resumable from its last checkpoint, and the caller should hear "interrupted".
            self.end("interrupted")
            raise KeyboardInterrupt from None
        finally:
            ray.kill(self.queue.actor)
        if self.view.fatal_error is not None:  # a setup error, or training that diverged (its skipped steps in final)
            self.end("failed", error=self.view.fatal_error,
                     final=summarize(read_metrics(self.run_uri, self.storage)) or None)
            raise RaygptError(self.view.fatal_error)
        return self.finish(result)

    def cost(self) -> dict[str, Any]:
        """This session's cost so far added to the run's (the workers are held the whole session)."""
        device = next((r.get("device") for r in self.view.records if r.get("device")), None)
        return run_cost(workers=self.plan.num_workers, use_gpu=self.plan.use_gpu, session_s=time.time() - self.begun,
                        device=device, gpu_hour_usd=self.spec.train.gpu_hour_usd,
                        previous=self.record.earlier.get("cost"))

    def _note(self, report: dict[str, Any]) -> None:
        """Keep ``run.json`` current as the session goes: at each attempt's start and end and at
        each checkpoint, its attempts, restarts and cost so far."""
        if report.get("event") == "attempts" or "checkpoint_stall_s" in report:
            self.record.record.update(attempts=self.view.attempts, restarts=len(self.view.failures), cost=self.cost())
            self.record.write()

    def end(self, status: str, **fields: Any) -> None:
        """Close the session's attempt and write the final run record."""
        attempts = AttemptLog(self.view.attempts)
        attempts.finish(status)
        # The stream's sinks live in Ray Train's controller; a session that ended badly is
        # told to the tracker runs from here, so they do not stay "running".
        end_tracker_runs(self.trackers, status)
        self.record.finish(status, restarts=len(self.view.failures), attempts=attempts.attempts, cost=self.cost(),
                           startup=startup_times(self.checked.ray_init_at, self.checked.ray_ready_at, self.begun,
                                                 self.view.records), **fields)

    def finish(self, result) -> dict[str, Any]:
        """The session reached its last step: the final metrics into the run record."""
        records = read_metrics(self.run_uri, self.storage)
        final = summarize(records)
        final["session_s"] = time.time() - self.begun
        devices = next((r["devices"] for r in records if "devices" in r), None)
        if devices:
            self.record.record["hardware"]["devices"] = devices
        status = "finished" if final.get("step") == self.plan.max_steps else "stopped"
        self.end(status, final=final, checkpoint=result.checkpoint.path if result.checkpoint else None)
        if len(self.record.record["attempts"]) > 1:
            print(f"raygpt train: {describe_attempts(self.record.record['attempts'])}")
        return self.record.record
