"""Pretraining on Ray Train: the driver plans and launches a run; each worker runs the loop.

Driver (``train``): check everything that can be checked before a worker starts (storage
access, the dataset's manifest and shards, the batch arithmetic, the model a resumed run must
match), write the run record, then fit a ``TorchTrainer``: DDP over NCCL on GPUs or Gloo on
CPUs, checkpoints to ``storage_path/name`` (a run started again under the same name resumes
from its newest one), and ``FailureConfig(max_failures)`` restarts after a lost worker or node.

Worker (``train_loop_per_worker``): set up device, precision, model, optimizer, schedule, data
and, when Ray hands over a checkpoint, every component's state; then only the loop: step,
report, validate, checkpoint. Global batch ``s`` is a function of (seed, s) alone, so the step
is the data cursor, and a run killed and resumed computes the same per-step losses as an
uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import (
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer
from ray.util.queue import Empty, Queue
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from raygpt import __version__
from raygpt.checkpoint import (
    MODEL_CONFIG_FILE,
    TRAINER_STATE_FILE,
    check_state_shapes,
    checkpoint_dir_name,
    latest_checkpoint,
    load_training_checkpoint,
    model_config_from_dict,
    save_training_checkpoint,
    stored_size,
)
from raygpt.cluster import cluster_has_gpus, connect, forwarded_env
from raygpt.config import RunSpec, load_spec
from raygpt.data import TrainBatches, count_eval_windows, eval_batches, load_manifest, manifest_hash
from raygpt.errors import RaygptError
from raygpt.evaluate import token_loss_sums
from raygpt.model import GPT, config_from_spec
from raygpt.runrecord import MetricsLog, RunRecord, cpu_model, last_line, read_metrics, recorded_spec
from raygpt.schedule import WarmupCosine
from raygpt.storage import Storage, join

# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s), for MFU; matched against the device name
# in order, so the more specific names come first. fp32 (TF32) peaks are half of these.
GPU_PEAK_TFLOPS = (
    ("GB200", 2500), ("B200", 2250), ("H200", 989), ("H100 PCIe", 756), ("H100", 989), ("H800", 989),
    ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 125), ("A10", 125),
    ("RTX 6000 Ada", 364), ("A6000", 155), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125), ("T4", 65),
)


# ---------------------------------------------------------------------------------------------
# The plan: batch arithmetic fixed before any worker starts


@dataclass(frozen=True)
class TrainPlan:
    """The numbers a run trains with, derived from the spec, the dataset and the cluster."""

    seq_len: int
    global_batch_tokens: int
    global_batch_size: int
    """Sequences per optimizer step, across all workers."""
    micro_batch_size: int
    num_workers: int
    grad_accum_steps: int
    """Micro-batches per worker per step: global_batch_size / (num_workers * micro_batch_size)."""
    max_steps: int
    """Where the LR schedule ends."""
    stop_step: int
    """Where this session ends: ``train.stop_at_step`` or ``max_steps``."""
    use_gpu: bool
    train_tokens: int


def plan_run(spec: RunSpec, train_tokens: int, use_gpu: bool) -> TrainPlan:
    """Check the batch arithmetic and derive the plan; every problem is a RaygptError naming its key."""
    t = spec.train
    config = config_from_spec(spec.model)
    seq_len = t.seq_len or config.context_length
    if seq_len > config.context_length:
        raise RaygptError(f"train.seq_len: {seq_len} exceeds the context length {config.context_length} of "
                          f"model.preset {spec.model.preset!r}; lower it or set model.context_length")
    if t.global_batch_tokens % seq_len:
        raise RaygptError(f"train.global_batch_tokens: {t.global_batch_tokens} is not a multiple of the sequence "
                          f"length {seq_len}")
    global_batch_size = t.global_batch_tokens // seq_len
    per_pass = t.num_workers * t.micro_batch_size
    if global_batch_size % per_pass:
        step = per_pass * seq_len
        lower = max(step, t.global_batch_tokens // step * step)
        raise RaygptError(
            f"train.global_batch_tokens: {t.global_batch_tokens} tokens = {global_batch_size} sequences of {seq_len}, "
            f"which {t.num_workers} workers x micro_batch_size {t.micro_batch_size} = {per_pass} sequences per pass "
            f"cannot divide; use a multiple of {step} tokens (e.g. {lower} or {lower + step}), or change "
            "train.num_workers / train.micro_batch_size")
    max_steps = t.max_steps if t.max_steps is not None else train_tokens // t.global_batch_tokens
    if max_steps <= 0:
        raise RaygptError(f"train.max_steps: the dataset {t.dataset} has {train_tokens:,} training tokens, less than "
                          f"one global batch of {t.global_batch_tokens:,}; prepare more data or lower "
                          "train.global_batch_tokens")
    stop_step = min(t.stop_at_step, max_steps) if t.stop_at_step is not None else max_steps
    return TrainPlan(seq_len=seq_len, global_batch_tokens=t.global_batch_tokens, global_batch_size=global_batch_size,
                     micro_batch_size=t.micro_batch_size, num_workers=t.num_workers,
                     grad_accum_steps=global_batch_size // per_pass, max_steps=max_steps, stop_step=stop_step,
                     use_gpu=use_gpu, train_tokens=train_tokens)


# ---------------------------------------------------------------------------------------------
# Components: each saves and restores its own state; a checkpoint is the sum of them


class TrainerState:
    """The trainer's own resumable state. Tiny: data order and learning rate are functions of the
    step, so the step is also the data cursor and the schedule position."""

    def __init__(self, schedule: WarmupCosine, scaler: torch.amp.GradScaler, seed: int, spec: RunSpec,
                 world_size: int):
        self.step = 0
        self.tokens_seen = 0
        self.schedule, self.scaler, self.seed, self.spec, self.world_size = schedule, scaler, seed, spec, world_size

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens_seen += tokens

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "data": {"seed": self.seed, "next_batch": self.step},
                "schedule": {**self.schedule.state_dict(), "next_lr": self.schedule.lr_at(self.step)},
                "scaler": self.scaler.state_dict(), "world_size": self.world_size,
                "raygpt_version": __version__, "spec": recorded_spec(self.spec)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


class RngState:
    """This process's random generators (dropout masks): torch, its CUDA device's, numpy and Python's.

    Only the current CUDA device's generator: Ray Train shows every worker all of its node's
    GPUs, and a run resumed on nodes with fewer GPUs must still restore each rank's own stream.
    """

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(), "python": random.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the GradScaler that fp16 needs."""

    name: str
    dtype: torch.dtype | None
    device_type: str
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def choose_precision(setting: str, device: torch.device) -> Precision:
    """auto: bf16 on GPUs that support it, fp16 + GradScaler on older GPUs, fp32 on CPU."""
    if setting == "auto":
        if device.type == "cuda":
            setting = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            setting = "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise RaygptError("train.precision: fp16 needs a GPU; use fp32 or bf16 on CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]
    scaler = torch.amp.GradScaler(device.type, enabled=setting == "fp16")
    return Precision(setting, dtype, device.type, scaler)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device at this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12 / (2 if precision == "fp32" else 1)
    return None


# ---------------------------------------------------------------------------------------------
# Worker setup


@dataclass
class Worker:
    """Everything one training worker holds."""

    spec: RunSpec
    plan: TrainPlan
    rank: int
    world_size: int
    device: torch.device
    precision: Precision
    model: GPT
    """The bare model: what is saved, validated and loaded."""
    training_model: torch.nn.Module
    """The model the loop runs: compiled and/or wrapped in DDP."""
    optimizer: torch.optim.Optimizer
    schedule: WarmupCosine
    batches: TrainBatches
    state: TrainerState
    rng: RngState
    resumed_from_step: int
    flops_per_token: int
    peak_flops: float | None


def set_up_worker(spec: RunSpec, plan: TrainPlan, rank: int, world_size: int, device: torch.device) -> Worker:
    """Build every component, then restore them from Ray's checkpoint when there is one."""
    t = spec.train
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = choose_precision(t.precision, device)
    config = config_from_spec(spec.model)
    seed_everything(t.seed)  # identical initial weights on every rank
    model = GPT(config).to(device)
    optimizer = model.configure_optimizer(t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    schedule = WarmupCosine(t.lr, t.warmup_steps, plan.max_steps, t.min_lr_ratio)
    storage = Storage.from_config(spec.storage)
    batches = TrainBatches(t.dataset, storage, plan.seq_len, t.seed, plan.global_batch_size)
    state = TrainerState(schedule, precision.scaler, t.seed, spec, world_size)
    rng = RngState()
    seed_everything(t.seed + 1 + rank)  # each rank draws its own dropout masks

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as local:
            found_rng = load_training_checkpoint(
                local, rank, model=model, optimizer=optimizer, trainer=state, rng=rng,
                expected=f"model.preset {spec.model.preset!r}", where=os.path.basename(checkpoint.path))
        if not found_rng:  # resumed on more workers than saved: derive this rank's generators
            seed_everything(t.seed + 1 + rank + 1_000_003 * state.step)

    training_model: torch.nn.Module = model
    if t.compile:
        training_model = torch.compile(training_model)
    if world_size > 1:
        training_model = DistributedDataParallel(training_model,
                                                 device_ids=[device.index] if device.type == "cuda" else None)
    if state.step < plan.stop_step:
        # Fetch the first batch now: a missing or corrupt shard fails setup, not step 1000.
        batches.micro_batches(state.step, rank, world_size, plan.micro_batch_size)
    return Worker(spec=spec, plan=plan, rank=rank, world_size=world_size, device=device, precision=precision,
                  model=model, training_model=training_model, optimizer=optimizer, schedule=schedule,
                  batches=batches, state=state, rng=rng, resumed_from_step=state.step,
                  flops_per_token=model.flops_per_token(plan.seq_len),
                  peak_flops=peak_flops(device, precision.name))


def agreed_setup(build, world_size: int) -> tuple[Worker | None, str | None]:
    """Run ``build`` on every rank and agree on its outcome.

    A RaygptError on any rank (a corrupt shard, a checkpoint of another shape) must end the
    run with its message, not make Ray restart the workers ``max_failures`` times: every rank
    learns the first error and the loop reports it instead of training.
    """
    try:
        worker, error = build(), None
    except RaygptError as e:
        worker, error = None, str(e)
    if world_size > 1:
        errors: list[str | None] = [None] * world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    return (None, error) if error is not None else (worker, None)


# ---------------------------------------------------------------------------------------------
# What the loop does


def train_step(w: Worker, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on global batch ``step``; returns this worker's mean loss and the
    gradient norm before clipping (both unsynchronised tensors)."""
    lr = w.schedule.lr_at(step)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    micro_batches = w.batches.micro_batches(step, w.rank, w.world_size, w.plan.micro_batch_size)
    scaler = w.precision.scaler
    loss_sum = torch.zeros((), device=w.device)
    for i, (x, y) in enumerate(micro_batches):
        x, y = x.to(w.device, non_blocking=True), y.to(w.device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # Gradients are all-reduced once per step, on the last micro-batch.
        sync = contextlib.nullcontext() if last or w.world_size == 1 else w.training_model.no_sync()
        with sync:
            with w.precision.autocast():
                _, loss = w.training_model(x, y)
            # Mean over micro-batches; DDP averages over workers: the gradient is the global-batch mean.
            scaler.scale(loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    scaler.unscale_(w.optimizer)
    max_norm = w.spec.train.grad_clip if w.spec.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(w.model.parameters(), max_norm)
    scaler.step(w.optimizer)
    scaler.update()
    w.optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches), grad_norm.detach()


def validation_loss(w: Worker) -> float | None:
    """Mean token loss over the first ``train.val_tokens`` of the val split, shared across workers."""
    storage = Storage.from_config(w.spec.storage)
    batches = eval_batches(w.spec.train.dataset, storage, "val", w.plan.seq_len, w.plan.micro_batch_size,
                           max_tokens=w.spec.train.val_tokens, rank=w.rank, world_size=w.world_size)
    total, count = token_loss_sums(w.model, batches, w.device, w.precision.autocast)
    sums = torch.tensor([total, count], dtype=torch.float64, device=w.device)
    if w.world_size > 1:
        dist.all_reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] > 0 else None


class MetricsWindow:
    """Per-step losses since the last report. They stay on the device, and are averaged across
    workers in one collective per report, so a step never waits for a host sync."""

    def __init__(self, w: Worker):
        self.w = w
        self.losses: list[torch.Tensor] = []
        self.first_step = w.state.step + 1
        self.grad_norm: torch.Tensor | None = None
        self.lr = 0.0
        self.started = time.perf_counter()
        self.excluded_s = 0.0  # validation time, not training throughput

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.losses.append(loss)
        self.grad_norm, self.lr = grad_norm, lr

    def flush(self) -> dict[str, Any]:
        w = self.w
        losses = torch.stack(self.losses).double()
        if w.world_size > 1:
            dist.all_reduce(losses)
            losses /= w.world_size
        values = losses.tolist()
        seconds = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        tokens_per_s = len(values) * w.plan.global_batch_tokens / seconds
        achieved = w.flops_per_token * tokens_per_s / w.world_size
        record = {
            "step": w.state.step, "tokens": w.state.tokens_seen, "loss": sum(values) / len(values),
            "step_losses": {str(self.first_step + i): v for i, v in enumerate(values)},
            "lr": self.lr, "grad_norm": float(self.grad_norm), "tokens_per_s": tokens_per_s,
            "mfu": achieved / w.peak_flops if w.peak_flops else None,
            "max_steps": w.plan.max_steps, "time": time.time(),
        }
        if w.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(w.device) / 2**30
        self.losses, self.first_step = [], w.state.step + 1
        self.started, self.excluded_s = time.perf_counter(), 0.0
        return record


def report(w: Worker, metrics: dict[str, Any], save: bool) -> float | None:
    """``ray.train.report`` the metrics and, with ``save``, a checkpoint; returns the seconds the
    save stalled the loop (local write + report call) when saving.

    Every report of an async run is async: Ray keeps reports in order, so a synchronous one
    would wait for the previous checkpoint's upload.
    """
    mode = (CheckpointUploadMode.ASYNC if w.spec.checkpoint.async_upload
            else CheckpointUploadMode.SYNC)
    if not save:
        ray.train.report(metrics, checkpoint_upload_mode=mode)
        return None
    started = time.perf_counter()
    name = checkpoint_dir_name(w.state.step)
    local = tempfile.mkdtemp(prefix=f"raygpt-{name}-")
    save_training_checkpoint(local, w.rank, model=w.model, optimizer=w.optimizer, trainer=w.state, rng=w.rng)
    # ASYNC deletes the local folder once uploaded; SYNC leaves it to us.
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local), checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode)
    if mode is CheckpointUploadMode.SYNC:
        shutil.rmtree(local, ignore_errors=True)
    return time.perf_counter() - started


def inject_fault(w: Worker) -> None:
    """``train.fail_at_step``: the last rank dies hard when it reaches that step, once per run
    (a marker next to the checkpoints remembers it), and not in an attempt that resumed from a
    checkpoint at or after that step."""
    k = w.spec.train.fail_at_step
    if k is None or w.rank != w.world_size - 1 or w.state.step != k or w.resumed_from_step >= k:
        return
    storage = Storage.from_config(w.spec.storage)
    marker = join(w.spec.storage_path, w.spec.name, f".fault-injected-at-step-{k}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "fault injection: the last worker exited here\n")
    print(f"raygpt: fault injection: rank {w.rank} exits at step {k}", file=sys.stderr, flush=True)
    os._exit(1)


def due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def quiet_report_logs() -> None:
    """Ray Train logs every report at INFO under a logger named after its source file, outside
    ``ray.train``, so ``LoggingConfig`` does not reach it; the driver's view shows reports already."""
    from ray.train.v2._internal.execution import context as ray_train_context

    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The loop each Ray Train worker runs: step, report, validate, checkpoint."""
    spec, plan = config["spec"], config["plan"]
    os.environ.update(config["env"])  # the driver's RAYGPT_CACHE_DIR etc.: workers inherit their node's env
    quiet_report_logs()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if plan.use_gpu else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    w, error = agreed_setup(lambda: set_up_worker(spec, plan, rank, world_size, device), world_size)
    if w is None:
        ray.train.report({"fatal_error": error})
        return

    window = MetricsWindow(w)
    first_report = True
    while w.state.step < plan.stop_step:
        inject_fault(w)
        loss, grad_norm = train_step(w, w.state.step)
        window.add(loss, grad_norm, w.schedule.lr_at(w.state.step))
        w.state.advance(plan.global_batch_tokens)
        step, last = w.state.step, w.state.step == plan.stop_step

        val_loss = None
        if due(step, spec.train.val_interval) or (last and spec.train.val_interval > 0):
            started = time.perf_counter()
            val_loss = validation_loss(w)
            window.excluded_s += time.perf_counter() - started
        save = due(step, spec.checkpoint.interval) or last
        if not (due(step, spec.train.log_interval) or save or val_loss is not None):
            continue
        metrics = window.flush()
        if val_loss is not None:
            metrics["val_loss"] = val_loss
        if first_report:
            metrics.update(resumed_from_step=w.resumed_from_step, device=device_name(device),
                           precision=w.precision.name, world_size=world_size)
            first_report = False
        stall = report(w, metrics, save)
        if stall is not None:
            report(w, {"step": step, "checkpoint_stall_s": stall}, save=False)
        window.started = time.perf_counter()


# ---------------------------------------------------------------------------------------------
# Driver: checks before launch


def check_dataset(dataset: str, storage: Storage) -> dict[str, Any]:
    """The dataset's manifest, after checking that every shard is there with its recorded size
    (hashes are checked by the workers, which download the shards anyway)."""
    manifest = load_manifest(dataset, storage)
    bytes_per_token = np.dtype(manifest.get("dtype", "uint16")).itemsize
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            uri = join(dataset, shard["name"])
            size = stored_size(uri, storage)
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


def training_failure_message(error: BaseException) -> str:
    """The user-facing message inside a Ray Train failure: the first RaygptError among the
    workers' exceptions, else the last line of the first worker's error."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaygptError):
            return str(e)
        pending.extend([getattr(e, "_base_exc", None), getattr(e, "cause", None), e.__cause__,
                        getattr(e, "controller_failure", None)])
        pending.extend(getattr(e, "worker_failures", {}).values())
    failures = getattr(error, "worker_failures", None) or {}
    first = next(iter(failures.values()), error)
    return f"training failed: {last_line(str(first))[:400]} (see the worker logs)"


# ---------------------------------------------------------------------------------------------
# Driver: progress view and launch


class ProgressView:
    """The driver's view of the metrics stream: a live progress bar on a terminal, one line per
    report otherwise (CI, Ray job logs). Fed by ``MetricsLog`` through a Ray queue."""

    def __init__(self, plan: TrainPlan, start_step: int, queue, console=None):
        self.plan, self.queue = plan, queue
        self.console = console or Console(stderr=False)
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.fatal_error: str | None = None
        self.start_step = start_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raygpt-progress", daemon=True)
        self._progress = None

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                      console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.plan.stop_step, completed=self.start_step,
                                                 stats="starting workers...")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain_once(timeout=0)
        if self._progress is not None:
            self._progress.stop()

    def _drain(self) -> None:
        while not self._stop.is_set():
            self._drain_once(timeout=0.5)

    def _drain_once(self, timeout: float) -> None:
        while True:
            try:
                record = self.queue.get(block=timeout > 0, timeout=timeout or None)
            except Empty:
                return
            self.show(record)
            timeout = 0

    def show(self, record: dict[str, Any]) -> None:
        if "fatal_error" in record:
            self.fatal_error = record["fatal_error"]
            return
        if record.get("event") == "worker_failure":
            self.failures.append(record)
            self._print(f"[yellow]worker {record['rank']} failed ({record['error']}); Ray Train restarts the "
                        "workers from the last checkpoint[/]")
            return
        if "resumed_from_step" in record and record["resumed_from_step"] > 0:
            self._print(f"resumed from step {record['resumed_from_step']}")
        if "loss" in record:
            self.records.append(record)
        line = self._line(record)
        if self._progress is not None:
            if "loss" in record:
                self._progress.update(self._task, completed=record["step"], stats=line)
            if "val_loss" in record or "checkpoint_stall_s" in record:
                self._print(f"step {record['step']}: {line}")
        else:
            self._print(f"step {record['step']}/{self.plan.stop_step} {line}")

    def _print(self, text: str) -> None:
        (self._progress.console if self._progress is not None else self.console).print(text, highlight=False)

    @staticmethod
    def _line(r: dict[str, Any]) -> str:
        parts = []
        if "loss" in r:
            parts.append(f"loss {r['loss']:.4f}  lr {r['lr']:.2e}  grad {r['grad_norm']:.3f}  "
                         f"{r['tokens_per_s']:,.0f} tok/s")
            if r.get("mfu") is not None:
                parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if "val_loss" in r:
            parts.append(f"val {r['val_loss']:.4f}")
        if "checkpoint_stall_s" in r:
            parts.append(f"checkpoint saved, stalled {r['checkpoint_stall_s']:.2f} s")
        return "  ".join(parts)


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
    record.write()

    queue = Queue(actor_options={"num_cpus": 0})
    metrics_log = MetricsLog(run_uri, storage, read_metrics(run_uri, storage), queue)
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
            callbacks=[metrics_log],
            # Ray Train's per-report INFO lines would drown the progress view.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    # Ray Train's controller collects reports every 2 s by default, and a worker's next report
    # waits until its previous one is collected: poll more often so reports never stall training.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    begun = time.time()
    view = ProgressView(plan, start_step, queue, console)
    try:
        with view:
            result = trainer.fit()
    except TrainingFailedError as e:
        message = training_failure_message(e)
        record.finish("failed", error=message, restarts=len(view.failures))
        raise RaygptError(message) from None
    except (KeyboardInterrupt, SystemExit):
        # On Ctrl-C, Ray Train aborts the workers and exits the driver with status 0; the run is
        # resumable from its last checkpoint, and the caller should hear "interrupted".
        record.finish("interrupted", restarts=len(view.failures))
        raise KeyboardInterrupt from None
    finally:
        ray.kill(queue.actor)
    if view.fatal_error is not None:
        record.finish("failed", error=view.fatal_error)
        raise RaygptError(view.fatal_error)

    records = read_metrics(run_uri, storage)
    final = summarize(records)
    final["session_s"] = time.time() - begun
    devices = next((r["devices"] for r in records if "devices" in r), None)
    if devices:
        record.record["hardware"]["devices"] = devices
    status = "finished" if final.get("step") == plan.max_steps else "stopped"
    record.finish(status, final=final, restarts=len(view.failures),
                  checkpoint=result.checkpoint.path if result.checkpoint else None)
    return record.record


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics from a run's records: last step, tokens, loss, val loss, mean throughput."""
    if not records:
        return {}
    last = records[-1]
    with_loss = [r for r in records if "tokens_per_s" in r]
    vals = [r for r in records if r.get("val_loss") is not None]
    stalls = [r["checkpoint_stall_s"] for r in records if "checkpoint_stall_s" in r]
    summary = {"step": last["step"], "tokens": last.get("tokens"), "loss": last.get("loss"),
               "val_loss": vals[-1]["val_loss"] if vals else None,
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in with_loss])) if with_loss else None,
               "mfu": last.get("mfu"),
               "checkpoint_stall_s_max": max(stalls) if stalls else None}
    return summary


def train_command(args) -> int:
    """``raygpt train SPEC [--set k=v] [--address A] [--num-cpus N]``."""
    spec = load_spec(args.spec, args.overrides)
    summary = train(spec, address=args.address, num_cpus=args.num_cpus)
    final = summary.get("final") or {}
    if final:
        val = f", val loss {final['val_loss']:.4f}" if final.get("val_loss") is not None else ""
        record_uri = join(spec.storage_path, spec.name, "run.json")
        print(f"raygpt train: {spec.name} {summary.get('status')} at step {final.get('step')}: "
              f"loss {final.get('loss', float('nan')):.4f}{val}; run record {record_uri}")
    return 0
