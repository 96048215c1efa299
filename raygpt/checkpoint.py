"""Checkpoints: what a training checkpoint folder holds, and loading a model from any reference.

A training checkpoint is the sum of the trainer's components, each saved by its own
``state_dict``: rank 0 writes the shared files, every rank its own RNG file, and Ray Train
merges the ranks' folders into one ``checkpoint_<step>/`` under the run::

    model.pt            model state_dict (rank 0)
    optimizer.pt        AdamW state_dict (rank 0)
    model_config.json   GPTConfig fields, enough to rebuild the model (rank 0)
    rng_rank<r>.pt      torch / CUDA / numpy / Python RNG states of rank r (every rank)
    trainer_state.json  step, tokens seen, data cursor, LR schedule, grad scaler, run spec,
                        and the size of each file above (rank 0, written last)

A model-only folder (``save_model_dir``, used for fine-tuned models) holds just ``model.pt``
and ``model_config.json``. ``load_model`` accepts a run name, a run folder, a checkpoint or
model folder (local or ``s3://``), or ``openai:NAME``.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Protocol

import pyarrow.fs as pafs
import torch
import torch.nn as nn

from raygpt.errors import RaygptError
from raygpt.model import GPT, GPTConfig
from raygpt.storage import Storage, explain_storage_error, is_remote, join

MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
MODEL_CONFIG_FILE = "model_config.json"
TRAINER_STATE_FILE = "trainer_state.json"
CHECKPOINT_PREFIX = "checkpoint_"
CHECKPOINT_NAME = re.compile(r"^checkpoint_\d+$")  # not Ray's checkpoint_manager_snapshot.json
OPENAI_PREFIX = "openai:"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def checkpoint_dir_name(step: int) -> str:
    """``checkpoint_00001000``: zero-padded so names sort by step."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def save_training_checkpoint(directory: str | Path, rank: int, *, model: nn.Module, optimizer: Stateful,
                             trainer: Stateful, rng: Stateful) -> None:
    """Write this rank's part of a training checkpoint into the local folder ``directory``.

    ``trainer.state_dict()`` must be JSON-serialisable (step, tokens, schedule, data cursor);
    it is written last, with the sizes of the tensor files, so a reader can tell a complete
    checkpoint from one cut off mid-upload.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng.state_dict(), directory / rng_file(rank))
    if rank != 0:
        return
    torch.save(model.state_dict(), directory / MODEL_FILE)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = dict(trainer.state_dict())
    state["files"] = {name: (directory / name).stat().st_size for name in (MODEL_FILE, OPTIMIZER_FILE)}
    (directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")


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


# ---------------------------------------------------------------------------------------------
# Finding checkpoints in storage


def list_checkpoints(run_uri: str, storage: Storage) -> list[str]:
    """URIs of the complete checkpoints of a run, oldest first.

    A checkpoint is complete when its ``trainer_state.json`` is there and every file it lists
    has the recorded size: an upload cut off by a lost node leaves an incomplete one behind.
    """
    names = sorted(n for n in storage.list(run_uri) if CHECKPOINT_NAME.match(n))
    return [join(run_uri, n) for n in names if _is_complete(join(run_uri, n), storage)]


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
    return all(stored_size(join(checkpoint_uri, name), storage) == size for name, size in expected_sizes.items())


def stored_size(uri: str, storage: Storage) -> int | None:
    """Size in bytes of a stored file, or None when there is none."""
    fs, path = storage.resolve(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise RaygptError(explain_storage_error(uri, "check", e)) from None
    return info.size if info.type == pafs.FileType.File else None


def resolve_model_folder(ref: str, storage_path: str, storage: Storage) -> str:
    """The folder holding ``model.pt`` for a run name, a run folder, or a checkpoint/model folder."""
    candidates = [ref] if (is_remote(ref) or "/" in ref or Path(ref).exists()) else []
    candidates.append(join(storage_path, ref))
    for uri in candidates:
        if storage.exists(join(uri, MODEL_FILE)):
            return uri
        latest = latest_checkpoint(uri, storage)
        if latest is not None:
            return latest
    looked = " or ".join(candidates)
    raise RaygptError(f"model {ref!r}: no checkpoint found at {looked} (expected a run with a complete "
                      f"{CHECKPOINT_PREFIX}* folder, or a folder with {MODEL_FILE}); "
                      "check the name and storage_path, or use openai:gpt2")


# ---------------------------------------------------------------------------------------------
# Models for evaluation, fine-tuning and export


def model_id(ref: str) -> str:
    """A short, filesystem-safe display name: ``openai:gpt2`` -> ``openai-gpt2``; a run name
    stays itself; a folder gives its name, prefixed with its run's for ``checkpoint_*`` folders."""
    if ref.startswith(OPENAI_PREFIX):
        name = "openai-" + ref[len(OPENAI_PREFIX):]
    else:
        parts = [p for p in ref.rstrip("/").split("/") if p and p != "s3:"]
        name = parts[-1] if parts else ref
        if name.startswith(CHECKPOINT_PREFIX) and len(parts) > 1:
            name = f"{parts[-2]}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def describe_model(ref: str, spec: Any, storage: Storage) -> tuple[GPTConfig, str | None]:
    """A model's architecture and its folder, without loading any weights (cheap: one JSON read)."""
    if ref.startswith(OPENAI_PREFIX):
        from raygpt.hf import OPENAI_MODELS
        from raygpt.model import PRESETS

        name = ref[len(OPENAI_PREFIX):]
        if name not in OPENAI_MODELS:
            raise RaygptError(f"{ref}: unknown OpenAI model (known: {', '.join(OPENAI_MODELS)})")
        base = PRESETS[OPENAI_MODELS[name]]
        return GPTConfig(**{**asdict(base), "qkv_bias": True, "tie_weights": True}), None
    folder = resolve_model_folder(ref, spec.storage_path, storage)
    config_uri = join(folder, MODEL_CONFIG_FILE)
    if not storage.exists(config_uri):
        raise RaygptError(f"{folder}: no {MODEL_CONFIG_FILE}, so the model's shape is unknown")
    return model_config_from_dict(storage.read_json(config_uri), config_uri), folder


def load_model(ref: str, spec: Any, storage: Storage, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model in eval mode on ``device`` and a description of it.

    ``ref``: a run name under ``spec.storage_path`` (its newest complete checkpoint), a run,
    checkpoint or model folder (local or ``s3://``), or ``openai:NAME``. The description holds
    ``id``, ``ref``, ``params``, ``step``, ``tokens``, ``checkpoint`` (the folder, None for
    OpenAI's) and ``config`` (GPTConfig fields).
    """
    info: dict[str, Any] = {"id": model_id(ref), "ref": ref, "step": None, "tokens": None, "checkpoint": None}
    if ref.startswith(OPENAI_PREFIX):
        from raygpt.hf import load_openai

        model = load_openai(ref[len(OPENAI_PREFIX):])
    else:
        config, folder = describe_model(ref, spec, storage)
        model = GPT(config)
        with tempfile.TemporaryDirectory(prefix="raygpt-model-") as tmp:
            local = Path(tmp) / MODEL_FILE
            storage.download(join(folder, MODEL_FILE), local)
            try:
                state_dict = torch.load(local, map_location="cpu", weights_only=True)
            except Exception as e:  # a truncated or foreign file: torch raises several types
                raise RaygptError(f"{join(folder, MODEL_FILE)}: cannot read the weights ({e})") from None
        load_state_dict_checked(model, state_dict, where=folder, expected=f"the model in its {MODEL_CONFIG_FILE}",
                                hint=f"its {MODEL_FILE} and {MODEL_CONFIG_FILE} disagree")
        state_uri = join(folder, TRAINER_STATE_FILE)
        if storage.exists(state_uri):
            state = storage.read_json(state_uri)
            info.update(step=state.get("step"), tokens=state.get("tokens_seen"))
        info["checkpoint"] = folder
    model.to(device).eval()
    info.update(params=model.num_params(), config=asdict(model.config))
    return model, info


def save_model_dir(model: GPT, config: GPTConfig, path: str | Path) -> None:
    """A model-only folder (``model.pt`` + ``model_config.json``) that ``load_model`` reads.

    The config is written last, so a folder with it is complete.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    tmp = directory / f".{MODEL_FILE}.tmp"
    torch.save(state_dict, tmp)
    tmp.replace(directory / MODEL_FILE)
    (directory / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(config), indent=2) + "\n")
