"""How the model is spread over the workers: a parallel strategy per ``train.parallel`` value.

A strategy wraps the bare model for training (after an optional ``torch.compile``), says how
to skip the gradient all-reduce on micro-batches that are not a step's last, and hands back
the full model and optimizer state for a checkpoint. DDP is the strategy today; a sharded one
(FSDP2's ``fully_shard``) is one more class here and one entry in ``STRATEGIES``.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch
from torch.nn.parallel import DistributedDataParallel


class ParallelStrategy:
    """One way of training a model on ``world_size`` workers."""

    name = ""

    def wrap(self, model: torch.nn.Module, device: torch.device, world_size: int,
             compile: bool) -> torch.nn.Module:
        """The module the training loop calls (the bare model stays what is saved)."""
        raise NotImplementedError

    def no_sync(self, training_model: torch.nn.Module, world_size: int) -> ContextManager:
        """Context for a micro-batch whose gradients are accumulated without communication."""
        return contextlib.nullcontext()

    def full_state_dicts(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         rank: int) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The complete model and optimizer state as a checkpoint stores it, on rank 0 (None
        elsewhere). Called by every rank: a sharded strategy gathers here."""
        return (model.state_dict(), optimizer.state_dict()) if rank == 0 else None


class DDP(ParallelStrategy):
    """Every worker holds the whole model; gradients are averaged by an all-reduce per step."""

    name = "ddp"

    def wrap(self, model, device, world_size, compile):
        training_model = torch.compile(model) if compile else model
        if world_size == 1:
            return training_model
        return DistributedDataParallel(training_model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, training_model, world_size):
        # Gradients are all-reduced once per step, on the last micro-batch.
        return training_model.no_sync() if world_size > 1 else contextlib.nullcontext()


STRATEGIES: dict[str, type[ParallelStrategy]] = {DDP.name: DDP}
"""Parallel strategies by the name ``train.parallel`` gives them."""


def get_strategy(name: str) -> ParallelStrategy:
    return STRATEGIES[name]()
