"""Learning-rate schedules: a registry of warmup-then-decay curves, chosen by ``train.schedule``.

Every schedule is a pure function of the optimizer step, so resuming needs no schedule state
beyond the step itself; ``state_dict`` records the curve's name and shape so a checkpoint says
which schedule it was trained under. Adding one is a class here and an entry in ``SCHEDULES``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Schedule:
    """``lr_at(step)`` for step 0, 1, ...: the rate used by the optimizer step that follows ``step`` steps.

    Linear warmup for ``warmup_steps``, then ``decay(progress)`` from ``lr`` to the floor
    ``lr * min_lr_ratio``, progress running from 0 at the end of warmup to 1 at ``max_steps``.
    """

    lr: float
    """Peak learning rate, reached at the end of warmup."""

    warmup_steps: int
    """Steps of linear warmup; step 0 already gets ``lr / warmup_steps``, never 0."""

    max_steps: int
    """Step at which the decay reaches its floor; the rate stays there afterwards."""

    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of ``lr``."""

    name = ""

    def decay(self, progress: float) -> float:
        """Fraction of the way from the peak (1) to the floor (0) at ``progress`` in [0, 1]."""
        raise NotImplementedError

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        decay_steps = self.max_steps - self.warmup_steps
        if step >= self.max_steps or decay_steps <= 0:
            return min_lr
        return min_lr + self.decay((step - self.warmup_steps) / decay_steps) * (self.lr - min_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Schedule:
        shape = {k: v for k, v in state.items() if k not in ("name", "next_lr")}
        return SCHEDULES.get(state.get("name"), cls)(**shape)


class WarmupCosine(Schedule):
    """Cosine decay (GPT-2/3, nanoGPT, the book)."""

    name = "cosine"

    def decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinear(Schedule):
    """Linear decay to the floor."""

    name = "linear"

    def decay(self, progress: float) -> float:
        return 1.0 - progress


class WarmupConstant(Schedule):
    """No decay: the peak rate until the end (the floor is never reached)."""

    name = "constant"

    def decay(self, progress: float) -> float:
        return 1.0


class WarmupStableDecay(Schedule):
    """Warmup-stable-decay (MiniCPM, DeepSeek): the peak rate, then a linear cooldown over the
    last fifth of the steps after warmup."""

    name = "wsd"
    cooldown_fraction = 0.2

    def decay(self, progress: float) -> float:
        start = 1.0 - self.cooldown_fraction
        return 1.0 if progress < start else (1.0 - progress) / self.cooldown_fraction


SCHEDULES: dict[str, type[Schedule]] = {s.name: s for s in (WarmupCosine, WarmupLinear, WarmupConstant,
                                                             WarmupStableDecay)}
"""Schedules by the name ``train.schedule`` gives them."""


def build_schedule(name: str, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Schedule:
    return SCHEDULES[name](lr, warmup_steps, max_steps, min_lr_ratio)
