"""One training worker without Ray: its components, one optimizer step, validation, a checkpoint.

``set_up_worker`` builds the model, optimizer, schedule, batches, trainer state and RNG state,
restores them from a local checkpoint folder when given one, and wraps the model for the
parallel strategy. ``train_step`` is one optimizer step (micro-batches, accumulation,
clipping, optimizer). ``start_checkpoint`` saves this rank's part of a checkpoint without a
stall: the loop waits only for a copy of the state into host memory, the files are written
in the background, and ``Reports`` holds back the report that carries them (and every report
after it) until every rank's files are complete. The Ray Train loop (``raygpt.train.loop``)
and the Ray-free GPU check (``benchmarks/gpu_check.py``) both run exactly these.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from raygpt.config import RunSpec, TrainConfig
from raygpt.data.batches import TrainBatches, eval_batches, micro_batch_share
from raygpt.errors import RaygptError
from raygpt.evaluate import token_loss_sums
from raygpt.model import GPT, GPTConfig, config_from_spec
from raygpt.storage import Storage
from raygpt.train.components import Precision, RngState, TrainerState, choose_precision, seed_everything
from raygpt.train.metrics import peak_flops
from raygpt.train.parallel import ParallelStrategy, get_strategy
from raygpt.train.plan import TrainPlan
from raygpt.train.schedule import Schedule, build_schedule
from raygpt.weights.checkpoint import (
    MODEL_CONFIG_FILE,
    CheckpointWriter,
    FileRecord,
    host_staged_state,
    load_training_checkpoint,
    model_config_from_dict,
    snapshot_training_state,
)
from raygpt.weights.integrity import ResumeChoice


class DeviceBatches:
    """This worker's micro-batches of each global batch, on its device.

    A step's rows of uint16 tokens are gathered into a reused host buffer (pinned on CUDA),
    copied to the device without blocking and widened to int64 there: a quarter of the int64
    bytes cross the bus, and the host goes on to queue the step's kernels. On CUDA two buffers
    alternate, and one is refilled only once its previous copy has finished (an event), so the
    host may run a step ahead of the GPU.
    """

    def __init__(self, batches: TrainBatches, rank: int, world_size: int, micro_batch_size: int,
                 device: torch.device):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        self.micro_batch_size, self.device = micro_batch_size, device
        share = micro_batch_share(batches.global_batch_size // micro_batch_size, rank, world_size)
        shape = (max(1, len(share)) * micro_batch_size, batches.seq_len + 1)
        pinned = device.type == "cuda"
        self._buffers = [torch.empty(shape, dtype=torch.uint16, pin_memory=pinned) for _ in range(2 if pinned else 1)]
        self._copied: list[Any] = [None] * len(self._buffers)
        self._next = 0

    def micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Global batch ``step``'s share of this worker: (x, y) int64 on the device, each
        (micro_batch_size, seq_len)."""
        i, self._next = self._next, (self._next + 1) % len(self._buffers)
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        buffer = self._buffers[i]
        self.batches.rows(step, self.rank, self.world_size, self.micro_batch_size, out=buffer.numpy())
        rows = buffer.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied[i] = torch.cuda.Event()
            self._copied[i].record()
        rows = rows.long()
        m = self.micro_batch_size
        return [(rows[j:j + m, :-1].contiguous(), rows[j:j + m, 1:].contiguous()) for j in range(0, len(rows), m)]


def persistent_compile_cache() -> str:
    """Point inductor's caches (compiled kernels, FX graphs, AOTAutograd, Triton) at
    ``~/.cache/raygpt/inductor`` unless ``TORCHINDUCTOR_CACHE_DIR`` names another folder;
    returns the folder. Torch's default is under ``/tmp``, which container restarts and tmp
    cleaners empty; here a restarted worker on the node loads its kernels instead of compiling
    them for a minute. Torch writes its default into the variable once it has used it, so
    that value counts as unset."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(torch_default_compile_cache()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path.home() / ".cache" / "raygpt" / "inductor")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def torch_default_compile_cache() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # torch moved it: its rule, as of torch 2.13
        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return default_cache_dir()


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
    """The model the loop runs: compiled and/or wrapped by the parallel strategy."""
    strategy: ParallelStrategy
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    batches: TrainBatches
    state: TrainerState
    rng: RngState
    device_batches: DeviceBatches
    writer: CheckpointWriter
    """Writes checkpoints in the background; its host buffers are reused between saves."""
    reports: Reports
    resumed_from_step: int
    flops_per_token: int
    peak_flops: float | None
    setup_s: float
    """Seconds ``set_up_worker`` took: model, data, checkpoint load, wrapping (compilation
    itself happens in the first steps)."""
    setup_parts: dict[str, float]
    """Those seconds by part: ``model_s`` (built on the device, optimizer), ``data_open_s``
    (manifest, shard cache), ``checkpoint_load_s``, ``wrap_s`` (compile wrapper, DDP's
    broadcast), ``first_batch_s`` (its shard fetched, the pinned batch buffers)."""
    resume: ResumeChoice | None = None
    """Which checkpoint the worker resumed from and which newer ones it passed over, when it
    chose (``raygpt.train.resume``)."""

    def taken_checkpoint_names(self) -> list[str]:
        """Checkpoint folders the run held when this worker started: a save must not reuse one."""
        return [name for name, _ in self.resume.skipped] if self.resume else []

    def close(self) -> None:
        """Let a checkpoint being written finish, then stop the background threads."""
        try:
            self.writer.close()
        finally:
            self.batches.close()


def set_up_worker(spec: RunSpec, plan: TrainPlan, rank: int, world_size: int, device: torch.device,
                  checkpoint_dir: str | Path | None = None, checkpoint_name: str | None = None,
                  resume: ResumeChoice | None = None) -> Worker:
    """Build every component, then restore them from ``checkpoint_dir`` (a local checkpoint
    folder, ``checkpoint_name`` for messages) when there is one. ``resume``: how that folder
    was chosen, and checked already (``raygpt.train.resume``); without it the folder is
    checked here."""
    started = time.perf_counter()
    parts = Laps()
    t = spec.train
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    precision = choose_precision(t.precision, device)
    config = config_from_spec(spec.model, trained_config(checkpoint_dir))
    model = GPT(config, seed=t.seed).to(device)  # every rank draws the same weights
    optimizer = model.configure_optimizer(t.lr, t.weight_decay, (t.beta1, t.beta2), device.type)
    schedule = build_schedule(t.schedule, t.lr, t.warmup_steps, plan.max_steps, t.min_lr_ratio)
    parts.lap("model_s")
    storage = Storage.from_config(spec.storage)
    batches = TrainBatches(t.dataset, storage, plan.seq_len, t.seed, plan.global_batch_size,
                           max_cached_shards=t.cache_shards)
    state = TrainerState(schedule, precision.scaler, t.seed, spec, world_size, batches.cache.manifest_sha256)
    rng = RngState()
    seed_everything(t.seed + 1 + rank)  # each rank draws its own dropout masks
    parts.lap("data_open_s")
    try:
        if checkpoint_dir is not None:
            found_rng = load_training_checkpoint(
                checkpoint_dir, rank, model=model, optimizer=optimizer, trainer=state, rng=rng,
                expected=f"model.preset {spec.model.preset!r}", where=checkpoint_name or str(checkpoint_dir),
                verified=resume is not None)
            if not found_rng:  # resumed on more workers than saved: derive this rank's generators
                seed_everything(t.seed + 1 + rank + 1_000_003 * state.step)
        parts.lap("checkpoint_load_s")
        strategy = get_strategy(t.parallel)
        compile_model = t.compile if t.compile is not None else device.type == "cuda"
        if compile_model:
            persistent_compile_cache()
        training_model = strategy.wrap(model, device, world_size, compile_model)
        parts.lap("wrap_s")
        if state.step < plan.stop_step:
            # Fetch the first batch now: a missing or corrupt shard fails setup, not step 1000.
            batches.rows(state.step, rank, world_size, plan.micro_batch_size)
        device_batches = DeviceBatches(batches, rank, world_size, plan.micro_batch_size, device)
        parts.lap("first_batch_s")
    except BaseException:
        batches.close()
        raise
    writer = CheckpointWriter()
    return Worker(spec=spec, plan=plan, rank=rank, world_size=world_size, device=device, precision=precision,
                  model=model, training_model=training_model, strategy=strategy, optimizer=optimizer,
                  schedule=schedule, batches=batches, state=state, rng=rng, device_batches=device_batches,
                  writer=writer, reports=Reports(writer, world_size, device), resumed_from_step=state.step,
                  flops_per_token=model.flops_per_token(plan.seq_len), peak_flops=peak_flops(device, precision.name),
                  setup_s=time.perf_counter() - started, setup_parts=parts.seconds, resume=resume)


class Laps:
    """Seconds of consecutive named parts, each from the end of the previous one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._last
        self._last = now


def trained_config(checkpoint_dir: str | Path | None) -> GPTConfig | None:
    """The model config a local checkpoint folder was trained with (None without a folder):
    what a spec that leaves ``model.vocab_multiple`` open resumes with."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / MODEL_CONFIG_FILE
    try:
        return model_config_from_dict(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError):
        return None  # the checkpoint's own check, next, names what is wrong with the folder


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
    if error is not None and worker is not None:
        worker.close()
        worker = None
    return worker, error


def train_step(w: Worker, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on global batch ``step``; returns this worker's part of the step's
    mean loss (summed over workers, it is the global batch's), the gradient norm before
    clipping, and whether the step was skipped for a non-finite loss or gradient norm (all
    unsynchronised tensors). ``TrainBatches.share_digest`` names the sequences.

    The worker computes its share of the step's micro-batches (``micro_batch_share``). Each
    micro-batch's loss counts 1/M of the global batch's and the strategy averages gradients
    over the W workers, so scaling each loss by W/M makes the gradient exactly the mean over
    every token of the global batch whatever the shares. Dropout masks come from a generator
    seeded by (seed, step, micro-batch index), never by the rank: the trajectory does not
    depend on the worker count.

    A step whose loss or gradient norm is NaN or inf changes neither the weights nor the
    optimizer's state (``step_unless``). Every rank skips it: the norm is that of the averaged
    gradients, the same on every rank, and a rank's non-finite loss makes its gradients
    non-finite, which the averaging carries to every rank.
    """
    lr = w.schedule.lr_at(step)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    share = micro_batch_share(w.plan.micro_batches, w.rank, w.world_size)
    micro_batches = w.device_batches.micro_batches(step)
    scale = w.world_size / w.plan.micro_batches
    scaler = w.precision.scaler
    loss_sum = torch.zeros((), device=w.device)
    for i, (index, (x, y)) in enumerate(zip(share, micro_batches)):
        last = i == len(micro_batches) - 1
        torch.manual_seed(dropout_seed(w.spec.train.seed, step, index))
        with contextlib.nullcontext() if last else w.strategy.no_sync(w.training_model, w.world_size):
            with w.precision.autocast():
                _, loss = w.training_model(x, y)
            scaler.scale(loss * scale).backward()
        loss_sum += loss.detach()
    loss = loss_sum / w.plan.micro_batches
    scaler.unscale_(w.optimizer)
    max_norm = w.spec.train.grad_clip if w.spec.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(w.model.parameters(), max_norm).detach()
    skipped = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
    if scaler.is_enabled():
        scaler.step(w.optimizer)  # fp16: the scaler skips a step whose gradients overflowed itself
        scaler.update()
    else:
        step_unless(w.optimizer, skipped)
    w.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, skipped


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a bool tensor on the device). A fused AdamW (what
    GPUs train with) takes it as the flag GradScaler hands it, ``found_inf``: the kernel leaves
    weights, moments and step count alone on the device, and the host never waits for the
    flag. Other optimizers read it on the host (on a CPU that costs nothing)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


def weights_finite(model: torch.nn.Module) -> bool:
    """Whether every weight is finite: the largest magnitude of each, one host sync (a save
    waits for the device anyway)."""
    largest = torch.stack([torch.linalg.vector_norm(p.detach(), ord=math.inf) for p in model.parameters()])
    return bool(largest.isfinite().all())


def nonfinite_stop(train: TrainConfig, skipped_in_a_row: int, first_skipped: int | None, step: int) -> str | None:
    """Why the run stops after ``step`` for its non-finite steps (``train.on_nonfinite``,
    ``train.max_nonfinite_skips``), or None: the message names the steps. ``skipped_in_a_row``
    steps up to ``step``, the first of them ``first_skipped``, were skipped."""
    if not skipped_in_a_row:
        return None
    advice = ("lower train.lr (or raise train.warmup_steps) and start the run again: it resumes from its newest "
              "checkpoint, whose weights are finite")
    if train.on_nonfinite == "stop":
        return (f"train: step {first_skipped} had a non-finite loss or gradient norm (train.on_nonfinite: stop); its "
                f"update was skipped and the run stopped at step {step}: {advice}")
    if skipped_in_a_row >= train.max_nonfinite_skips:
        return (f"train: steps {first_skipped}-{step}: {skipped_in_a_row} steps in a row had a non-finite loss or "
                f"gradient norm and were skipped (train.max_nonfinite_skips: {train.max_nonfinite_skips}): the "
                f"training diverged; {advice}")
    return None


def dropout_seed(seed: int, step: int, micro_batch: int) -> int:
    """The seed of micro-batch ``micro_batch``'s dropout masks at ``step``."""
    return int(np.random.SeedSequence([seed, _DROPOUT_STREAM, step, micro_batch]).generate_state(1, np.uint64)[0])


_DROPOUT_STREAM = 2  # apart from the data order's streams (0: shard order, 1: sequence order)


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


def reserve_checkpoint_buffers(w: Worker) -> None:
    """Have rank 0's checkpoint writer allocate (and pin) its host buffers in the background,
    once the optimizer's state exists (after the first step), so that no save stalls for them
    (gpt2-small's first save under Ray stalled 2.26 s on an H200, where the bare check's saves
    stalled 0.04 s). Every rank calls it: a sharded strategy would gather the full state here,
    once."""
    full_states = w.strategy.full_state_dicts(w.model, w.optimizer, w.rank)
    if w.rank == 0:
        w.writer.reserve(host_staged_state(w.model, w.optimizer, full_states))


def start_checkpoint(w: Worker, directory: str | Path) -> dict[str, float]:
    """Save this rank's part of a checkpoint of the worker's state into a local folder: the
    state is copied to host memory now, the files are written in the background. Waits first
    for the previous save (or the buffers' reservation), whose host buffers the copy reuses.
    Returns the seconds of that wait (``previous_write_s``) and of the rest (``copy_s``)."""
    started = time.perf_counter()
    w.writer.wait()
    waited = time.perf_counter()
    full_states = w.strategy.full_state_dicts(w.model, w.optimizer, w.rank)
    snapshot = snapshot_training_state(w.rank, model=w.model, optimizer=w.optimizer, trainer=w.state, rng=w.rng,
                                       host=w.writer.host, full_states=full_states)
    w.state.checkpointed()
    if w.world_size > 1:
        # Rank 0's trainer_state.json records every rank's RNG file (a few KB each, digested already).
        records: list[FileRecord | None] = [None] * w.world_size
        dist.all_gather_object(records, snapshot.rng_record)
        snapshot.peer_files = {r.name: r for r in records[1:] if r is not None}
    w.writer.start(snapshot, directory)
    return {"previous_write_s": waited - started, "copy_s": time.perf_counter() - waited}


class Reports:
    """The worker's reports, sent in order through ``send(metrics, checkpoint)``.

    A report that carries a checkpoint being written in the background, and every report
    after it (so that the order stays), is held back until every rank's files are complete:
    ``release`` sends them when all ranks' writes have finished, which the ranks agree on in
    one collective, or waits for that with ``wait``. Every rank therefore sends the same
    reports at the same calls, as Ray Train requires.
    """

    def __init__(self, writer: CheckpointWriter, world_size: int, device: torch.device):
        self.writer, self.world_size, self.device = writer, world_size, device
        self.held: list[tuple[dict[str, Any], Any]] = []

    def add(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        """Queue a report; one with a ``checkpoint`` (whatever ``send`` makes of it: a folder
        name, say) waits for the writer's current write."""
        self.held.append((metrics, checkpoint))

    def release(self, send: Callable[[dict[str, Any], Any], None], wait: bool = False) -> None:
        """Send the queued reports when the checkpoint among them is written on every rank, or
        after waiting for it (``wait``); without a checkpoint among them, send them now."""
        if any(checkpoint is not None for _, checkpoint in self.held):
            if wait:
                self.writer.wait()
            elif not self._written_everywhere():
                return
            else:
                self.writer.wait()  # done: this only collects its outcome (an error is raised here)
        held, self.held = self.held, []
        for metrics, checkpoint in held:
            send(metrics, checkpoint)

    def _written_everywhere(self) -> bool:
        done = self.writer.done()
        if self.world_size == 1:
            return done
        flag = torch.tensor([1.0 if done else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


def due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0
