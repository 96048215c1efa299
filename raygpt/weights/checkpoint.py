"""Training checkpoints: what a checkpoint folder holds, and finding the newest complete one.

A training checkpoint is the sum of the trainer's components, each saved by its own
``state_dict``: rank 0 writes the shared files, every rank its own RNG file, and Ray Train
merges the ranks' folders into one ``checkpoint_<step>/`` under the run::

    model.pt            model state_dict (rank 0)
    optimizer.pt        AdamW state_dict (rank 0)
    model_config.json   GPTConfig fields, enough to rebuild the model (rank 0)
    rng_rank<r>.pt      torch / CUDA / numpy / Python RNG states of rank r (every rank)
    trainer_state.json  step, tokens seen, data cursor, LR schedule, grad scaler, run spec,
                        and the size of each file above (rank 0, written last)

A save is two halves: ``snapshot_training_state`` copies every component's state into host
memory (into reused buffers, pinned on CUDA: the only part a training loop has to wait for),
and ``write_training_snapshot`` writes those copies into the folder, which ``CheckpointWriter``
does in a background thread. A process killed mid-write leaves a folder without
``trainer_state.json``, which ``latest_checkpoint`` passes over.

A model-only folder (``save_model_dir``, used for fine-tuned models) holds just ``model.pt``
and ``model_config.json``.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

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


CHECKPOINT_NAME = re.compile(r"^checkpoint_\d+$")  # not Ray's checkpoint_manager_snapshot.json


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_00001000``: zero-padded so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainingSnapshot:
    """One rank's part of a training checkpoint, in host memory: what its files will hold.
    The model, optimizer, config and trainer state are rank 0's only (None elsewhere)."""

    rank: int
    rng: dict[str, Any]
    model: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    model_config: dict[str, Any] | None = None
    trainer: dict[str, Any] | None = None


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
    snapshot = TrainingSnapshot(rank=rank, rng=rng.state_dict())
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

    ``trainer_state.json`` goes last (atomically, with the sizes of the tensor files), so a
    reader can tell a complete checkpoint from one cut off mid-write or mid-upload; rank 0
    removes an old one first, so a folder being rewritten never looks complete.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if snapshot.rank != 0:
        torch.save(snapshot.rng, directory / rng_file(snapshot.rank))
        return
    (directory / TRAINER_STATE_FILE).unlink(missing_ok=True)
    torch.save(snapshot.rng, directory / rng_file(snapshot.rank))
    torch.save(snapshot.model, directory / MODEL_FILE)
    torch.save(snapshot.optimizer, directory / OPTIMIZER_FILE)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(snapshot.model_config, indent=2) + "\n")
    state = dict(snapshot.trainer)
    state["files"] = {name: (directory / name).stat().st_size for name in (MODEL_FILE, OPTIMIZER_FILE)}
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
                             trainer: Stateful, rng: Stateful, expected: str, where: str) -> bool:
    """Restore every component from a local checkpoint folder; returns whether this rank's
    RNG state was found (a run resumed on more workers than it was saved with has none for
    the new ranks).

    ``expected`` names what the model should be (e.g. ``model.preset 'nano'``) and ``where``
    the checkpoint, for the message when the checkpoint holds another shape.
    """
    directory = Path(directory)
    state_dict = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    load_state_dict_checked(model, state_dict, where=where, expected=expected)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=device, weights_only=True))
    trainer.load_state_dict(json.loads((directory / TRAINER_STATE_FILE).read_text()))
    rng_path = directory / rng_file(rank)
    if not rng_path.exists():
        return False
    # Our own file, holding numpy's and Python's RNG tuples, which weights_only refuses.
    rng.load_state_dict(torch.load(rng_path, map_location="cpu", weights_only=False))
    return True


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
    """URI of the newest complete checkpoint of a run, or None."""
    names = sorted((n for n in storage.list(run_uri) if CHECKPOINT_NAME.match(n)), reverse=True)
    for name in names:
        if _is_complete(join(run_uri, name), storage):
            return join(run_uri, name)
    return None


def _is_complete(checkpoint_uri: str, storage: Storage) -> bool:
    state_uri = join(checkpoint_uri, TRAINER_STATE_FILE)
    if not storage.exists(state_uri):
        return False
    try:
        expected_sizes = storage.read_json(state_uri).get("files", {})
    except RaygptError:
        return False
    return all(storage.stored_size(join(checkpoint_uri, name)) == size for name, size in expected_sizes.items())


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
