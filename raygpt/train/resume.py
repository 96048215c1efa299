"""Which checkpoint a worker resumes from: the newest intact one in the run folder, the same on every rank.

Ray Train hands each worker the newest checkpoint of its own listing
(``checkpoint_manager_snapshot.json``), while the driver plans from raygpt's newest intact
checkpoint; after a driver killed mid-upload the two disagree, and Ray's may be damaged
(files cut off, bytes changed). So the workers choose by raygpt's rule, as the driver does:
rank 0 lists the run's checkpoints, every rank downloads the next candidate and checks it
against its ``trainer_state.json`` (sizes, SHA-256), and the ranks take it only when every
one found its copy intact; otherwise they all pass to the next older one. No Ray import.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from raygpt.storage import Storage, join
from raygpt.weights.checkpoint import (
    TRAINER_STATE_FILE,
    ResumeChoice,
    checkpoint_names,
    checkpoint_problem,
    choose_checkpoint,
    stored_checkpoint_problem,
)


def fetch_resume_checkpoint(run_uri: str, storage: Storage, rank: int, world_size: int,
                            local_root: str | Path) -> tuple[ResumeChoice, Path | None]:
    """The checkpoint every rank resumes from, and this rank's checked copy of it under
    ``local_root`` (None for a fresh start). A RaygptError on every rank alike when the run
    has checkpoints but none is intact (``choose_checkpoint``)."""
    names = [checkpoint_names(run_uri, storage) if rank == 0 else None]
    if world_size > 1:
        dist.broadcast_object_list(names, src=0)

    def problem_of(name: str) -> str | None:
        local = Path(local_root) / name
        try:
            problem = stored_checkpoint_problem(join(run_uri, name), storage, hashes=False)
            if problem is None:
                storage.download(join(run_uri, name), local)
                problem = checkpoint_problem(local)
        except Exception as e:  # a rank must reach the collective below whatever happened
            problem = f"cannot be read ({e})"
        problem = _agreed(problem, world_size)
        if problem is not None:
            shutil.rmtree(local, ignore_errors=True)
        return problem

    choice = choose_checkpoint(run_uri, names[0], problem_of)
    if choice.uri is None:
        return choice, None
    local = Path(local_root) / choice.name
    if not json.loads((local / TRAINER_STATE_FILE).read_text()).get("sha256"):
        choice.checked = "sizes"
    return choice, local


def _agreed(problem: str | None, world_size: int) -> str | None:
    """The first rank's problem with its copy (naming the rank), the same on every rank."""
    if world_size == 1:
        return problem
    problems: list[str | None] = [None] * world_size
    dist.all_gather_object(problems, problem)
    return next((p if r == 0 else f"rank {r}'s copy: {p}" for r, p in enumerate(problems) if p is not None), None)
