"""The learning-rate schedule: linear warmup to the peak, then cosine decay to a floor.

The rate is a pure function of the optimizer step, so resuming needs no schedule state
beyond the step itself; ``state_dict`` records the shape of the curve so a checkpoint says
which schedule it was trained under.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class WarmupCosine:
    """``lr_at(step)`` for step 0, 1, ...: the rate used by the optimizer step that follows ``step`` steps."""

    lr: float
    """Peak learning rate, reached at the end of warmup."""

    warmup_steps: int
    """Steps of linear warmup; step 0 already gets ``lr / warmup_steps``, never 0."""

    max_steps: int
    """Step at which the cosine reaches ``lr * min_lr_ratio``; the rate stays there afterwards."""

    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of ``lr``."""

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        min_lr = self.lr * self.min_lr_ratio
        decay_steps = self.max_steps - self.warmup_steps
        if step >= self.max_steps or decay_steps <= 0:
            return min_lr
        progress = (step - self.warmup_steps) / decay_steps
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.lr - min_lr)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WarmupCosine:
        return cls(**state)
