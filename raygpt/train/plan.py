"""The plan of a run: the batch arithmetic, fixed before any worker starts.

The global batch is given in tokens; the plan turns it into sequences per step, the
gradient-accumulation steps of each worker, the last step of the schedule and of this
session, and says what to change when the numbers do not divide.
"""

from __future__ import annotations

from dataclasses import dataclass

from raygpt.config import RunSpec, worker_range
from raygpt.data.batches import micro_batch_share
from raygpt.errors import RaygptError
from raygpt.model import config_from_spec


@dataclass(frozen=True)
class TrainPlan:
    """The numbers a run trains with, derived from the spec, the dataset and the cluster."""

    seq_len: int
    global_batch_tokens: int
    global_batch_size: int
    """Sequences per optimizer step, across all workers."""
    micro_batch_size: int
    micro_batches: int
    """Micro-batches per optimizer step, across all workers: global_batch_size / micro_batch_size."""
    num_workers: int
    """Workers the run asks for (the most an elastic run grows to)."""
    min_workers: int
    """The fewest workers an elastic run continues on (``num_workers`` for a fixed-size run)."""
    grad_accum_steps: int
    """Micro-batches of the largest share at ``num_workers`` workers (see ``micro_batch_share``)."""
    max_steps: int
    """Where the LR schedule ends."""
    stop_step: int
    """Where this session ends: ``train.stop_at_step`` or ``max_steps``."""
    use_gpu: bool
    train_tokens: int

    @property
    def elastic(self) -> bool:
        return self.min_workers < self.num_workers


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
    min_workers, num_workers = worker_range(t.num_workers)
    if global_batch_size % t.micro_batch_size:
        step = t.micro_batch_size * seq_len
        lower = max(step, t.global_batch_tokens // step * step)
        raise RaygptError(
            f"train.global_batch_tokens: {t.global_batch_tokens} tokens = {global_batch_size} sequences of {seq_len}, "
            f"which micro-batches of train.micro_batch_size {t.micro_batch_size} cannot divide; use a multiple of "
            f"{step} tokens (e.g. {lower} or {lower + step}), or change train.micro_batch_size")
    micro_batches = global_batch_size // t.micro_batch_size
    if micro_batches < num_workers:
        raise RaygptError(
            f"train.num_workers: {num_workers} workers, but a step has only {micro_batches} micro-batches of "
            f"{t.micro_batch_size} sequences: raise train.global_batch_tokens or lower train.micro_batch_size "
            "or train.num_workers")
    max_steps = t.max_steps if t.max_steps is not None else train_tokens // t.global_batch_tokens
    if max_steps <= 0:
        raise RaygptError(f"train.max_steps: the dataset {t.dataset} has {train_tokens:,} training tokens, less than "
                          f"one global batch of {t.global_batch_tokens:,}; prepare more data or lower "
                          "train.global_batch_tokens")
    stop_step = min(t.stop_at_step, max_steps) if t.stop_at_step is not None else max_steps
    return TrainPlan(seq_len=seq_len, global_batch_tokens=t.global_batch_tokens, global_batch_size=global_batch_size,
                     micro_batch_size=t.micro_batch_size, micro_batches=micro_batches, num_workers=num_workers,
                     min_workers=min_workers, grad_accum_steps=len(micro_batch_share(micro_batches, 0, num_workers)),
                     max_steps=max_steps, stop_step=stop_step, use_gpu=use_gpu, train_tokens=train_tokens)
