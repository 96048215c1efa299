"""Where each stage writes, and the file names that one stage writes and another reads.

A run lives at ``<storage_path>/<name>/`` (checkpoints, ``run.json``, ``metrics.jsonl``); the
stages that compare runs write beside the runs, each in its own folder unless the spec names
another: ``<storage_path>/eval``, ``/ift``, ``/judge``. ``raygpt report`` reads all of them
through these names, so it needs neither the judge nor torch to find its inputs.
"""

from __future__ import annotations

import re

from raygpt.config import RunSpec
from raygpt.storage import join

RUN_RECORD_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
TEST_LOSS_FILE = "test_loss.json"
HELLASWAG_FILE = "hellaswag.json"
ANSWERS_FOLDER = "answers"
JUDGEMENTS_FILE = "judgements.jsonl"
JUDGE_SUMMARY_FILE = "summary.json"

STAGE_FOLDERS = ("eval", "ift", "judge")
"""Default stage folders under ``storage_path``: not training runs."""

REFERENCE_ANCHOR = "@reference"
"""The judge's hidden candidate that answers with the dataset's reference output."""
EMPTY_ANCHOR = "@empty"
"""The judge's hidden candidate that gives an empty answer."""

REPLICATE_MARK = "@seed"
"""Joins a base model's id and a fine-tuning seed into a replicate's id (``gpt2-small@seed2``):
``raygpt ift`` with ``ift.seeds`` names its answers so, the judge pools them back by it."""


def replicate_id(model: str, seed: int | None) -> str:
    """The id of ``model`` fine-tuned with ``seed``; the model's own id when it was fine-tuned once."""
    return model if seed is None else f"{model}{REPLICATE_MARK}{seed}"


def replicate_of(model_id: str) -> tuple[str, int | None]:
    """(base model id, seed) of a replicate's id; ``(model_id, None)`` for a model fine-tuned once."""
    head, mark, tail = model_id.rpartition(REPLICATE_MARK)
    if mark and head and re.fullmatch(r"-?\d+", tail):
        return head, int(tail)
    return model_id, None


def run_dir(spec: RunSpec, name: str | None = None) -> str:
    return join(spec.storage_path, name or spec.name)


def eval_dir(spec: RunSpec) -> str:
    return spec.eval.output or join(spec.storage_path, "eval")


def ift_dir(spec: RunSpec) -> str:
    return spec.ift.output or join(spec.storage_path, "ift")


def answers_dir(spec: RunSpec) -> str:
    return join(ift_dir(spec), ANSWERS_FOLDER)


def judge_dir(spec: RunSpec) -> str:
    return spec.judge.output or join(spec.storage_path, "judge")
