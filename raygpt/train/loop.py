"""The loop each Ray Train worker runs: step, report, validate, checkpoint.

Everything a step needs is built by ``raygpt.train.step`` without Ray; this module only joins
it to Ray Train: the rank and device Ray assigns, the checkpoint Ray hands over, and
``ray.train.report`` for metrics and checkpoints (uploaded in the background).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode

from raygpt.cluster import FAIL_AT_STEP_ENV, quiet_report_logs
from raygpt.logs import show_messages
from raygpt.storage import Storage, join
from raygpt.train.components import use_device
from raygpt.train.metrics import MetricsWindow, device_name
from raygpt.train.resume import fetch_resume_checkpoint
from raygpt.train.samples import training_samples
from raygpt.train.saving import SaveSchedule
from raygpt.train.step import (
    Worker,
    agreed_setup,
    due,
    nonfinite_stop,
    reserve_checkpoint_buffers,
    set_up_worker,
    start_checkpoint,
    train_step,
    validation_loss,
    weights_finite,
)
from raygpt.weights.layout import checkpoint_dir_name

log = logging.getLogger(__name__)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    started = time.time()
    spec, plan = config["spec"], config["plan"]
    os.environ.update(config["env"])  # the driver's RAYGPT_CACHE_DIR etc.: workers inherit their node's env
    quiet_report_logs()
    show_messages()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = use_device(ray.train.torch.get_device() if plan.use_gpu else "cpu")

    def build() -> Worker:
        # Not Ray's checkpoint (ray.train.get_checkpoint()) as it stands: the newest intact one
        # in the run folder, by the rule the driver planned with (raygpt.train.resume).
        storage = Storage.from_config(spec.storage)
        with tempfile.TemporaryDirectory(prefix="raygpt-resume-") as tmp:
            fetching = time.perf_counter()
            choice, local = fetch_resume_checkpoint(join(spec.storage_path, spec.name), storage, rank, world_size,
                                                    tmp)
            fetched_s = time.perf_counter() - fetching
            w = set_up_worker(spec, plan, rank, world_size, device, local, choice.name, resume=choice)
            w.setup_parts["checkpoint_fetch_s"] = fetched_s
            return w

    w, error = agreed_setup(build, world_size)
    if w is None:
        ray.train.report({"fatal_error": error})
        return
    try:
        run_loop(w, started)
    finally:
        w.close()


def run_loop(w: Worker, attempt_started: float) -> None:
    spec, plan = w.spec, w.plan
    window = MetricsWindow(first_step=w.state.step + 1, world_size=w.world_size,
                           global_batch_tokens=plan.global_batch_tokens, flops_per_token=w.flops_per_token,
                           peak_flops=w.peak_flops, device=w.device)
    saves = SaveSchedule(interval_steps=spec.checkpoint.interval, interval_minutes=spec.checkpoint.interval_minutes,
                         check_s=spec.train.preemption_check_s, stop_step=plan.stop_step, world_size=w.world_size,
                         device=w.device, preemption_info=ray.train.get_preemption_info)
    first_report, first_step_at, first_step_s, noticed = True, None, None, False
    while w.state.step < plan.stop_step:
        inject_fault(w)
        digest = w.batches.share_digest(w.state.step, w.rank, w.world_size, plan.micro_batch_size)
        called = time.perf_counter()
        loss, grad_norm, skipped = train_step(w, w.state.step)
        call_s = time.perf_counter() - called  # the host's time: kernels queued, or compiled first
        window.add(loss, grad_norm, w.schedule.lr_at(w.state.step), digest, skipped, call_s)
        w.state.advance(plan.global_batch_tokens)
        step, last = w.state.step, w.state.step == plan.stop_step
        if first_step_at is None:
            first_step_at, first_step_s = time.time(), call_s
            reserve_checkpoint_buffers(w)

        val_loss, samples, timings = None, None, {}
        if due(step, spec.train.val_interval) or (last and spec.train.val_interval > 0):
            started = time.perf_counter()
            val_loss = validation_loss(w)
            timings["val_s"] = time.perf_counter() - started
            if w.rank == 0 and spec.log.sample_prompts:
                samples = training_samples(w)
                timings["samples_s"] = time.perf_counter() - started - timings["val_s"]
            window.exclude(time.perf_counter() - started)
        reason = saves.due(step)
        if not (due(step, spec.train.log_interval) or reason or val_loss is not None):
            continue
        metrics = window.flush(step, w.state.tokens_seen)
        saves.observe_step_time(window.step_time_s)
        metrics.update(max_steps=plan.max_steps, preemption_checks=saves.checks,
                       preemption_check_s=saves.check_seconds)
        if val_loss is not None:
            metrics.update(val_loss=val_loss, **timings)
        if reason is not None:
            metrics["checkpoint_reason"] = reason
        if reason == "preemption" and not noticed:
            metrics["preemption_notice"] = {"deadline_ms": saves.notice.deadline_ms,
                                            "ranks": saves.notice.preempted_ranks}
            noticed = True
        if samples:
            metrics["samples"] = samples
        if first_report:
            metrics.update(resumed_from_step=w.resumed_from_step, device=device_name(w.device),
                           node=ray.get_runtime_context().get_node_id(),
                           actor=ray.get_runtime_context().get_actor_id(), precision=w.precision.name,
                           world_size=w.world_size, attempt_started=attempt_started, first_step_at=first_step_at,
                           setup_s=w.setup_s, startup={**w.setup_parts, "first_step_s": first_step_s},
                           compile=w.spec.train.compile,
                           carried_records=w.state.carried_metrics)
            if w.resume is not None:
                handed = ray.train.get_checkpoint()
                metrics.update(resumed_from_checkpoint=w.resume.name, checkpoint_checked=w.resume.checked,
                               skipped_checkpoints=[list(s) for s in w.resume.skipped],
                               ray_checkpoint=os.path.basename(handed.path) if handed is not None else None)
            first_report = False
        stop = nonfinite_stop(spec.train, window.skipped_in_a_row, window.first_skipped, step)
        if stop is None and reason is not None and not weights_finite(w.model):
            stop = (f"train: step {step}: the weights are not finite (an update overflowed), so they were not saved: "
                    "lower train.lr and start the run again: it resumes from its newest checkpoint")
        if stop is not None:  # every rank alike: the flags were summed over the workers, the weights are the same
            metrics.pop("checkpoint_reason", None)
            report(w, metrics, save=False, last=True)
            ray.train.report({"fatal_error": stop})
            return
        stall = report(w, metrics, save=reason is not None, durable=reason == "preemption")
        if stall is not None:
            saves.saved()
            saved = {"step": step, "checkpoint_stall_s": sum(stall.values()), "checkpoint_stall_parts": stall}
            if reason == "preemption":  # the UNIX time the checkpoint became durable, to compare with the deadline
                saved["durable_at"] = time.time()
            report(w, saved, save=False)
        window.started = time.perf_counter()


def report(w: Worker, metrics: dict[str, Any], save: bool, durable: bool = False,
           last: bool = False) -> dict[str, float] | None:
    """``ray.train.report`` the metrics and, with ``save``, a checkpoint; when saving, returns
    the seconds the save stalled the loop, by part: ``reports_s`` (held reports sent to Ray
    first), ``previous_write_s`` and ``copy_s`` (``start_checkpoint``), ``other_s`` (the
    folder, and a durable save's wait for its upload).

    The loop waits only for the state's copy into host memory (and for the previous
    checkpoint's write, when it is still running): the files are written in the background,
    and the report that carries them, with every report after it, reaches Ray once every
    rank's files are complete (``Reports``): at the first report that finds them so, at the
    next save, or at the end of the session. Every report of an async run is async: Ray keeps
    reports in order, so a synchronous one would wait for the previous checkpoint's upload.
    ``durable``: return only once the checkpoint is written, uploaded and registered (after a
    preemption notice: the node may go any moment, and the next attempt must find this step).
    ``last``: no report follows (the run stops): send every held report before returning.
    """
    mode = (CheckpointUploadMode.ASYNC if w.spec.checkpoint.async_upload and not durable
            else CheckpointUploadMode.SYNC)

    def send(report_metrics: dict[str, Any], checkpoint: tuple[str, str] | None) -> None:
        if checkpoint is None:
            ray.train.report(report_metrics, checkpoint_upload_mode=mode)
            return
        local, name = checkpoint
        ray.train.report(report_metrics, checkpoint=ray.train.Checkpoint.from_directory(local),
                         checkpoint_dir_name=name, checkpoint_upload_mode=mode)
        if mode is CheckpointUploadMode.SYNC:  # ASYNC deletes the local folder once uploaded
            shutil.rmtree(local, ignore_errors=True)

    if "loss" in metrics:
        w.state.note_metrics(metrics)
    if not save:
        w.reports.add(metrics)
        w.reports.release(send, wait=last or w.state.step == w.plan.stop_step)
        return None
    started = time.perf_counter()
    w.reports.release(send, wait=True)
    parts = {"reports_s": time.perf_counter() - started}
    name = checkpoint_dir_name(w.state.step, taken=w.taken_checkpoint_names())
    local = tempfile.mkdtemp(prefix=f"raygpt-{name}-")
    parts.update(start_checkpoint(w, local))
    w.reports.add(metrics, (local, name))
    if durable:
        w.reports.release(send, wait=True)
    parts["other_s"] = time.perf_counter() - started - sum(parts.values())
    return parts


def inject_fault(w: Worker) -> None:
    """``$RAYGPT_TEST_FAIL_AT_STEP`` (tests only): the last rank dies hard when it reaches that
    step, once per run (a marker next to the checkpoints remembers it), and not in an attempt
    that resumed from a checkpoint at or after that step."""
    k = int(os.environ.get(FAIL_AT_STEP_ENV) or 0)
    if not k or w.rank != w.world_size - 1 or w.state.step != k or w.resumed_from_step >= k:
        return
    storage = Storage.from_config(w.spec.storage)
    marker = join(w.spec.storage_path, w.spec.name, f".fault-injected-at-step-{k}")
    if storage.exists(marker):
        return
    storage.write_text(marker, "fault injection: the last worker exited here\n")
    log.warning("raygpt: fault injection: rank %d exits at step %d", w.rank, k)
    for handler in logging.getLogger("raygpt").handlers:  # os._exit skips logging's own flush
        handler.flush()
    os._exit(1)
