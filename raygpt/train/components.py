"""The components of a training worker that save and restore their own state, and the precision policy.

A checkpoint is the sum of the components' ``state_dict``: ``TrainerState`` (step, tokens,
data cursor, schedule, grad scaler), ``RngState`` (this rank's generators), plus the model and
optimizer. ``choose_precision`` is the one precision policy, used by pretraining and
fine-tuning alike; ``use_device`` the one way a process takes its device.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raygpt import __version__
from raygpt.config import RunSpec, recorded_spec
from raygpt.errors import RaygptError
from raygpt.train.schedule import Schedule

RECENT_METRICS_KEPT = 1000
"""At most this many metrics records ride along in a checkpoint (the oldest go first)."""


class TrainerState:
    """The trainer's own resumable state. Tiny: data order and learning rate are functions of the
    step, so the step is also the data cursor and the schedule position.

    It also carries the metrics records reported since the previous checkpoint
    (``recent_metrics``): a driver lost before it wrote them to ``metrics.jsonl`` (killed
    during the final upload, say) leaves them in the checkpoint, where the next session finds
    them; a resumed worker hands them to the driver in its first report (``carried_metrics``),
for a checkpoint whose own report never reached it, and starts its own list."""

    def __init__(self, schedule: Schedule, scaler: torch.amp.GradScaler, seed: int, spec: RunSpec,
                 world_size: int, manifest_sha256: str | None = None):
        self.step = 0
        self.tokens_seen = 0
        self.schedule, self.scaler, self.seed, self.spec, self.world_size = schedule, scaler, seed, spec, world_size
        self.manifest_sha256 = manifest_sha256
        self.recent_metrics: list[dict[str, Any]] = []
        self.carried_metrics: list[dict[str, Any]] = []
        """The records the checkpoint this state was loaded from carried (for the driver)."""

    def note_metrics(self, record: dict[str, Any]) -> None:
        """A metrics record this worker reports (JSON-safe), for the next checkpoint to carry."""
        # Not the records a resumed worker hands on: a checkpoint's list must not nest the last one's.
        record = {k: v for k, v in record.items() if k != "carried_records"}
        self.recent_metrics = [*self.recent_metrics[-(RECENT_METRICS_KEPT - 1):], record]

    def checkpointed(self) -> None:
        """The records so far are in a checkpoint's state now."""
        self.recent_metrics = []

    def advance(self, tokens: int) -> None:
        self.step += 1
        self.tokens_seen += tokens

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen,
                "data": {"seed": self.seed, "next_batch": self.step, "manifest_sha256": self.manifest_sha256},
                "schedule": {**self.schedule.state_dict(), "next_lr": self.schedule.lr_at(self.step)},
                "scaler": self.scaler.state_dict(), "world_size": self.world_size,
                "raygpt_version": __version__, "spec": recorded_spec(self.spec),
                "recent_metrics": self.recent_metrics}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.carried_metrics = list(state.get("recent_metrics") or [])
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


def use_device(device: str | torch.device) -> torch.device:
    """``device`` as one specific device, made this process's current one when it is a GPU.

    ``cuda`` alone becomes ``cuda:<current device>``: ``torch.cuda.set_device`` refuses a
    device without an index, and the step's pinned buffers, events and memory counters all
    mean one device. Every entry point that is handed a device name (the Ray Train worker, the
    benchmarks) takes it through here."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RaygptError(f"device {device}: no CUDA device here (torch {torch.__version__}, "
                          f"CUDA {torch.version.cuda}); use cpu")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


@dataclass
class Precision:
    """Autocast dtype (None: fp32) and the GradScaler that fp16 needs."""

    name: str
    dtype: torch.dtype | None
    device_type: str
    scaler: torch.amp.GradScaler

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def choose_precision(setting: str, device: torch.device, key: str = "train.precision",
                     allow_fp16: bool = True) -> Precision:
    """The autocast dtype for ``setting`` on ``device``.

    auto: bf16 on GPUs with native bf16 (Ampere and newer), else fp16 with a GradScaler (V100,
    T4) when ``allow_fp16``, else fp32; fp32 on CPU. Emulated bf16 does not count: on a V100 it
    runs, slowly. ``key`` names the spec field in errors.
    """
    if setting == "auto":
        if device.type == "cuda":
            native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            setting = "bf16" if native_bf16 else ("fp16" if allow_fp16 else "fp32")
        else:
            setting = "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise RaygptError(f"{key}: fp16 needs a GPU; use fp32 or bf16 on CPU")
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[setting]
    scaler = torch.amp.GradScaler(device.type, enabled=setting == "fp16")
    return Precision(setting, dtype, device.type, scaler)
