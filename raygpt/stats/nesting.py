"""Scores laid out by seed level: a model's runs grouped by pretraining seed, each with its fine-tuning seeds.

A base model fine-tuned S times (``ift.seeds``) is one pretraining seed with S runs; a pool
of base models that differ only in their pretraining seed (``judge.pools``) is several, each
with its own fine-tuning runs (as many or as few as it has). The statistics take either.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def by_pretraining_seed(scores: np.ndarray | Sequence[np.ndarray], run_ndim: int, name: str) -> list[np.ndarray]:
    """``scores`` as one float array per pretraining seed, each (fine-tuning seeds, *run shape).

    ``run_ndim`` is how many dimensions one run's scores have (1 for (items,), 2 for (passes,
    items)). An array of ``run_ndim`` dimensions is one run; of ``run_ndim + 1``, one pretraining
    seed's runs; a list or tuple holds one such array per pretraining seed. Every run must
    have the same shape. ``name`` names the statistic in the ValueError.
    """
    if isinstance(scores, (list, tuple)):
        groups = [np.asarray(g, dtype=float) for g in scores]
        groups = [g[None] if g.ndim == run_ndim else g for g in groups]
    else:
        array = np.asarray(scores, dtype=float)
        groups = [array[None] if array.ndim == run_ndim else array]
    if not groups or any(g.ndim != run_ndim + 1 or len(g) == 0 for g in groups):
        raise ValueError(f"{name}: expected runs of {run_ndim} dimension(s), grouped by pretraining seed, got shapes "
                         f"{[g.shape for g in groups]}")
    if len({g.shape[1:] for g in groups}) > 1:
        raise ValueError(f"{name}: the runs' scores differ in shape: {sorted({g.shape[1:] for g in groups})}")
    return groups
