"""Training checkpoints: what a checkpoint folder holds, and finding the newest complete one.

A training checkpoint is the sum of the trainer's components, each saved by its own
``state_dict``: rank 0 writes the shared files, every rank its own RNG file, and Ray Train
merges the ranks' folders into one ``checkpoint_<step>/`` under the run::

    model.pt            model state_dict (rank 0)
    optimizer.pt        AdamW state_dict (rank 0)
    model_config.json   GPTConfig fields, enough to rebuild the model (rank 0)
    rng_rank<r>.pt      torch / CUDA / numpy / Python RNG states of rank r (every rank)
    trainer_state.json  step, tokens seen, data cursor, LR schedule, grad scaler, run spec,
                        the metrics reported since the previous checkpoint, and the size and
                        SHA-256 of each file above (rank 0, written last)

A save is two halves: ``snapshot_training_state`` copies every component's state into host
memory (into reused buffers, pinned on CUDA: the only part a training loop has to wait for),
and ``write_training_snapshot`` writes those copies into the folder, which ``CheckpointWriter``
does in a background thread, hashing each file's bytes as they are written (so a save costs
the loop no hashing). A process killed mid-write leaves a folder without
``trainer_state.json``, which ``latest_checkpoint`` passes over; ``checkpoint_problem`` also
tells a truncated file or one whose bytes changed after the save (by its SHA-256), and
``choose_resume_checkpoint`` picks the newest checkpoint with no problem. Checkpoints of
raygpt 0.1 to 0.3 record sizes only: they are checked for completeness alone.

A save at a step whose folder already exists (a damaged checkpoint that a resume skipped)
goes to ``checkpoint_<step>.<n>``: Ray Train deletes an old checkpoint by its folder, so two
of its checkpoints must never share one.

A model-only folder (``save_model_dir``, used for fine-tuned models) holds just ``model.pt``
and ``model_config.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import torch
import torch.nn as nn

from raygpt.errors import RaygptError
from raygpt.model import GPT, GPTConfig
from raygpt.storage import Storage, join, write_local_atomically

MODEL_FILE = "model.pt"


OPTIMIZER_FILE = "optimizer.pt"


MODEL_CONFIG_FILE = "model_config.json"


TRAINER_STATE_FILE = "trainer_state.json"


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


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainingSnapshot:
    """One rank's part of a training checkpoint, in host memory: what its files will hold.
    The model, optimizer, config and trainer state are rank 0's only (None elsewhere)."""

    rank: int
    rng: bytes
    """The RNG file's bytes (a few KB: serialised at once, so its digest is known to every rank)."""
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    trainer: dict[str, Any] | None = None
    peer_files: dict[str, FileRecord] | None = None
    """Rank 0 only: the RNG files of the other ranks, which they write, for its record."""

    @property
    def rng_record(self) -> FileRecord:
        return FileRecord(rng_file(self.rank), len(self.rng), hashlib.sha256(self.rng).hexdigest())


@dataclass(frozen=True)
class FileRecord:
    """A checkpoint file as ``trainer_state.json`` records it."""

    name: str
    size: int
    sha256: str


class HashingWriter:
    """A binary file that hashes what goes through it: ``torch.save`` writes a checkpoint file
    once, and its SHA-256 comes with it (hashlib releases the GIL, so the loop runs meanwhile)."""

    def __init__(self, file: BinaryIO):
        self.file, self.digest, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(memoryview(data).cast("B"))
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def write_hashed(path: Path, write: Callable[[HashingWriter], Any]) -> FileRecord:
    with open(path, "wb") as f:
        writer = HashingWriter(f)
        write(writer)
    return FileRecord(path.name, writer.size, writer.digest.hexdigest())


def serialize_rng(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


class HostCopies:
    """Host-memory copies of device tensors, kept between saves so a save allocates (and pins)
    nothing after the first.

    On CUDA the buffers are pinned and filled by non-blocking copies, then one stream
    synchronisation; elsewhere they are plain copies. Tensors that share memory (tied weights)
    share one copy, so the file holds them once, as ``torch.save`` of the originals would.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, tree: Any) -> Any:
        """``tree`` (nested dicts, lists and tuples) with every tensor replaced by its host copy."""
        shared: dict[tuple, torch.Tensor] = {}
        devices: set[torch.device] = set()
        copied = self._copy(tree, "", shared, devices)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return copied

    def _copy(self, value: Any, path: str, shared: dict, devices: set) -> Any:
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   value.stride(), value.dtype) if value.numel() else None
            if key in shared:
                return shared[key]
            value = value.detach()
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.device.type == "cuda")
                self._buffers[path] = buffer
            buffer.copy_(value, non_blocking=value.device.type == "cuda")
            if value.device.type == "cuda":
                devices.add(value.device)
            if key is not None:
                shared[key] = buffer
            return buffer
        if isinstance(value, dict):
            return {k: self._copy(v, f"{path}/{k}", shared, devices) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self._copy(v, f"{path}/{i}", shared, devices) for i, v in enumerate(value))
        return value


def snapshot_training_state(rank: int, *, model: nn.Module, optimizer: Stateful, trainer: Stateful,
                            rng: Stateful, host: HostCopies | None = None,
                            full_states: tuple[dict[str, Any], dict[str, Any]] | None = None) -> TrainingSnapshot:
    """This rank's part of a checkpoint, copied to host memory (``host`` keeps the buffers
    between saves): once it returns, training may change the live state. ``full_states``: the
    (model, optimizer) state dicts to store on rank 0 when the parallel strategy gathered them;
    else the module's and optimizer's own."""
    snapshot = TrainingSnapshot(rank=rank, rng=serialize_rng(rng.state_dict()))
    if rank == 0:
        host = host or HostCopies()
        model_state, optimizer_state = full_states or (model.state_dict(), optimizer.state_dict())
        states = host.copy({"model": model_state, "optimizer": optimizer_state})
        snapshot.model, snapshot.optimizer = states["model"], states["optimizer"]
        snapshot.model_config = asdict(model.config)
        snapshot.trainer = json.loads(json.dumps(trainer.state_dict()))  # a copy, and JSON-safe now
    return snapshot


def write_training_snapshot(snapshot: TrainingSnapshot, directory: str | Path) -> None:
    """Write a snapshot's files into the local folder ``directory``.

    ``trainer_state.json`` goes last (atomically, with the size and SHA-256 of every other
    file, every rank's RNG file included), so a reader can tell a complete, intact checkpoint
    from one cut off mid-write or mid-upload, or changed since; rank 0 removes an old one
    first, so a folder being rewritten never looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if snapshot.rank != 0:
        (directory / rng_file(snapshot.rank)).write_bytes(snapshot.rng)
        return
    (directory / TRAINER_STATE_FILE).unlink(missing_ok=True)
    (directory / rng_file(0)).write_bytes(snapshot.rng)
    config_bytes = (json.dumps(snapshot.model_config, indent=2) + "\n").encode()
    records = [snapshot.rng_record, *(snapshot.peer_files or {}).values(),
               write_hashed(directory / MODEL_FILE, lambda f: torch.save(snapshot.model, f)),
               write_hashed(directory / OPTIMIZER_FILE, lambda f: torch.save(snapshot.optimizer, f)),
               write_hashed(directory / MODEL_CONFIG_FILE, lambda f: f.write(config_bytes))]
    state = dict(snapshot.trainer)
    state["files"] = {r.name: r.size for r in records}
    state["sha256"] = {r.name: r.sha256 for r in records}
    write_local_atomically(directory / TRAINER_STATE_FILE,
                           lambda tmp: tmp.write_text(json.dumps(state, indent=2) + "\n"))


def save_training_checkpoint(directory: str | Path, rank: int, *, model: nn.Module, optimizer: Stateful,
                             trainer: Stateful, rng: Stateful) -> None:
    """Write this rank's part of a training checkpoint into the local folder ``directory``, now.

    ``trainer.state_dict()`` must be JSON-serialisable (step, tokens, schedule, data cursor).
    """
    write_training_snapshot(snapshot_training_state(rank, model=model, optimizer=optimizer, trainer=trainer,
                                                    rng=rng), directory)


class CheckpointWriter:
    """Writes snapshots in a background thread, one at a time, so a training loop waits only
    for ``snapshot_training_state``. ``host`` holds the reused buffers: a new snapshot must wait
    for the previous write (``wait``), which reads them."""

    def __init__(self):
        self.host = HostCopies()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="raygpt-checkpoint")
        self._writing: Future | None = None

    def start(self, snapshot: TrainingSnapshot, directory: str | Path) -> None:
        """Write ``snapshot`` into ``directory`` in the background."""
        if self._writing is not None and not self._writing.done():
            raise RuntimeError("CheckpointWriter.start: the previous write is still running; wait() first")
        self._writing = self._thread.submit(write_training_snapshot, snapshot, directory)

    def busy(self) -> bool:
        """Whether a write has been started and not yet waited for."""
        return self._writing is not None

    def done(self) -> bool:
        """Whether the last write has finished (or none was started)."""
        return self._writing is None or self._writing.done()

    def wait(self) -> None:
        """Wait for the last write; raises what it raised (a full disk, say)."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self) -> None:
        """Let a running write finish, then stop the thread."""
        self._thread.shutdown(wait=True)


def load_training_checkpoint(directory: str | Path, rank: int, *, model: nn.Module, optimizer: Stateful,
                             trainer: Stateful, rng: Stateful, expected: str, where: str,
                             verified: bool = False) -> bool:
    """Restore every component from a local checkpoint folder; returns whether this rank's
    RNG state was found (a run resumed on more workers than it was saved with has none for
    the new ranks).

    ``expected`` names what the model should be (e.g. ``model.preset 'nano'``) and ``where``
    the checkpoint, for the message when the checkpoint holds another shape.

    The folder is checked first (``checkpoint_problem``): a RaygptError names the file that is
    missing, cut off or changed since it was written. ``verified``: the caller has just
    checked it (the resume choice does), so its files are not hashed twice.
    """
    directory = Path(directory)
    if not verified:
        problem = checkpoint_problem(directory)
        if problem is not None:
            raise RaygptError(f"checkpoint {where}: {problem}; resume from another checkpoint or start a new run name")
    state_dict = _load_file(directory / MODEL_FILE, where, map_location="cpu")
    load_state_dict_checked(model, state_dict, where=where, expected=expected)
    device = next(model.parameters()).device
    optimizer.load_state_dict(_load_file(directory / OPTIMIZER_FILE, where, map_location=device))
    trainer.load_state_dict(json.loads((directory / TRAINER_STATE_FILE).read_text()))
    rng_path = directory / rng_file(rank)
    if not rng_path.exists():
        return False
    # Our own file, holding numpy's and Python's RNG tuples, which weights_only refuses.
    rng.load_state_dict(torch.load(rng_path, map_location="cpu", weights_only=False))
    return True


def _load_file(path: Path, where: str, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a damaged archive: torch raises several types
        raise RaygptError(f"checkpoint {where}: cannot read {path.name} ({e}); resume from another checkpoint or "
                          "start a new run name") from None


RESUME_HINT = "resume with the model settings it was trained with, or start a new run name"


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], *, where: str,
                            expected: str, hint: str = RESUME_HINT) -> None:
    """``model.load_state_dict`` with one clear message naming the first tensor that does not fit."""
    check_state_shapes({k: v.shape for k, v in model.state_dict().items()},
                       {k: v.shape for k, v in state_dict.items()}, where=where, expected=expected, hint=hint)
    model.load_state_dict(state_dict)


def check_state_shapes(own: dict[str, torch.Size], saved: dict[str, torch.Size], *, where: str,
                       expected: str, hint: str = RESUME_HINT) -> None:
    """Raise a RaygptError naming the first tensor of ``saved`` missing from, extra to, or shaped
    unlike ``own`` (the model ``expected`` describes)."""
    for name, shape in saved.items():
        if name in own and tuple(shape) != tuple(own[name]):
            raise RaygptError(f"checkpoint {where} holds {name} of shape {tuple(shape)} but {expected} "
                              f"expects {tuple(own[name])}: {hint}")
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {_some(missing)}")
        if unexpected:
            parts.append(f"holds unexpected {_some(unexpected)}")
        raise RaygptError(f"checkpoint {where} {' and '.join(parts)}, so it does not fit {expected}: {hint}")


def _some(names: list[str]) -> str:
    shown = ", ".join(names[:3])
    return shown + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")


def model_config_from_dict(raw: dict[str, Any], where: str) -> GPTConfig:
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RaygptError(f"{where}: unknown model config fields {', '.join(unknown)}")
    try:
        return GPTConfig(**raw)
    except (TypeError, ValueError) as e:
        raise RaygptError(f"{where}: invalid model config ({e})") from None


def latest_checkpoint(run_uri: str, storage: Storage) -> str | None:
    """URI of the newest complete checkpoint of a run (its files there, with their recorded
    sizes), or None. Cheap: no file is read but ``trainer_state.json``."""
    for name in checkpoint_names(run_uri, storage):
        if stored_checkpoint_problem(join(run_uri, name), storage, hashes=False) is None:
            return join(run_uri, name)
    return None


def files_problem(state: dict[str, Any], size_of: Callable[[str], int | None],
                  digest_of: Callable[[str], str] | None) -> str | None:
    """What is wrong with a checkpoint's files against what its ``trainer_state.json`` records
    (None: nothing). Sizes first, for every file (cheap), then digests, unless ``digest_of``
    is None. A checkpoint without digests (raygpt before 0.4) is checked by sizes alone."""
    sizes, digests = state.get("files") or {}, state.get("sha256") or {}
    for name, size in sizes.items():
        actual = size_of(name)
        if actual is None:
            return f"{name} is missing"
        if actual != size:
            return f"{name} holds {actual} bytes but {TRAINER_STATE_FILE} records {size} (cut off or truncated)"
    if digest_of is not None:
        for name, digest in digests.items():
            if digest_of(name) != digest:
                return f"{name} differs from the SHA-256 its {TRAINER_STATE_FILE} records (its bytes changed after " \
                       "the save)"
    return None


NO_STATE = f"no {TRAINER_STATE_FILE} (the save was cut off, or the file was lost)"


def checkpoint_problem(directory: str | Path) -> str | None:
    """What is wrong with a local checkpoint folder (None: complete and intact)."""
    directory = Path(directory)
    try:
        state = json.loads((directory / TRAINER_STATE_FILE).read_text())
    except FileNotFoundError:
        return NO_STATE
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{TRAINER_STATE_FILE} is not valid JSON"

    def size_of(name: str) -> int | None:
        path = directory / name
        return path.stat().st_size if path.is_file() else None

    return files_problem(state, size_of, lambda name: Storage().sha256(str(directory / name)))


def stored_checkpoint_problem(uri: str, storage: Storage, hashes: bool = True) -> str | None:
    """What is wrong with a checkpoint in the store (None: complete and, with ``hashes``,
    intact: every file is read and hashed, streaming)."""
    state_uri = join(uri, TRAINER_STATE_FILE)
    sizes = storage.file_sizes(uri)
    if TRAINER_STATE_FILE not in sizes:
        return NO_STATE
    try:
        state = storage.read_json(state_uri)
    except RaygptError:
        return f"{TRAINER_STATE_FILE} is not valid JSON"
    return files_problem(state, sizes.get, (lambda name: storage.sha256(join(uri, name))) if hashes else None)


@dataclass
class ResumeChoice:
    """The checkpoint a run resumes from, and those newer ones it passed over."""

    uri: str | None
    """None: no checkpoint to resume from (a new run, or only saves cut off before their end)."""
    skipped: list[tuple[str, str]]
    """(folder name, what is wrong with it), newest first."""
    checked: str = "sha256"
    """How the chosen one was checked: ``sha256``, or ``sizes`` for one saved before digests."""

    @property
    def name(self) -> str | None:
        return self.uri.rstrip("/").rsplit("/", 1)[-1] if self.uri else None


def describe_skipped(skipped: list[tuple[str, str]]) -> str:
    return "; ".join(f"skipped {name}: {problem}" for name, problem in skipped)


def choose_checkpoint(run_uri: str, names: list[str], problem_of: Callable[[str], str | None]) -> ResumeChoice:
    """The first of ``names`` (newest first) for which ``problem_of`` finds nothing wrong.

    A RaygptError when there are checkpoints but none is intact: training from scratch would
    throw the run away. Folders that never got a ``trainer_state.json`` (every save cut off
    before its end: the first save of a run killed mid-upload) do not count: the run starts over.
    """
    skipped: list[tuple[str, str]] = []
    for name in names:
        problem = problem_of(name)
        if problem is None:
            return ResumeChoice(join(run_uri, name), skipped)
        skipped.append((name, problem))
    if any(problem != NO_STATE for _, problem in skipped):
        raise RaygptError(f"run {run_uri}: none of its {len(skipped)} checkpoint(s) is intact ("
                          + "; ".join(f"{name}: {problem}" for name, problem in skipped)
                          + "): put an intact copy back, or start a new run name (or delete the run folder to "
                            "train it from scratch)")
    return ResumeChoice(None, skipped)


def choose_resume_checkpoint(run_uri: str, storage: Storage) -> ResumeChoice:
    """The newest complete and intact checkpoint of a run in the store (every file hashed)."""
    choice = choose_checkpoint(run_uri, checkpoint_names(run_uri, storage),
                               lambda name: stored_checkpoint_problem(join(run_uri, name), storage))
    if choice.uri is not None and not storage.read_json(join(choice.uri, TRAINER_STATE_FILE)).get("sha256"):
        choice.checked = "sizes"
    return choice


def save_model_dir(model: GPT, config: GPTConfig, path: str | Path) -> None:
    """A model-only folder (``model.pt`` + ``model_config.json``) that ``load_model`` reads.

    The config is written last, so a folder with it is complete.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    write_local_atomically(directory / MODEL_FILE, lambda tmp: torch.save(state_dict, tmp))
    write_local_atomically(directory / MODEL_CONFIG_FILE,
                           lambda tmp: tmp.write_text(json.dumps(asdict(config), indent=2) + "\n"))
