"""Which of a sweep's runs are paired by design, checked rather than assumed.

Runs of one seed read their batches by (seed, step) alone, so they see the same sequences at
every step unless a variant changes what decides them (the global batch, the sequence length,
the dataset); ``data_order`` compares the batch digests every step's record carries. Their
models draw each parameter from a generator seeded by (seed, parameter name)
(``raygpt.model.GPT.init_weights``), so they start equal in every parameter whose name, shape
and initialisation rule they share; ``initialisation`` compares the two models' plans. A
variant is then compared with the baseline seed by seed (common random numbers).
"""

from __future__ import annotations

from typing import Any

import torch

from raygpt.config import RunSpec
from raygpt.model import GPT, config_from_spec


def data_order(variant: dict[int, int], baseline: dict[int, int]) -> dict[str, Any]:
    """Compare two runs' per-step batch digests (step -> digest) over the steps both logged."""
    steps = sorted(set(variant) & set(baseline))
    if not steps:
        return {"same": None, "steps": 0, "first_difference": None}
    differing = [s for s in steps if variant[s] != baseline[s]]
    return {"same": not differing, "steps": len(steps), "first_difference": differing[0] if differing else None}


def initialisation(variant: RunSpec, baseline: RunSpec) -> dict[str, Any]:
    """How much of the baseline's initial model the variant starts from at the same seed: the
    parameters they share by name, shape and rule, and those each has alone or drawn otherwise."""
    plans = []
    for spec in (variant, baseline):
        with torch.device("meta"):  # shapes and rules only
            plans.append(GPT(config_from_spec(spec.model)).init_plan())
    mine, theirs = plans
    shared = [name for name in mine if name in theirs and mine[name] == theirs[name]]
    same_seed = variant.train.seed == baseline.train.seed
    return {"same_seed": same_seed, "shared": len(shared) if same_seed else 0, "parameters": len(mine),
            "baseline_parameters": len(theirs),
            "own": [n for n in mine if n not in theirs], "baseline_only": [n for n in theirs if n not in mine],
            "drawn_otherwise": [n for n in mine if n in theirs and mine[n] != theirs[n]]}
