"""Training checkpoints: saving every component's state into a checkpoint folder, and loading it back.

What the folder holds is ``raygpt.weights.layout``'s; whether it is complete and intact, and
which of a run's checkpoints to use, ``raygpt.weights.integrity``'s.

A save is two halves: ``snapshot_training_state`` copies every component's state into host
memory (into reused buffers, pinned on CUDA: the only part a training loop has to wait for),
and ``write_training_snapshot`` writes those copies into the folder, which ``CheckpointWriter``
does in a background thread, hashing each file's bytes as they are written (so a save costs
the loop no hashing). A process killed mid-write leaves a folder without
``trainer_state.json``, which every reader passes over.
"""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import torch
import torch.nn as nn

from raygpt.errors import RaygptError
from raygpt.model import GPT, GPTConfig
from raygpt.storage import write_local_atomically
from raygpt.weights.integrity import checkpoint_problem, state_digest
from raygpt.weights.layout import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_DIGEST,
    TRAINER_STATE_FILE,
    rng_file,
)


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
    nothing after the first, or nothing at all after ``reserve``.

    On CUDA the buffers are pinned and filled by non-blocking copies, then one stream
    synchronisation; elsewhere they are plain copies. Tensors that share memory (tied weights)
    share one copy, so the file holds them once, as ``torch.save`` of the originals would.
    """

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def copy(self, tree: Any) -> Any:
        """``tree`` (nested dicts, lists and tuples) with every tensor replaced by its host copy."""
        devices: set[torch.device] = set()
        copied = self._copy(tree, "", {}, devices)
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        return copied

    def reserve(self, tree: Any) -> None:
        """Allocate (and pin, for CUDA tensors) the buffers ``copy(tree)`` will fill, copying
        nothing: what the first save would otherwise stall for (pinning is page-locking, and a
        gpt2-small state is 1.8 GiB). Only shapes and dtypes are read."""
        self._copy(tree, "", {}, None)

    def _copy(self, value: Any, path: str, shared: dict, devices: set | None) -> Any:
        """Copy ``value``'s tensors into their buffers, or with ``devices`` None only make the buffers."""
        if isinstance(value, torch.Tensor):
            key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                   value.stride(), value.dtype) if value.numel() else None
            if key in shared:
                return shared[key]
            value = value.detach()
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
                buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=value.device.type == "cuda")
                if devices is None:
                    buffer.zero_()  # touch its pages now, or the first copy pays the page faults
                self._buffers[path] = buffer
            if devices is not None:
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


def host_staged_state(model: nn.Module, optimizer: Stateful,
                      full_states: tuple[dict[str, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The part of rank 0's checkpoint that goes through host buffers: the model's and the
    optimizer's state dicts (``full_states`` when the parallel strategy gathered them)."""
    model_state, optimizer_state = full_states or (model.state_dict(), optimizer.state_dict())
    return {"model": model_state, "optimizer": optimizer_state}


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
        states = host.copy(host_staged_state(model, optimizer, full_states))
        snapshot.model, snapshot.optimizer = states["model"], states["optimizer"]
        snapshot.model_config = asdict(model.config)
        snapshot.trainer = json.loads(json.dumps(trainer.state_dict()))  # a copy, and JSON-safe now
    return snapshot


def write_training_snapshot(snapshot: TrainingSnapshot, directory: str | Path) -> None:
    """Write a snapshot's files into the local folder ``directory``.

    ``trainer_state.json`` goes last (atomically, with the size and SHA-256 of every other
    file, every rank's RNG file included, and the SHA-256 of its own fields), so a reader can tell a complete, intact checkpoint
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
    state[STATE_DIGEST] = state_digest(state)
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

    def reserve(self, staged: dict[str, Any]) -> None:
        """Allocate the host buffers for snapshots of ``staged`` (``host_staged_state``) in the
        background thread, while training goes on: the first save's ``wait`` collects it."""
        if self._writing is not None and not self._writing.done():
            raise RuntimeError("CheckpointWriter.reserve: a write is still running; wait() first")
        self._writing = self._thread.submit(self.host.reserve, staged)

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
