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
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raygpt.errors import RaygptError
from raygpt.stages import METRICS_FILE
from raygpt.storage import Storage, join
from raygpt.train.attempts import AttemptLog

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


SLOW_STEP_S = 1.0
"""A training step's call that kept the host longer than this is listed in its record: it
compiled (the first steps) or compiled again (after validation or sampling, a new shape)."""


class MetricsWindow:
    """Per-step losses since the last report. They stay on the device, and are summed across
    workers (each holds its part of a step's mean loss) in one collective per report, so a step
    never waits for a host sync. Each step's flag "skipped for a non-finite loss or gradient
    norm" rides in the same collective: the record lists those steps (``skipped_steps``), its
    ``loss`` is the mean of the others, and the window counts the skips in a row. A step whose
    call kept the host over ``SLOW_STEP_S`` (compiling, or compiling again) is listed with its
    seconds (``slow_steps``)."""

    def __init__(self, *, first_step: int, world_size: int, global_batch_tokens: int, flops_per_token: int,
                 peak_flops: float | None, device: torch.device):
        self.world_size, self.global_batch_tokens = world_size, global_batch_tokens
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_flops, device
        self.losses: list[torch.Tensor] = []
        self.skipped: list[torch.Tensor] = []  # per step: skipped for a non-finite loss or gradient norm
        self.digests: list[int] = []  # this worker's share of each step's batch digest
        self.slow_steps: dict[str, float] = {}
        self.skipped_in_a_row = 0
        """Steps skipped in a row up to the last flush, and the first of them (None when 0)."""
        self.first_skipped: int | None = None
        self.first_step = first_step
        self.grad_norm: torch.Tensor | None = None
        self.lr = 0.0
        self.started = time.perf_counter()
        self.excluded_s = 0.0  # validation and checkpoint time: not training throughput
        self.step_time_s: float | None = None  # at the last flush, the mean over workers: the same on every rank

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, batch_digest: int = 0,
            skipped: torch.Tensor | None = None, call_s: float = 0.0) -> None:
        if call_s > SLOW_STEP_S:
            self.slow_steps[str(self.first_step + len(self.losses))] = round(call_s, 3)
        self.losses.append(loss)
        self.skipped.append(skipped if skipped is not None else torch.zeros((), dtype=torch.bool, device=loss.device))
        self.digests.append(batch_digest)
        self.grad_norm, self.lr = grad_norm, lr

    def exclude(self, seconds: float) -> None:
        self.excluded_s += seconds

    def flush(self, step: int, tokens_seen: int) -> dict[str, Any]:
        """The record for the steps since the last flush, ending at ``step`` (a collective)."""
        seconds = max(time.perf_counter() - self.started - self.excluded_s, 1e-9)
        # One collective: every worker's part of each step's loss, the skip flags, and the window's seconds.
        n = len(self.losses)
        sums = torch.cat([torch.stack(self.losses).double(), torch.stack(self.skipped).double(),
                          torch.tensor([*self.digests, seconds / n], dtype=torch.float64, device=self.device)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        values = sums[:n].tolist()  # each worker's part of a step's loss: their sum is the global batch's
        skipped = [self.first_step + i for i, flag in enumerate(sums[n:2 * n].tolist()) if flag > 0]
        digests = [int(d) for d in sums[2 * n:3 * n].tolist()]
        self.step_time_s = float(sums[-1]) / self.world_size
        for i in range(n):
            if self.first_step + i in skipped:
                self.first_skipped = self.first_skipped or self.first_step + i
                self.skipped_in_a_row += 1
            else:
                self.first_skipped, self.skipped_in_a_row = None, 0
        trained = [v for i, v in enumerate(values) if self.first_step + i not in skipped]
        tokens_per_s = len(values) * self.global_batch_tokens / seconds
        achieved = self.flops_per_token * tokens_per_s / self.world_size
        record = {
            "step": step, "tokens": tokens_seen, "loss": sum(trained) / len(trained) if trained else math.nan,
            "step_losses": {str(self.first_step + i): v for i, v in enumerate(values)},
            "step_batches": {str(self.first_step + i): d for i, d in enumerate(digests)},
            "lr": self.lr, "grad_norm": float(self.grad_norm), "tokens_per_s": tokens_per_s,
            "mfu": achieved / self.peak_flops if self.peak_flops else None, "time": time.time(),
        }
        if skipped:
            record["skipped_steps"] = skipped
        if self.slow_steps:
            record["slow_steps"], self.slow_steps = self.slow_steps, {}
        if self.device.type == "cuda":
            record["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.losses, self.skipped, self.digests, self.first_step = [], [], [], step + 1
        self.started, self.excluded_s = time.perf_counter(), 0.0
        return record


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
        carried = report.pop("carried_records", None)
        if "resumed_from_step" in report:
            self.records = [r for r in self.records if r["step"] <= report["resumed_from_step"]]
            if carried:  # the checkpoint's own report may never have arrived (its node went first)
                logged = self.records[-1]["step"] if self.records else 0
                self.records, _, _ = recover_records(self.records, {"step": report["resumed_from_step"],
                                                                    "recent_metrics": carried}, None)
                if self.attempts.current is not None:  # they belong to the attempt that saved, not this one
                    for record in (r for r in self.records if r["step"] > logged):
                        self.attempts.report(record)  # its last step, and whether it saved on a notice
                        record.setdefault("attempt", self.attempts.current["attempt"])
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
        """Something that is not a step's metrics (a worker failure, a fatal error, the attempts).
        A fatal error ends the session (a setup error, training that diverged): the records so
        far are flushed first."""
        if "fatal_error" in event:
            self.flush()
        for sink in self.sinks:
            sink.event(event)

    def failed(self, message: str, rank: int, kind: str) -> None:
        """Rank ``rank`` failed with ``message`` (``kind``: why, ``raygpt.cluster.classify_failure``):
        the attempt ends; Ray Train restarts the workers (or gives up)."""
        self.attempts.failed(kind, message)
        self.flush()
        self.event({"event": "worker_failure", "rank": rank, "kind": kind, "error": message})
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
    for number, line in enumerate(storage.read_bytes(uri).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError:  # not JSON, or not UTF-8
                raise RaygptError(f"{uri}: line {number} is not valid JSON (UTF-8)") from None
    return records


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """Training loss of every step, from the per-step losses each record carries."""
    return {int(step): loss for r in records for step, loss in r.get("step_losses", {}).items()}


def step_batches(records: list[dict[str, Any]]) -> dict[int, int]:
    """The batch digest of every step (``TrainBatches.share_digest`` summed over the workers)."""
    return {int(step): d for r in records for step, d in r.get("step_batches", {}).items()}


def recover_records(records: list[dict[str, Any]], state: dict[str, Any],
                    checkpoint: str | None) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """``records`` (a run's ``metrics.jsonl``) completed up to the step of a checkpoint's
    trainer ``state`` from the records it carries (``recent_metrics``): a driver lost before
    it wrote them leaves them only there. Returns the records, the steps restored, and the
    steps lost (in neither; a checkpoint of raygpt before 0.4 carries no records)."""
    step = int(state["step"])
    logged = records[-1]["step"] if records else 0
    if logged >= step:
        return records, [], []
    carried = [dict(r) for r in state.get("recent_metrics") or [] if logged < r["step"] <= step]
    for record in carried:
        if record["step"] == step and checkpoint is not None:
            record["checkpoint"] = checkpoint
    records = [*records, *carried]
    restored = sorted(int(k) for r in carried for k in r.get("step_losses", {}) if logged < int(k) <= step)
    have = set(step_losses(records))
    return records, restored, [k for k in range(logged + 1, step + 1) if k not in have]


def describe_steps(steps: list[int]) -> str:
    """``[3, 4, 5, 9]`` -> ``3-5, 9``."""
    spans: list[list[int]] = []
    for step in sorted(steps):
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def startup_times(ray_init_at: float, ray_ready_at: float, fit_at: float,
                  records: list[dict[str, Any]]) -> dict[str, float]:
    """Where a session's time from ``ray.init`` to its first training step went (seconds), from
    the driver's clock at ``ray.init``, after it, and at ``TorchTrainer.fit``, and the first
    report of the session (``records``): ``ray_start_s``; ``driver_s`` (run record, trackers,
    the trainer); ``workers_start_s`` (Ray Train's controller, the worker processes and their
    imports, the process group); the worker's own parts (``checkpoint_fetch_s``, ``model_s``,
    ``data_open_s``, ``checkpoint_load_s``, ``wrap_s``, ``first_batch_s``); ``first_step_s``
    (the first step's call: compilation); ``to_first_step_s``, all of it."""
    times = {"ray_start_s": ray_ready_at - ray_init_at, "driver_s": fit_at - ray_ready_at}
    first = next((r for r in records if "startup" in r), None)
    if first is not None:
        times["workers_start_s"] = first["attempt_started"] - fit_at
        times.update(first["startup"])
        times["to_first_step_s"] = first["first_step_at"] - ray_init_at
    return {k: round(v, 3) for k, v in times.items()}


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
            "checkpoint_stall_s_max": max(stalls) if stalls else None,
            "skipped_steps": sum(len(r.get("skipped_steps", [])) for r in records)}
