"""When a worker saves: every N steps, every M minutes, at the end, and on a preemption notice.

Every rank must take the same decision at the same step (a save is a collective report), so
nothing here depends on a rank's own clock alone: time-based decisions are rank 0's,
broadcast; and the preemption check, itself a collective (``ray.train.get_preemption_info``
in the Ray loop; any callable here), runs every ``check_every`` steps, a count derived from
the step time that all ranks agreed on (the mean over workers from the metrics window). On
a notice the worker saves at once and after every step that follows, until its node goes:
the run then resumes from the last step it finished, recomputing nothing. No Ray import.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.distributed as dist


class SaveSchedule:
    def __init__(self, *, interval_steps: int, interval_minutes: float | None, check_s: float, stop_step: int,
                 world_size: int, device: torch.device, preemption_info: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_steps, self.interval_minutes, self.check_s = interval_steps, interval_minutes, check_s
        self.stop_step, self.world_size, self.device = stop_step, world_size, device
        self.preemption_info = preemption_info
        self.clock = clock
        self.check_every = 1
        """Steps between checks; 1 until the step time is known."""
        self.notice: Any = None
        """The preemption notice, once one arrived (then every step saves)."""
        self.checks = 0
        self.check_seconds = 0.0
        self.last_save = clock()

    def observe_step_time(self, seconds: float) -> None:
        """The mean step time over all workers (identical on every rank): check every
        ``check_s`` seconds of training, counted in steps."""
        self.check_every = max(1, int(self.check_s / max(seconds, 1e-9)))

    def due(self, step: int) -> str | None:
        """Why the state after ``step`` steps is saved (``end``, ``preemption``, ``interval``,
        ``minutes``), or None. Called by every rank after every step."""
        if step >= self.stop_step:
            return "end"
        if self.notice is not None:
            return "preemption"
        if self.interval_steps > 0 and step % self.interval_steps == 0:
            return "interval"
        if step % self.check_every:
            return None
        started = time.perf_counter()
        try:
            if self.preemption_info is not None:
                self.notice = self.preemption_info()
                if self.notice is not None:
                    return "preemption"
            if self.interval_minutes is not None and self._agreed(
                    self.clock() - self.last_save >= 60 * self.interval_minutes):
                return "minutes"
            return None
        finally:
            self.checks += 1
            self.check_seconds += time.perf_counter() - started

    def saved(self) -> None:
        self.last_save = self.clock()

    def _agreed(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank."""
        if self.world_size == 1:
            return flag
        decision = torch.tensor([int(flag)], device=self.device)
        dist.broadcast(decision, src=0)
        return bool(decision.item())
