"""What a run measures, and the one stream every report goes through.

``MetricsWindow`` collects per-step losses on the device and turns them into one record per
report (loss of every step, lr, grad norm, tokens/s, MFU); ``peak_flops`` is the MFU table.
``MetricsStream`` is the run's metrics stream: one record per reported step, merged when a
report only adds to a step (a checkpoint's stall), cut back when an attempt resumes from an
earlier step, and handed to sinks (``raygpt.train.sinks``): ``metrics.jsonl``, the driver's
progress view, experiment trackers. A step replayed after a restart reaches a sink that
keeps history (a tracker) once only. Nothing here imports Ray.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raygpt.errors import RaygptError, last_line
from raygpt.stages import METRICS_FILE
from raygpt.storage import Storage, join

# Dense bf16/fp16 tensor-core peak per GPU (TFLOP/s), for MFU; matched against the device name
# in order, so the more specific names come first. fp32 (TF32) peaks are half of these.
GPU_PEAK_TFLOPS = (
    ("GB200", 2500), ("B200", 2250), ("H200", 989), ("H100 NVL", 835), ("H100 PCIe", 756), ("H100", 989),
    ("H800", 989), ("A100", 312), ("A800", 312), ("L40S", 362), ("L40", 181), ("L4", 121), ("A10G", 125),
    ("A10", 125), ("RTX 6000 Ada", 364), ("A6000", 155), ("RTX 4090", 165), ("RTX 3090", 71), ("V100", 125),
    ("T4", 65),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({cpu_model()})"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device at this precision, or None when unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device), precision)


def peak_flops_of(name: str, precision: str) -> float | None:
    """Peak FLOP/s of a GPU by its device name, or None when it is not in ``GPU_PEAK_TFLOPS``."""
    for key, tflops in GPU_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12 / (2 if precision == "fp32" else 1)
    return None


class MetricsWindow:
    """Per-step losses since the last report. They stay on the device, and are summed across
    workers (each holds its part of a step's mean loss) in one collective per report, so a step
    never waits for a host sync."""

    def __init__(self, *, first_step: int, world_size: int, global_batch_tokens: int, flops_per_token: int,
                 peak_flops: float | None, device: torch.device):
        self.world_size, self.global_batch_tokens = world_size, global_batch_tokens
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_flops, device
        self.losses: list[torch.Tensor] = []
        self.first_step = first_step
        self.grad_norm: torch.Tensor | None = None
        self.lr = 0.0
        self.started = time.perf_counter()
        self.excluded_s = 0.0  # validation and checkpoint time: not training throughput
        self.step_time_s: float | None = None  # at the last flush, the mean over workers: the same on every rank

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> None:
        self.losses.append(loss)
        self.grad_norm, self.lr = grad_norm, lr

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds

    def flush(self, step: int, tokens_seen: int) -> dict[str, Any]:
        """The record for the steps since the last flush, ending at ``step`` (a collective)."""
        seconds = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        # One collective: every worker's part of each step's loss, and the window's seconds.
        sums = torch.cat([torch.stack(self.losses).double(),
                          torch.tensor([seconds / len(self.losses)], dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        values = sums[:-1].tolist()  # each worker's part of a step's loss: their sum is the global batch's
        self.step_time_s = float(sums[-1]) / self.world_size
        tokens_per_s = len(values) * self.global_batch_tokens / seconds
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        record = {
            "step": step, "tokens": tokens_seen, "loss": sum(values) / len(values),
            "step_losses": {str(self.first_step + i): v for i, v in enumerate(values)},
            "lr": self.lr, "grad_norm": float(self.grad_norm), "tokens_per_s": tokens_per_s,
            "mfu": achieved / self.peak_flops if self.peak_flops else None, "time": time.time(),
        }
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.losses, self.first_step = [], step + 1
        self.started, self.excluded_s = time.perf_counter(), 0.0
        return record


class AttemptLog:
    """Every attempt of a run: the workers Ray Train started (again), the steps they trained,
    why they ended, what the next attempt trained again, and how long the loss cost.

    An attempt begins with a report that carries ``resumed_from_step`` (the first of a set of
    workers) and ends when the next one begins, when a worker fails, or when the run ends.
    ``ended``: ``finished``, ``stopped`` (the session's last step), ``preemption notice`` (it
    saved on a notice before it went), ``node lost``, ``worker lost``, ``worker error``, or
    ``resize`` (Ray Train restarted it at another size with no failure).
    """

    def __init__(self, previous: list[dict[str, Any]] | None = None):
        self.attempts: list[dict[str, Any]] = [dict(a) for a in previous or []]

    @property
    def current(self) -> dict[str, Any] | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].get("open") else None

    def begin(self, report: dict[str, Any]) -> dict[str, Any]:
        previous = self.current
        if previous is not None:
            self._end(previous, "preemption notice" if previous.get("notice") else "resize",
                      report.get("attempt_started", time.time()))
        attempt = {"attempt": len(self.attempts) + 1, "world_size": report.get("world_size"), "nodes": report.get("nodes"),
                   "resumed_from_step": report["resumed_from_step"], "first_step": report["resumed_from_step"] + 1,
                   "last_step": report["resumed_from_step"], "started": report.get("attempt_started"),
                   "first_step_at": report.get("first_step_at"), "open": True}
        if self.attempts:
            before = self.attempts[-1]
            before["recomputed_after"] = max(0, before["last_step"] - attempt["resumed_from_step"])
            if before.get("ended_at") and attempt["first_step_at"]:
                before["seconds_to_next_step"] = round(attempt["first_step_at"] - before["ended_at"], 3)
        self.attempts.append(attempt)
        return attempt

    def report(self, report: dict[str, Any]) -> None:
        attempt = self.current
        if attempt is None:
            return
        attempt["last_step"] = max(attempt["last_step"], report["step"])
        if report.get("checkpoint_reason") == "preemption":
            attempt["notice"] = True

    def failed(self, error: BaseException | str) -> None:
        attempt = self.current
        if attempt is not None:
            self._end(attempt, "preemption notice" if attempt.get("notice") else failure_kind(error), time.time(),
                      error=str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__)

    def finish(self, status: str) -> None:
        attempt = self.current
        if attempt is not None:
            self._end(attempt, status, time.time())

    @staticmethod
    def _end(attempt: dict[str, Any], why: str, when: float, error: str | None = None) -> None:
        attempt.pop("open", None)
        attempt.update(ended=why, ended_at=when)
        if error:
            attempt["error"] = error


def failure_kind(error: BaseException | str) -> str:
    """``node lost``, ``worker lost`` (its process died) or ``worker error`` (an exception)."""
    text = str(error).lower()
    names = {cls.__name__ for cls in type(error).__mro__} if isinstance(error, BaseException) else set()
    if "node" in text and ("died" in text or "dead" in text or "removed" in text):
        return "node lost"
    if names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError"}:
        return "worker lost"
    return "worker error"


def attempt_segments(attempts: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(first step, last step, workers) of the trajectory as it stands: each attempt counts up
    to where the next one resumed; neighbours on the same number of workers merge."""
    segments: list[tuple[int, int, int]] = []
    for i, a in enumerate(attempts):
        last = attempts[i + 1]["resumed_from_step"] if i + 1 < len(attempts) else a["last_step"]
        first = a["resumed_from_step"] + 1
        if last < first:
            continue
        if segments and segments[-1][2] == a["world_size"] and segments[-1][1] + 1 == first:
            segments[-1] = (segments[-1][0], last, a["world_size"])
        else:
            segments.append((first, last, a["world_size"]))
    return segments


def describe_attempts(attempts: list[dict[str, Any]]) -> str:
    """'steps 1-412 on 8 workers, 413-980 on 6; 37 steps recomputed, 95 s lost' (or '')."""
    segments = attempt_segments(attempts)
    if not segments:
        return ""
    parts = [f"{first}-{last} on {n} worker{'s' if n != 1 else ''}" for first, last, n in segments]
    recomputed = sum(a.get("recomputed_after", 0) for a in attempts)
    lost = sum(a.get("seconds_to_next_step", 0.0) for a in attempts)
    text = "steps " + ", ".join(parts)
    if len(attempts) > 1:
        text += f"; {len(attempts) - 1} restart(s), {recomputed} step(s) recomputed, {lost:.0f} s from losses to next steps"
    return text


class MetricsStream:
    """The run's records, one per reported step, and the sinks that receive them.

    Workers report dicts with a ``step``; a report that only adds to a step (the seconds a
    checkpoint stalled training) is merged into that step's record. A record with
    ``resumed_from_step`` starts a new attempt: records after that step are dropped, and the
    steps trained again are not passed a second time to sinks that keep history
    (``sink.replays`` False), which saw them already.
    """

    def __init__(self, previous: list[dict[str, Any]], sinks: list[Any],
                 attempts: list[dict[str, Any]] | None = None):
        self.records: list[dict[str, Any]] = list(previous)
        self.sinks = list(sinks)
        self.logged_to_step = self.records[-1]["step"] if self.records else 0
        self.attempts = AttemptLog(attempts)

    def add(self, report: dict[str, Any], checkpoint: str | None = None) -> dict[str, Any]:
        """Take one report; returns the step's merged record."""
        if "resumed_from_step" in report:
            self.records = [r for r in self.records if r["step"] <= report["resumed_from_step"]]
            self.attempts.begin(report)
            self.event({"event": "attempts", "attempts": self.attempts.attempts})
        self.attempts.report(report)
        if self.attempts.current is not None:
            report = {**report, "attempt": self.attempts.current["attempt"]}
        if self.records and self.records[-1]["step"] == report["step"]:
            self.records[-1].update(report)
        else:
            self.records.append(dict(report))
        record = self.records[-1]
        if checkpoint is not None:
            record["checkpoint"] = checkpoint
        fresh = report["step"] > self.logged_to_step or (report["step"] == self.logged_to_step
                                                         and "resumed_from_step" not in report)
        self.logged_to_step = max(self.logged_to_step, report["step"])
        for sink in self.sinks:
            if sink.replays or fresh:
                sink.write(report, self.records)
        if checkpoint is not None or "checkpoint_stall_s" in report:
            self.flush()
        return record

    def event(self, event: dict[str, Any]) -> None:
        """Something that is not a step's metrics (a worker failure, a fatal setup error, the attempts)."""
        for sink in self.sinks:
            sink.event(event)

    def failed(self, error: BaseException, rank: int) -> None:
        """A worker failed: the attempt ends; Ray Train restarts the workers (or gives up)."""
        self.attempts.failed(error)
        self.flush()
        self.event({"event": "worker_failure", "rank": rank, "error": last_line(str(error))})
        self.event({"event": "attempts", "attempts": self.attempts.attempts})

    def flush(self) -> None:
        for sink in self.sinks:
            sink.flush(self.records)

    def close(self) -> None:
        self.flush()
        for sink in self.sinks:
            sink.close()


def read_metrics(run_uri: str, storage: Storage) -> list[dict[str, Any]]:
    """The records of ``run_uri/metrics.jsonl``, or [] when there is none yet."""
    uri = join(run_uri, METRICS_FILE)
    if not storage.exists(uri):
        return []
    records = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RaygptError(f"{uri}: line {number} is not valid JSON") from None
    return records


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """Training loss of every step, from the per-step losses each record carries."""
    return {int(step): loss for r in records for step, loss in r.get("step_losses", {}).items()}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Final metrics from a run's records: last step, tokens, loss, val loss, mean throughput."""
    if not records:
        return {}
    last = records[-1]
    with_loss = [r for r in records if "tokens_per_s" in r]
    vals = [r for r in records if r.get("val_loss") is not None]
    stalls = [r["checkpoint_stall_s"] for r in records if "checkpoint_stall_s" in r]
    return {"step": last["step"], "tokens": last.get("tokens"), "loss": last.get("loss"),
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in with_loss])) if with_loss else None,
            "mfu": last.get("mfu"),
            "checkpoint_stall_s_max": max(stalls) if stalls else None}
