"""The driver of ``raygpt train``: check everything before a worker starts, then launch.

Checks: storage access, the run's lease (``raygpt.train.lease``: a second driver of a run
being trained refuses), the dataset's manifest and shards, the batch arithmetic, the model a
resumed run must match, the cluster's size. Then the run record, and a ``TorchTrainer``:
DDP over NCCL on GPUs or Gloo on CPUs, checkpoints to ``storage_path/name`` (a run started
again under the same name resumes from its newest one), ``FailureConfig(max_failures)``
restarts after a lost worker or node, and every report goes through the run's metrics stream.
"""

from __future__ import annotations

import _thread
import json
import os
import sys
import threading
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np
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

from raygpt.cluster import cluster_has_gpus, connect, failure_message, forwarded_env, poll_reports_often
from raygpt.config import RunSpec, recorded_spec
from raygpt.cost import run_cost
from raygpt.data.batches import count_eval_windows
from raygpt.data.manifest import load_manifest, manifest_hash
from raygpt.errors import RaygptError
from raygpt.model import GPT, config_from_spec
from raygpt.stages import METRICS_FILE, RUN_RECORD_FILE
from raygpt.storage import Storage, join
from raygpt.train.attempts import AttemptLog, describe_attempts, failure_kind
from raygpt.train.lease import RunLease
from raygpt.train.loop import train_loop_per_worker
from raygpt.train.metrics import MetricsStream, describe_steps, read_metrics, recover_records, summarize
from raygpt.train.plan import TrainPlan, plan_run
from raygpt.train.progress import ProgressView
from raygpt.train.runrecord import RunRecord
from raygpt.train.sinks import MetricsFile, QueueSink, end_tracker_runs, prepare_trackers, tracker_sinks
from raygpt.weights.checkpoint import (
    MODEL_CONFIG_FILE,
    TRAINER_STATE_FILE,
    ResumeChoice,
    check_state_shapes,
    choose_resume_checkpoint,
    model_config_from_dict,
)


def check_dataset(dataset: str, storage: Storage) -> dict[str, Any]:
    """The dataset's manifest, after checking that every shard is there with its recorded size
    (hashes are checked by the workers, which download the shards anyway)."""
    manifest = load_manifest(dataset, storage)
    bytes_per_token = np.dtype(manifest.get("dtype", "uint16")).itemsize
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            uri = join(dataset, shard["name"])
            size = storage.stored_size(uri)
            if size is None:
                raise RaygptError(f"{uri}: shard missing (listed in {join(dataset, 'manifest.json')}); "
                                  "prepare the dataset again")
            if size != shard["tokens"] * bytes_per_token:
                raise RaygptError(f"{uri}: {size} bytes, but the manifest lists {shard['tokens']} tokens "
                                  f"({shard['tokens'] * bytes_per_token} bytes): corrupt shard; prepare the dataset "
                                  "again")
    return manifest


# Settings that decide which sequences step k reads: a resume must keep them.
DATA_DEFINING = ("global_batch_tokens", "seq_len", "seed")


def check_resume(run_uri: str, spec: RunSpec, storage: Storage,
                 manifest_sha256: str | None = None) -> tuple[ResumeChoice, dict[str, Any] | None]:
    """The checkpoint this run resumes from, the newest complete and intact one (every file
    hashed: the workers choose by the same rule), and its trainer state (None for a new run),
    after checking that it holds the model the spec describes and reads the same data at
    every step (the same global batch, sequence length, seed and dataset; the worker count
    may change). Says which newer checkpoints it skipped, and why."""
    choice = choose_resume_checkpoint(run_uri, storage)
    for name, problem in choice.skipped:
        print(f"raygpt train: skipped checkpoint {join(run_uri, name)}: {problem}", file=sys.stderr)
    latest = choice.uri
    if latest is None:
        return choice, None
    if choice.skipped:
        print(f"raygpt train: resuming from {latest}, the newest intact checkpoint", file=sys.stderr)
    saved_config = model_config_from_dict(storage.read_json(join(latest, MODEL_CONFIG_FILE)),
                                          join(latest, MODEL_CONFIG_FILE))
    config = config_from_spec(spec.model)
    expected = f"model.preset {spec.model.preset!r}"
    with torch.device("meta"):
        saved_shapes = {k: v.shape for k, v in GPT(saved_config).state_dict().items()}
        own_shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    check_state_shapes(own_shapes, saved_shapes, where=latest, expected=expected)
    if saved_config.tie_weights != config.tie_weights:
        raise RaygptError(f"checkpoint {latest} was trained with model.tie_weights={saved_config.tie_weights}; "
                          f"the spec says {config.tie_weights}: resume with the same setting or start a new run name")
    state = storage.read_json(join(latest, TRAINER_STATE_FILE))
    check_same_data(state, latest, spec, saved_config.context_length, config.context_length, manifest_sha256,
                    run_uri, storage)
    return choice, state


def check_same_data(state: dict[str, Any], checkpoint: str, spec: RunSpec, saved_context: int, context: int,
                    manifest_sha256: str | None, run_uri: str, storage: Storage) -> None:
    """A RaygptError naming the first data-defining setting that differs from the checkpoint's."""
    saved = (state.get("spec") or {}).get("train") or {}
    now = {"global_batch_tokens": spec.train.global_batch_tokens, "seq_len": spec.train.seq_len or context,
           "seed": spec.train.seed}
    before = {"global_batch_tokens": saved.get("global_batch_tokens"), "seq_len": saved.get("seq_len") or saved_context,
              "seed": saved.get("seed")}
    for key in DATA_DEFINING:
        if before[key] is not None and before[key] != now[key]:
            raise RaygptError(f"train.{key}: {now[key]!r}, but the run {spec.name} was trained with {before[key]!r} "
                              f"(checkpoint {checkpoint}): resuming would read other sequences at every step; keep "
                              f"{before[key]!r} or start a new run name")
    saved_manifest = (state.get("data") or {}).get("manifest_sha256")
    if saved_manifest is None and storage.exists(join(run_uri, RUN_RECORD_FILE)):  # checkpoints of raygpt 0.1.0
        saved_manifest = (storage.read_json(join(run_uri, RUN_RECORD_FILE)).get("dataset") or {}).get("manifest_sha256")
    if manifest_sha256 and saved_manifest and saved_manifest != manifest_sha256:
        raise RaygptError(f"train.dataset: {spec.train.dataset} has manifest {manifest_sha256[:12]}, but the run "
                          f"{spec.name} was trained on {saved_manifest[:12]}: resuming would read other sequences; "
                          "use the dataset it was trained on or start a new run name")


def check_validation_split(manifest: dict[str, Any], plan: TrainPlan, spec: RunSpec) -> None:
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
        print(f"raygpt train: waiting for the cluster to grow: {workers} workers need {' and '.join(short)}",
              file=sys.stderr)


class MetricsCallback(UserCallback):
    """Feeds Ray Train's reports into the run's ``MetricsStream``. A Ray Train callback runs in
    the Train controller, which outlives worker restarts, so the stream sees every attempt."""

    def __init__(self, stream: MetricsStream):
        self.stream = stream
        self._devices_seen = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        report = dict(metrics[0])
        if "step" not in report:  # a setup error every worker agreed on: the driver reports it
            self.stream.event(report)
            return
        if "node" in report:  # an attempt's first report: where its workers run, by rank
            report["nodes"] = [m.get("node") for m in metrics]
            if not self._devices_seen:
                report["devices"] = [m.get("device") for m in metrics]
                self._devices_seen = True
        self.stream.add(report, checkpoint=os.path.basename(checkpoint.path) if checkpoint is not None else None)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        # A node that goes takes its workers along, and their peers' collectives fail too: the
        # most telling of the errors says why the attempt ended.
        order = ("node lost", "worker lost", "worker error")
        rank, error = min(sorted(worker_exceptions.items()), key=lambda item: order.index(failure_kind(item[1])))
        self.stream.failed(error, rank)


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
        print(f"raygpt train: restored step(s) {describe_steps(restored)} to {join(run_uri, METRICS_FILE)} from "
              f"{resume.name}", file=sys.stderr)
    if lost:
        print(f"raygpt train: the metrics of step(s) {describe_steps(lost)} are lost: neither {METRICS_FILE} nor "
              f"{resume.name} holds them (run.json lists them under lost_steps)", file=sys.stderr)
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
    completed = record.complete(status, final=final, checkpoint=resume.uri, **({"lost_steps": lost} if lost else {}))
    print(f"raygpt train: {spec.name} is already at step {step} of {plan.stop_step}, but its run record was left "
          f"{(previous or {}).get('status', 'missing')!r}: completed it as {status!r} from {resume.name}"
          + (f" (metrics of step(s) {describe_steps(lost)} are lost)" if lost else ""))
    return completed


def compile_cache_env() -> dict[str, str]:
    """The driver's ``TORCHINDUCTOR_CACHE_DIR``, when set, for the workers; otherwise each
    worker keeps its compiled kernels in ``~/.cache/raygpt/inductor`` on its node
    (``raygpt.train.step.persistent_compile_cache``)."""
    return {k: os.environ[k] for k in ("TORCHINDUCTOR_CACHE_DIR",) if k in os.environ}


def train(spec: RunSpec, address: str | None = None, num_cpus: int | None = None, console=None) -> dict[str, Any]:
    """Check, launch and follow a training run; returns its summary (the final run record)."""
    storage = Storage.from_config(spec.storage)
    run_uri = join(spec.storage_path, spec.name)
    storage.check_access(spec.storage_path, write=True)
    # One driver per run: a second one refuses here, before it reads or writes anything of the run's.
    lease = RunLease(spec.name, run_uri, storage, spec.train.lease_timeout_s,
                     on_lost=_interrupt_this_driver()).acquire(take_over=spec.train.take_over)
    try:
        return _train(spec, address, num_cpus, console, storage, run_uri, lease)
    finally:
        lease.release()


def _interrupt_this_driver():
    """What to do when another driver takes the lease over: say so and, when ``train`` runs in
    the main thread (``raygpt train``), interrupt it, which stops the workers."""
    in_main = threading.current_thread() is threading.main_thread()

    def interrupt(why: str) -> None:
        print(f"raygpt train: {why}", file=sys.stderr, flush=True)
        if in_main:
            _thread.interrupt_main()

    return interrupt


def _train(spec: RunSpec, address: str | None, num_cpus: int | None, console, storage: Storage, run_uri: str,
           lease: RunLease) -> dict[str, Any]:
    manifest = check_dataset(spec.train.dataset, storage)
    config = config_from_spec(spec.model)
    resume, resume_state = check_resume(run_uri, spec, storage, manifest_hash(manifest))

    # The plan's arithmetic (and the schedule and strategy names) do not depend on the cluster:
    # checked before Ray starts, and only whether it uses GPUs is filled in after.
    plan = plan_run(spec, manifest["splits"]["train"]["tokens"], use_gpu=False)
    check_validation_split(manifest, plan, spec)

    started_locally = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    connect(address, num_cpus)
    use_gpu = spec.train.use_gpu if spec.train.use_gpu is not None else cluster_has_gpus()
    plan = replace(plan, use_gpu=use_gpu)
    check_cluster(plan, spec, started_locally)
    start_step = resume_state["step"] if resume_state else 0

    with torch.device("meta"):  # shapes only: no memory, no init time
        params = GPT(config)
    model_info = {"config": asdict(config), "params": params.num_params(),
                  "flops_per_token": params.flops_per_token(plan.seq_len)}
    hardware = {"workers": plan.num_workers, "use_gpu": use_gpu, "cpus_per_worker": spec.train.cpus_per_worker,
                "cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}}
    record = RunRecord(spec, storage, manifest_sha256=manifest_hash(manifest), plan=asdict(plan), model=model_info,
                       hardware=hardware)
    if resume.uri is not None or resume.skipped:
        record.record["resumed_from"] = {"checkpoint": resume.name, "checked": resume.checked if resume.uri else None,
                                         "skipped": [{"checkpoint": n, "problem": p} for n, p in resume.skipped]}
    recovery = recover_metrics(run_uri, storage, resume, resume_state)
    if recovery["lost_steps"]:
        record.record["lost_steps"] = sorted({*record.earlier.get("lost_steps", []), *recovery["lost_steps"]})
    if start_step >= plan.stop_step:
        return complete_record(spec, plan, record, resume, start_step, recovery)
    config_record = recorded_spec(spec)
    trackers = prepare_trackers(spec.log, spec.name, join(run_uri, "tensorboard"), config_record,
                                record.earlier.get("trackers"))
    if trackers:
        record.record["trackers"] = trackers
    record.write()

    # The queue to the progress view lives on the driver's node: a lost worker node must not take it along.
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)})
    previous_attempts = (record.previous() or {}).get("attempts", [])
    sinks = [MetricsFile(run_uri, storage), QueueSink(queue),
             *tracker_sinks(trackers, storage, config_record, final_step=plan.stop_step)]
    stream = MetricsStream(read_metrics(run_uri, storage), sinks, attempts=previous_attempts)
    ray_storage_path, ray_filesystem = storage.ray_storage(spec.storage_path)
    resources = {"CPU": spec.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "plan": plan, "env": {**forwarded_env(), **compile_cache_env()}},
        scaling_config=ScalingConfig(
            num_workers=(plan.min_workers, plan.num_workers) if plan.elastic else plan.num_workers, use_gpu=use_gpu,
            resources_per_worker=resources,
            **({"elastic_resize_monitor_interval_s": spec.train.elastic_resize_s} if plan.elastic else {})),
        run_config=RunConfig(
            name=spec.name, storage_path=ray_storage_path, storage_filesystem=ray_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(
                max_failures=spec.train.max_failures, max_preemption_failures=spec.train.max_preemption_failures,
                relax_collectives_on_preemption=spec.train.relax_collectives_on_preemption,
                preemption_grace_s=spec.train.preemption_grace_s),
            callbacks=[MetricsCallback(stream)],
            # Ray Train's per-report INFO lines would drown the progress view.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    poll_reports_often()
    begun = time.time()
    view = ProgressView(plan, start_step, queue, console, attempts=previous_attempts,
                        skipped_checkpoints=[name for name, _ in resume.skipped])

    def cost() -> dict[str, Any]:
        """This session's cost added to the run's (the workers are held the whole session)."""
        device = next((r.get("device") for r in view.records if r.get("device")), None)
        return run_cost(workers=plan.num_workers, use_gpu=use_gpu, session_s=time.time() - begun, device=device,
                        gpu_hour_usd=spec.train.gpu_hour_usd, previous=record.earlier.get("cost"))

    def finish(status: str, **fields: Any) -> None:
        attempts = AttemptLog(view.attempts)
        attempts.finish(status)
        # The stream's sinks live in Ray Train's controller; a session that ended badly is
        # told to the tracker runs from here, so they do not stay "running".
        end_tracker_runs(trackers, status)
        record.finish(status, restarts=len(view.failures), attempts=attempts.attempts, cost=cost(), **fields)

    try:
        with view:
            result = trainer.fit()
    except TrainingFailedError as e:
        message = failure_message(e)
        finish("failed", error=message)
        raise RaygptError(message) from None
    except (KeyboardInterrupt, SystemExit):
        if lease.lost:  # another driver owns the run now: its run.json is not this one's to write
            raise RaygptError(lease.lost) from None
        # On Ctrl-C, Ray Train aborts the workers and exits the driver with status 0; the run is
        # resumable from its last checkpoint, and the caller should hear "interrupted".
        finish("interrupted")
        raise KeyboardInterrupt from None
    finally:
        ray.kill(queue.actor)
    if view.fatal_error is not None:
        finish("failed", error=view.fatal_error)
        raise RaygptError(view.fatal_error)

    records = read_metrics(run_uri, storage)
    final = summarize(records)
    final["session_s"] = time.time() - begun
    # Beside the step-only median: what the session delivered, setup, compile warm-up,
    # validation, checkpoint stalls and restarts included.
    final["wall_clock_tokens_per_s"] = ((final.get("step") or start_step) - start_step) * plan.global_batch_tokens \
        / max(final["session_s"], 1e-9)
    if final.get("tokens") is not None:
        # Everything in: worker start, data download, compile warm-up, validation, checkpoint
        # stalls, restarts; ``tokens_per_s`` beside it is the training steps' alone.
        trained = final["tokens"] - (resume_state["tokens_seen"] if resume_state else 0)
        final["wall_tokens_per_s"] = trained / final["session_s"]
    devices = next((r["devices"] for r in records if "devices" in r), None)
    if devices:
        record.record["hardware"]["devices"] = devices
    status = "finished" if final.get("step") == plan.max_steps else "stopped"
    finish(status, final=final, checkpoint=result.checkpoint.path if result.checkpoint else None)
    if len(record.record["attempts"]) > 1:
        print(f"raygpt train: {describe_attempts(record.record['attempts'])}")
    return record.record
