"""What a training checkpoint folder holds, and how a run's checkpoint folders are named.

A training checkpoint is the sum of the trainer's components, each saved by its own
``state_dict``: rank 0 writes the shared files, every rank its own RNG file, and Ray Train
merges the ranks' folders into one ``checkpoint_<step>/`` under the run::

    model.pt            model state_dict (rank 0)
    optimizer.pt        AdamW state_dict (rank 0)
    model_config.json   GPTConfig fields, enough to rebuild the model (rank 0)
    rng_rank<r>.pt      torch / CUDA / numpy / Python RNG states of rank r (every rank)
    trainer_state.json  step, tokens seen, data cursor, LR schedule, grad scaler, run spec,
                        the metrics reported since the previous checkpoint, the size and
                        SHA-256 of each file above, and the SHA-256 of its own other fields
                        (rank 0, written last)

A save at a step whose folder already exists (a damaged checkpoint that a resume skipped)
goes to ``checkpoint_<step>.<n>``: raygpt deletes an old checkpoint by its folder, so two
checkpoints must never share one.

A model-only folder (``save_model_dir``, used for fine-tuned models) holds just ``model.pt``
and ``model_config.json``.
"""

from __future__ import annotations

import re
from typing import Any

from raygpt.storage import Storage

MODEL_FILE = "model.pt"


OPTIMIZER_FILE = "optimizer.pt"


MODEL_CONFIG_FILE = "model_config.json"


TRAINER_STATE_FILE = "trainer_state.json"


STATE_DIGEST = "state_sha256"
"""The field of ``trainer_state.json`` that holds the SHA-256 of its other fields."""


CHECKPOINT_PREFIX = "checkpoint_"


CHECKPOINT_NAME = re.compile(r"^checkpoint_(\d+)(?:\.(\d+))?$")  # not Ray's checkpoint_manager_snapshot.json


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_dir_name(step: int, taken: Any = ()) -> str:
    """``checkpoint_00001000``: zero-padded so names sort by step; ``checkpoint_00001000.1``
    (.2, ...) when that name is among ``taken`` (folders already in the run)."""
    name = f"{CHECKPOINT_PREFIX}{step:08d}"
    n = 0
    while (candidate := name if n == 0 else f"{name}.{n}") in taken:
        n += 1
    return candidate


def checkpoint_order(name: str) -> tuple[int, int]:
    """(step, rewrite number) of a checkpoint folder name: its place among the run's checkpoints."""
    match = CHECKPOINT_NAME.match(name)
    if match is None:
        raise ValueError(f"{name}: not a checkpoint folder name")
    return int(match.group(1)), int(match.group(2) or 0)


def checkpoint_names(run_uri: str, storage: Storage) -> list[str]:
    """The run's checkpoint folders, newest first."""
    return sorted((n for n in storage.list(run_uri) if CHECKPOINT_NAME.match(n)), key=checkpoint_order, reverse=True)
