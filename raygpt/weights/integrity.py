"""Whether a checkpoint is complete and intact, and which of a run's checkpoints to use.

``trainer_state.json`` is written last and records the size and SHA-256 of every other file
of its checkpoint, and the SHA-256 of its own other fields (``state_sha256``): a folder
without it is a save that never finished; a file of another size, one save cut off; a file
whose bytes hash otherwise, or a trainer state edited by hand, a checkpoint changed since.
``checkpoint_problem`` (a local folder) and ``stored_checkpoint_problem`` (in the store) say
which, and ``newest_intact_checkpoint`` is the one rule every user of a run's checkpoints
follows (a resumed run's driver and workers, ``raygpt eval``, ``sample``, ``export``): the
newest checkpoint with no problem. Older checkpoints may lack the digests: those that record
sizes only are checked for completeness alone, and a trainer state without its own digest is
taken as it is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raygpt.errors import RaygptError
from raygpt.storage import Storage, join
from raygpt.weights.layout import STATE_DIGEST, TRAINER_STATE_FILE, checkpoint_names


class Problem(str):
    """What is wrong with a checkpoint, as a phrase. ``partial``: the save never finished (no
    trainer state, a file missing or of another size), which is also what a folder still being
    written looks like; otherwise the checkpoint is complete but changed since it was written."""

    partial: bool

    def __new__(cls, text: str, partial: bool = False) -> Problem:
        problem = super().__new__(cls, text)
        problem.partial = partial
        return problem


NO_STATE = Problem(f"no {TRAINER_STATE_FILE} (the save was cut off, or the file was lost)", partial=True)


RETRAIN_HINT = "put an intact copy back, or start a new run name (or delete the run folder to train it from scratch)"


def state_digest(state: dict[str, Any]) -> str:
    """The SHA-256 of a trainer state's fields but ``state_sha256``, as canonical JSON: a
    value read back from the file hashes as the one written."""
    fields = {k: v for k, v in state.items() if k != STATE_DIGEST}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def state_problem(state: dict[str, Any]) -> Problem | None:
    """What is wrong with a trainer state's own fields (None: nothing, or a state written
    before it carried its digest)."""
    recorded = state.get(STATE_DIGEST)
    if recorded is not None and recorded != state_digest(state):
        return Problem(f"{TRAINER_STATE_FILE} differs from the SHA-256 it records of itself (edited or changed "
                       "after the save)")
    return None


def files_problem(state: dict[str, Any], size_of: Callable[[str], int | None],
                  digest_of: Callable[[str], str] | None) -> Problem | None:
    """What is wrong with a checkpoint against what its ``trainer_state.json`` records (None:
    nothing). Sizes first, for every file (cheap), then the state's own digest, then the
    files' digests unless ``digest_of`` is None. A checkpoint without digests (an older
    raygpt's) is checked by sizes alone."""
    sizes, digests = state.get("files") or {}, state.get("sha256") or {}
    for name, size in sizes.items():
        actual = size_of(name)
        if actual is None:
            return Problem(f"{name} is missing", partial=True)
        if actual != size:
            return Problem(f"{name} holds {actual} bytes but {TRAINER_STATE_FILE} records {size} (cut off or "
                           "truncated)", partial=True)
    problem = state_problem(state)
    if problem is not None or digest_of is None:
        return problem
    for name, digest in digests.items():
        if digest_of(name) != digest:
            return Problem(f"{name} differs from the SHA-256 its {TRAINER_STATE_FILE} records (its bytes changed "
                           "after the save)")
    return None


def _unreadable_state() -> Problem:
    return Problem(f"{TRAINER_STATE_FILE} is not valid JSON", partial=True)


def checkpoint_problem(directory: str | Path) -> Problem | None:
    """What is wrong with a local checkpoint folder (None: complete and intact)."""
    directory = Path(directory)
    try:
        state = json.loads((directory / TRAINER_STATE_FILE).read_text())
    except FileNotFoundError:
        return NO_STATE
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _unreadable_state()

    def size_of(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.is_file() else None

    return files_problem(state, size_of, lambda name: Storage().sha256(str(directory / name)))


def stored_checkpoint_problem(uri: str, storage: Storage, hashes: bool = True) -> Problem | None:
    """What is wrong with a checkpoint in the store (None: complete and, with ``hashes``,
    intact: every file is read and hashed, streaming). Without ``hashes`` it reads no file
    but ``trainer_state.json``."""
    sizes = storage.file_sizes(uri)
    if TRAINER_STATE_FILE not in sizes:
        return NO_STATE
    try:
        state = storage.read_json(join(uri, TRAINER_STATE_FILE))
    except RaygptError:
        return _unreadable_state()
    return files_problem(state, sizes.get, (lambda name: storage.sha256(join(uri, name))) if hashes else None)


def latest_checkpoint(run_uri: str, storage: Storage) -> str | None:
    """URI of the newest complete checkpoint of a run (its files there with their recorded
    sizes, its trainer state unchanged), or None. Cheap: no file is read but
    ``trainer_state.json``; ``newest_intact_checkpoint`` hashes every file too."""
    for name in checkpoint_names(run_uri, storage):
        if stored_checkpoint_problem(join(run_uri, name), storage, hashes=False) is None:
            return join(run_uri, name)
    return None


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from (or a reader loads), and those newer ones it passed over."""

    uri: str | None
    """None: no checkpoint to resume from (a new run, or only saves cut off before their end)."""
    skipped: list[tuple[str, str]]
    """(folder name, what is wrong with it), newest first."""
    checked: str = "sha256"
    """How the chosen one was checked: ``sha256``, or ``sizes`` for one saved before digests."""

    @property
    def name(self) -> str | None:
        return self.uri.rstrip("/").rsplit("/", 1)[-1] if self.uri else None


def choose_checkpoint(run_uri: str, names: list[str], problem_of: Callable[[str], str | None],
                      hint: str = RETRAIN_HINT) -> ResumeChoice:
    """The first of ``names`` (newest first) for which ``problem_of`` finds nothing wrong.

    A RaygptError (ending with ``hint``) when there are checkpoints but none is intact.
    Saves cut off before their end (a partial folder: no ``trainer_state.json``, or a file
    missing or short, as the first save of a run killed mid-upload leaves it) do not count:
    when they are all there is, the choice is None, and whoever asked decides whether the
    run's records allow starting over.
    """
    skipped: list[tuple[str, str]] = []
    for name in names:
        problem = problem_of(name)
        if problem is None:
            return ResumeChoice(join(run_uri, name), skipped)
        skipped.append((name, problem))
    if not all(getattr(problem, "partial", False) for _, problem in skipped):
        raise RaygptError(f"run {run_uri}: none of its {len(skipped)} checkpoint(s) is intact ("
                          + "; ".join(f"{name}: {problem}" for name, problem in skipped) + f"): {hint}")
    return ResumeChoice(None, skipped)


def newest_intact_checkpoint(run_uri: str, storage: Storage, hint: str = RETRAIN_HINT) -> ResumeChoice:
    """The newest complete and intact checkpoint of a run in the store (every file hashed)."""
    choice = choose_checkpoint(run_uri, checkpoint_names(run_uri, storage),
                               lambda name: stored_checkpoint_problem(join(run_uri, name), storage), hint)
    if choice.uri is not None and not storage.read_json(join(choice.uri, TRAINER_STATE_FILE)).get("sha256"):
        choice.checked = "sizes"
    return choice
