"""Model references: a run name, a run folder, a checkpoint or model folder (local or
``s3://``), ``openai:NAME``, or ``ift:NAME`` (a model ``raygpt ift`` fine-tuned), resolved to a
model without the caller knowing which.

A run's model comes from the checkpoint a resume of the run would take: the newest intact one
(``raygpt.weights.integrity``: every file hashed against its ``trainer_state.json``), with
the newer ones it passed over logged; a checkpoint folder named directly is checked the same
way and refused when damaged. So ``eval``, ``sample``, ``export`` and ``ift`` never read
weights whose bytes changed after the save.
"""

from __future__ import annotations

import logging
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from raygpt.errors import RaygptError
from raygpt.model import GPT, GPTConfig
from raygpt.stages import ift_dir
from raygpt.storage import Storage, is_remote, join
from raygpt.weights.checkpoint import load_state_dict_checked, model_config_from_dict
from raygpt.weights.integrity import latest_checkpoint, newest_intact_checkpoint, stored_checkpoint_problem
from raygpt.weights.layout import CHECKPOINT_PREFIX, MODEL_CONFIG_FILE, MODEL_FILE, TRAINER_STATE_FILE

log = logging.getLogger(__name__)

OPENAI_PREFIX = "openai:"
IFT_PREFIX = "ift:"
"""``ift:NAME``: the model ``raygpt ift`` fine-tuned and saved as NAME under ``ift.output``."""
IFT_METRICS_FILE = "metrics.json"
"""Written by ``raygpt ift`` beside each fine-tuned ``model/`` folder: its settings and history."""


def fine_tuned_folder(ref: str, spec: Any) -> str:
    """The model folder of ``ift:NAME``: ``<ift.output>/NAME/model``."""
    name = ref[len(IFT_PREFIX):]
    if not name or "/" in name:
        raise RaygptError(f"{ref}: expected ift:NAME, NAME being a fine-tuned model's name (as in its answers file)")
    return join(ift_dir(spec), name, "model")


def prompt_style_of(ref: str, spec: Any, storage: Storage) -> str | None:
    """The prompt style a fine-tuned model was trained with, from the ``metrics.json`` that
    ``raygpt ift`` wrote beside its ``model/`` folder; None for any other model."""
    folder = fine_tuned_folder(ref, spec) if ref.startswith(IFT_PREFIX) else ref.rstrip("/")
    if not folder.endswith("/model"):
        return None
    metrics_uri = join(folder[:-len("/model")], IFT_METRICS_FILE)
    if not storage.exists(metrics_uri):
        return None
    return (storage.read_json(metrics_uri).get("config") or {}).get("prompt_style")


READ_HINT = "put an intact copy back, or name an intact checkpoint folder of the run"


def resolve_model_folder(ref: str, storage_path: str, storage: Storage, verify: bool) -> str:
    """The folder holding ``model.pt`` for a run name, a run folder, or a checkpoint/model folder.

    ``verify``: a run's newest intact checkpoint (every file hashed), and a training
    checkpoint named directly only when intact. Without it (an early check of the model's
    shape, which every checkpoint of a run shares) the newest complete one, reading no weights.
    """
    candidates = [ref] if (is_remote(ref) or "/" in ref or Path(ref).exists()) else []
    candidates.append(join(storage_path, ref))
    for uri in candidates:
        if storage.exists(join(uri, MODEL_FILE)):
            if verify and storage.exists(join(uri, TRAINER_STATE_FILE)):  # a training checkpoint, not a model folder
                problem = stored_checkpoint_problem(uri, storage)
                if problem is not None:
                    raise RaygptError(f"checkpoint {uri}: {problem}; {READ_HINT}")
            return uri
        checkpoint = _newest_intact(uri, storage) if verify else latest_checkpoint(uri, storage)
        if checkpoint is not None:
            return checkpoint
    looked = " or ".join(candidates)
    raise RaygptError(f"model {ref!r}: no checkpoint found at {looked} (expected a run with a complete "
                      f"{CHECKPOINT_PREFIX}* folder, or a folder with {MODEL_FILE}); "
                      "check the name and storage_path, or use openai:gpt2")


def _newest_intact(run_uri: str, storage: Storage) -> str | None:
    """The run's newest intact checkpoint, saying which newer ones it passed over, and why."""
    choice = newest_intact_checkpoint(run_uri, storage, hint=READ_HINT)
    for name, problem in choice.skipped:
        log.warning("skipped checkpoint %s: %s", join(run_uri, name), problem)
    if choice.uri is not None and choice.skipped:
        log.warning("using %s, the newest intact checkpoint of %s", choice.uri, run_uri)
    return choice.uri


def model_id(ref: str) -> str:
    """A short, filesystem-safe display name: ``openai:gpt2`` -> ``openai-gpt2``; a run name
    stays itself; a folder gives its name, prefixed with its run's for ``checkpoint_*`` folders."""
    if ref.startswith(OPENAI_PREFIX):
        name = "openai-" + ref[len(OPENAI_PREFIX):]
    elif ref.startswith(IFT_PREFIX):
        name = "ift-" + ref[len(IFT_PREFIX):]
    else:
        parts = [p for p in ref.rstrip("/").split("/") if p and p != "s3:"]
        name = parts[-1] if parts else ref
        if name.startswith(CHECKPOINT_PREFIX) and len(parts) > 1:
            name = f"{parts[-2]}-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def describe_model(ref: str, spec: Any, storage: Storage, verify: bool = False) -> tuple[GPTConfig, str | None]:
    """A model's architecture and its folder, without loading any weights (cheap: one JSON
    read; with ``verify``, the folder ``load_model`` reads, every file of it hashed)."""
    if ref.startswith(OPENAI_PREFIX):
        from raygpt.model import PRESETS
        from raygpt.weights.hf import OPENAI_MODELS

        name = ref[len(OPENAI_PREFIX):]
        if name not in OPENAI_MODELS:
            raise RaygptError(f"{ref}: unknown OpenAI model (known: {', '.join(OPENAI_MODELS)})")
        base = PRESETS[OPENAI_MODELS[name]]
        return GPTConfig(**{**asdict(base), "qkv_bias": True, "tie_weights": True}), None
    if ref.startswith(IFT_PREFIX):
        folder = fine_tuned_folder(ref, spec)
        if not storage.exists(join(folder, MODEL_FILE)):
            raise RaygptError(f"{ref}: no fine-tuned model at {folder} (expected {MODEL_FILE} there); run `raygpt ift` "
                              "first, or check the name and ift.output")
    else:
        folder = resolve_model_folder(ref, spec.storage_path, storage, verify)
    config_uri = join(folder, MODEL_CONFIG_FILE)
    if not storage.exists(config_uri):
        raise RaygptError(f"{folder}: no {MODEL_CONFIG_FILE}, so the model's shape is unknown")
    return model_config_from_dict(storage.read_json(config_uri), config_uri), folder


def load_model(ref: str, spec: Any, storage: Storage, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """A model in eval mode on ``device`` and a description of it.

    ``ref``: a run name under ``spec.storage_path`` (its newest intact checkpoint), a run,
    checkpoint or model folder (local or ``s3://``), ``openai:NAME``, or ``ift:NAME`` (a model
    fine-tuned by ``raygpt ift``, under ``ift.output``). The description holds
    ``id``, ``ref``, ``params``, ``step``, ``tokens``, ``checkpoint`` (the folder, None for
    OpenAI's) and ``config`` (GPTConfig fields).
    """
    info: dict[str, Any] = {"id": model_id(ref), "ref": ref, "step": None, "tokens": None, "checkpoint": None}
    if ref.startswith(OPENAI_PREFIX):
        from raygpt.weights.hf import load_openai

        model = load_openai(ref[len(OPENAI_PREFIX):])
    else:
        config, folder = describe_model(ref, spec, storage, verify=True)
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
