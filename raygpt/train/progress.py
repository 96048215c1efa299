"""The driver's view of a run: a live progress bar on a terminal, a line per report elsewhere.

Text from elsewhere (a worker's error, a checkpoint's problem, model samples, checkpoint
names) is escaped before rich renders it: gloo's ``[/path/pair.cc:553] Connection closed by
peer`` is a closing tag to rich, and an unescaped one raised ``MarkupError`` in the view's
thread. The view never ends while training goes on: an error of its own is logged and the
next report shown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.util.queue import Empty
from rich.console import Console
from rich.markup import escape

from raygpt.train.attempts import describe_attempts
from raygpt.train.plan import TrainPlan
from raygpt.train.sinks import format_samples

logger = logging.getLogger(__name__)


class ProgressView:
    """The driver's view of the metrics stream: a live progress bar on a terminal, one line per
    report otherwise (CI, Ray job logs). A sink of the metrics stream, fed through a Ray queue."""

    def __init__(self, plan: TrainPlan, start_step: int, queue, console=None,
                 attempts: list[dict[str, Any]] | None = None, skipped_checkpoints: list[str] | None = None,
                 on_record: Callable[[dict[str, Any]], None] | None = None):
        self.plan, self.queue = plan, queue
        self.on_record = on_record
        """Called with each record after it is shown (the driver keeps its run record current)."""
        self.announced_skips = set(skipped_checkpoints or [])
        """Damaged checkpoints already named (by the driver's resume check), not to repeat."""
        self.console = console or Console(stderr=False)
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.attempts: list[dict[str, Any]] = list(attempts or [])
        """The run's attempts, as the metrics stream last sent them."""
        self.fatal_error: str | None = None
        self.start_step = start_step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="raygpt-progress", daemon=True)
        self._progress = None
        self._errors_logged: set[str] = set()

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
            try:
                self._drain_once(timeout=0.5)
            except Exception as e:  # the queue itself failed (its actor is gone): try again shortly
                self._log_error("queue", "cannot read the metrics queue", e)
                time.sleep(0.5)

    def _drain_once(self, timeout: float) -> None:
        while True:
            try:
                record = self.queue.get(block=timeout > 0, timeout=timeout or None)
            except Empty:
                return
            try:
                self.show(record)
                if self.on_record is not None:
                    self.on_record(record)
            except Exception as e:  # a record this view cannot show: the next one is shown
                self._log_error("show", f"cannot show a report of step {record.get('step')}", e)
            timeout = 0

    def _log_error(self, where: str, what: str, error: Exception) -> None:
        """Log an error of the view's own: the first of each kind (``where`` and the exception's
        type) with its traceback, the others at debug level."""
        kind = f"{where}: {type(error).__name__}"
        first = kind not in self._errors_logged
        self._errors_logged.add(kind)
        logger.log(logging.WARNING if first else logging.DEBUG, "progress view: %s (%s: %s); training goes on",
                   what, type(error).__name__, error, exc_info=first)

    def show(self, record: dict[str, Any]) -> None:
        if "fatal_error" in record:
            self.fatal_error = record["fatal_error"]
            return
        if record.get("event") == "attempts":
            self.attempts = record["attempts"]
            return
        if "preemption_notice" in record:
            ranks = escape(str(record["preemption_notice"]["ranks"]))
            self._print(f"[yellow]preemption notice for rank(s) {ranks}: saved at "
                        f"step {record['step']}, saving after every step until the node goes[/]")
        if record.get("event") == "worker_failure":
            self.failures.append(record)
            why = escape(f"{record['kind']}: {record['error']}" if record.get("kind") else str(record["error"]))
            self._print(f"[yellow]worker {record['rank']} failed ({why}); Ray Train restarts the workers from the "
                        "last checkpoint[/]")
            return
        fresh_skips = [(n, p) for n, p in record.get("skipped_checkpoints") or [] if n not in self.announced_skips]
        for name, problem in fresh_skips:
            self._print(f"[yellow]the workers skipped checkpoint {escape(str(name))}: {escape(str(problem))}[/]")
            self.announced_skips.add(name)
        if record.get("ray_checkpoint") and record.get("resumed_from_checkpoint") != record["ray_checkpoint"]:
            self._print(escape(f"the workers resumed from {record.get('resumed_from_checkpoint') or 'scratch'}, the "
                               f"newest intact checkpoint, not {record['ray_checkpoint']} from Ray Train's listing"))
        if "resumed_from_step" in record and record["resumed_from_step"] > 0:
            restarts = f" ({describe_attempts(self.attempts)})" if len(self.attempts) > 1 else ""
            self._print(escape(f"resumed from step {record['resumed_from_step']} on {record.get('world_size')} "
                               f"worker(s){restarts}"))
        if "loss" in record:
            self.records.append(record)
        if self.attempts and "step" in record:
            self.attempts[-1]["last_step"] = max(self.attempts[-1]["last_step"], record["step"])
        line = escape(self._line(record))
        if self._progress is not None:
            if "loss" in record:
                self._progress.update(self._task, completed=record["step"], stats=line)
            if "val_loss" in record or "checkpoint_stall_s" in record:
                self._print(f"step {record['step']}: {line}")
        else:
            self._print(f"step {record['step']}/{self.plan.stop_step} {line}")
        if record.get("samples"):
            self._print(escape(format_samples(record["step"], record["samples"])))  # model text is not markup

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
