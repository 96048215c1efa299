"""The driver of ``raygpt train``: check everything before a worker starts, then launch.

Checks: storage access, the dataset's manifest and shards, the batch arithmetic, the model a
resumed run must match, the cluster's size. Then the run record, and a ``TorchTrainer``:
DDP over NCCL on GPUs or Gloo on CPUs, checkpoints to ``storage_path/name`` (a run started
again under the same name resumes from its newest one), ``FailureConfig(max_failures)``
restarts after a lost worker or node, and every report goes through the run's metrics stream.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
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

from raygpt.cluster import cluster_has_gpus, connect, failure_message, forwarded_env, poll_reports_often
from raygpt.config import RunSpec, recorded_spec
from raygpt.cost import run_cost
from raygpt.data.batches import count_eval_windows
from raygpt.data.manifest import load_manifest, manifest_hash
from raygpt.errors import RaygptError, last_line
from raygpt.model import GPT, config_from_spec
from raygpt.storage import Storage, join
from raygpt.train.loop import train_loop_per_worker
from raygpt.train.metrics import MetricsStream, read_metrics, summarize
from raygpt.train.plan import TrainPlan, plan_run
from raygpt.train.progress import ProgressView
from raygpt.train.runrecord import RunRecord
from raygpt.train.sinks import MetricsFile, QueueSink, prepare_trackers, tracker_sinks
from raygpt.weights.checkpoint import (
    MODEL_CONFIG_FILE,
    TRAINER_STATE_FILE,
    check_state_shapes,
    latest_checkpoint,
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


def check_resume(run_uri: str, spec: RunSpec, storage: Storage) -> dict[str, Any] | None:
    """The trainer state of the checkpoint this run resumes from (None for a new run), after
    checking that it holds the model the spec describes."""
    latest = latest_checkpoint(run_uri, storage)
    if latest is None:
        return None
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
    return storage.read_json(join(latest, TRAINER_STATE_FILE))


def check_validation_split(manifest: dict[str, Any], plan: TrainPlan, spec: RunSpec) -> None:
    if spec.train.val_interval > 0 and count_eval_windows(manifest, "val", plan.seq_len, spec.train.val_tokens) == 0:
        raise RaygptError(f"train.val_interval: the val split of {spec.train.dataset} has "
                          f"{manifest['splits']['val']['tokens']:,} tokens, fewer than one sequence of "
                          f"{plan.seq_len + 1}; prepare more val tokens or set train.val_interval: 0")


def check_cluster(plan: TrainPlan, spec: RunSpec, started_locally: bool) -> None:
    need = {"CPU": plan.num_workers * spec.train.cpus_per_worker, "GPU": plan.num_workers if plan.use_gpu else 0}
    have = ray.cluster_resources()
    short = [f"{need[k]:g} {k}s (the cluster has {have.get(k, 0):g})" for k in need if need[k] > have.get(k, 0)]
    if short and started_locally:
        raise RaygptError(f"train.num_workers: {plan.num_workers} workers need {' and '.join(short)}; lower "
                          "train.num_workers / train.cpus_per_worker or pass --num-cpus")
    if short:
        print(f"raygpt train: waiting for the cluster to grow: {plan.num_workers} workers need {' and '.join(short)}",
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
        if not self._devices_seen and "device" in report:
            report["devices"] = [m.get("device") for m in metrics]
            self._devices_seen = True
        self.stream.add(report, checkpoint=os.path.basename(checkpoint.path) if checkpoint is not None else None)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.stream.flush()
        rank, error = next(iter(sorted(worker_exceptions.items())))
        self.stream.event({"event": "worker_failure", "rank": rank, "error": last_line(str(error))})


def train(spec: RunSpec, address: str | None = None, num_cpus: int | None = None, console=None) -> dict[str, Any]:
    """Check, launch and follow a training run; returns its summary (the final run record)."""
    storage = Storage.from_config(spec.storage)
    run_uri = join(spec.storage_path, spec.name)
    storage.check_access(spec.storage_path, write=True)
    manifest = check_dataset(spec.train.dataset, storage)
    config = config_from_spec(spec.model)
    resume_state = check_resume(run_uri, spec, storage)

    started_locally = not (address or os.environ.get("RAY_ADDRESS")) and not ray.is_initialized()
    connect(address, num_cpus)
    use_gpu = spec.train.use_gpu if spec.train.use_gpu is not None else cluster_has_gpus()
    plan = plan_run(spec, manifest["splits"]["train"]["tokens"], use_gpu)
    check_validation_split(manifest, plan, spec)
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
    if start_step >= plan.stop_step:
        print(f"raygpt train: {spec.name} is already at step {start_step} of {plan.stop_step}; nothing to do")
        return record.previous() or record.record
    config_record = recorded_spec(spec)
    trackers = prepare_trackers(spec.log, spec.name, join(run_uri, "tensorboard"), config_record,
                                record.earlier.get("trackers"))
    if trackers:
        record.record["trackers"] = trackers
    record.write()

    queue = Queue(actor_options={"num_cpus": 0})
    sinks = [MetricsFile(run_uri, storage), QueueSink(queue),
             *tracker_sinks(trackers, storage, config_record, final_step=plan.stop_step)]
    stream = MetricsStream(read_metrics(run_uri, storage), sinks)
    ray_storage_path, ray_filesystem = storage.ray_storage(spec.storage_path)
    resources = {"CPU": spec.train.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "plan": plan, "env": forwarded_env()},
        scaling_config=ScalingConfig(num_workers=plan.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.name, storage_path=ray_storage_path, storage_filesystem=ray_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=spec.train.max_failures),
            callbacks=[MetricsCallback(stream)],
            # Ray Train's per-report INFO lines would drown the progress view.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    poll_reports_often()
    begun = time.time()
    view = ProgressView(plan, start_step, queue, console)

    def cost() -> dict[str, Any]:
        """This session's cost added to the run's (the workers are held the whole session)."""
        device = next((r.get("device") for r in view.records if r.get("device")), None)
        return run_cost(workers=plan.num_workers, use_gpu=use_gpu, session_s=time.time() - begun, device=device,
                        gpu_hour_usd=spec.train.gpu_hour_usd, previous=record.earlier.get("cost"))

    try:
        with view:
            result = trainer.fit()
    except TrainingFailedError as e:
        message = failure_message(e)
        record.finish("failed", error=message, restarts=len(view.failures), cost=cost())
        raise RaygptError(message) from None
    except (KeyboardInterrupt, SystemExit):
        # On Ctrl-C, Ray Train aborts the workers and exits the driver with status 0; the run is
        # resumable from its last checkpoint, and the caller should hear "interrupted".
        record.finish("interrupted", restarts=len(view.failures), cost=cost())
        raise KeyboardInterrupt from None
    finally:
        ray.kill(queue.actor)
    if view.fatal_error is not None:
        record.finish("failed", error=view.fatal_error, cost=cost())
        raise RaygptError(view.fatal_error)

    records = read_metrics(run_uri, storage)
    final = summarize(records)
    final["session_s"] = time.time() - begun
    devices = next((r["devices"] for r in records if "devices" in r), None)
    if devices:
        record.record["hardware"]["devices"] = devices
    status = "finished" if final.get("step") == plan.max_steps else "stopped"
    record.finish(status, final=final, restarts=len(view.failures),
                  checkpoint=result.checkpoint.path if result.checkpoint else None, cost=cost())
    return record.record
