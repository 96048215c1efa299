"""Which checkpoint a run resumes from: the driver's checks before Ray starts, and every worker's choice.

The driver (``check_resume``) takes the run's newest intact checkpoint, after checking that
it holds the model the spec describes and reads the same data at every step; a run whose
records say a checkpoint was saved but which has none intact left stops there, rather than
train again from step 1. ``prepare_resume`` then hands the run's checkpoints to raygpt's
retention (``raygpt.weights.retention``): Ray Train's listing of them goes, and the partial
folders no writer owns.

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
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raygpt.config import RunSpec
from raygpt.errors import RaygptError
from raygpt.model import GPT, config_from_spec
from raygpt.stages import RUN_RECORD_FILE
from raygpt.storage import Storage, join
from raygpt.train.metrics import read_metrics
from raygpt.weights.checkpoint import check_state_shapes, model_config_from_dict
from raygpt.weights.integrity import (
    RETRAIN_HINT,
    ResumeChoice,
    checkpoint_problem,
    choose_checkpoint,
    newest_intact_checkpoint,
    stored_checkpoint_problem,
)
from raygpt.weights.layout import MODEL_CONFIG_FILE, TRAINER_STATE_FILE, checkpoint_names
from raygpt.weights.retention import Retention

log = logging.getLogger(__name__)

RAY_LISTING = "checkpoint_manager_snapshot.json"
"""Ray Train's listing of the checkpoints it registered, in the run folder: it refuses to start
when a folder it lists is gone, and raygpt's retention deletes folders."""

# Settings that decide which sequences step k reads: a resume must keep them.
DATA_DEFINING = ("global_batch_tokens", "seq_len", "seed")


def check_resume(run_uri: str, spec: RunSpec, storage: Storage,
                 manifest_sha256: str | None = None) -> tuple[ResumeChoice, dict[str, Any] | None]:
    """The checkpoint this run resumes from, the newest complete and intact one (every file
    hashed: the workers choose by the same rule), and its trainer state (None for a new run),
    after checking that it holds the model the spec describes and reads the same data at
    every step (the same global batch, sequence length, seed and dataset; the worker count
    may change). Says which newer checkpoints it skipped, and why. A RaygptError when the
    run's records say a checkpoint was saved but none is intact (``check_nothing_lost``).

    It also settles, in ``spec`` itself, what a spec may leave to the run's history:
    ``model.vocab_multiple`` None becomes the checkpoint's padding (64 for a new run), so the
    workers, the run record and the checkpoints all name the number."""
    choice = newest_intact_checkpoint(run_uri, storage)
    for name, problem in choice.skipped:
        log.warning("raygpt train: skipped checkpoint %s: %s", join(run_uri, name), problem)
    latest = choice.uri
    if latest is None:
        check_nothing_lost(run_uri, storage, choice)
        spec.model.vocab_multiple = config_from_spec(spec.model).vocab_multiple
        return choice, None
    if choice.skipped:
        log.warning("raygpt train: resuming from %s, the newest intact checkpoint", latest)
    saved_config = model_config_from_dict(storage.read_json(join(latest, MODEL_CONFIG_FILE)),
                                          join(latest, MODEL_CONFIG_FILE))
    config = config_from_spec(spec.model, saved_config)
    spec.model.vocab_multiple = config.vocab_multiple
    expected = f"model.preset {spec.model.preset!r}"
    with torch.device("meta"):
        saved_shapes = {k: v.shape for k, v in GPT(saved_config).state_dict().items()}
        own_shapes = {k: v.shape for k, v in GPT(config).state_dict().items()}
    check_state_shapes(own_shapes, saved_shapes, where=latest, expected=expected)
    if saved_config.tie_weights != config.tie_weights:
        raise RaygptError(f"checkpoint {latest} was trained with model.tie_weights={saved_config.tie_weights}; "
                          f"the spec says {config.tie_weights}: resume with the same setting or start a new run name")
    state = storage.read_json(join(latest, TRAINER_STATE_FILE))
    check_same_data(state, latest, spec, saved_config.context_length, config.context_length, manifest_sha256,
                    run_uri, storage)
    return choice, state


def check_nothing_lost(run_uri: str, storage: Storage, choice: ResumeChoice) -> None:
    """A RaygptError when the run has no checkpoint to resume from but its records
    (``metrics.jsonl``, ``run.json``) say one was saved: its checkpoints were lost or emptied,
    and training from step 1 under its name would throw its progress away without a word."""
    saved = {r["checkpoint"]: r["step"] for r in read_metrics(run_uri, storage) if r.get("checkpoint")}
    record = _run_record(run_uri, storage)
    final = record.get("final") or {}
    if record.get("checkpoint"):
        saved.setdefault(str(record["checkpoint"]).rstrip("/").rsplit("/", 1)[-1], final.get("step"))
    if not saved:
        return
    name, step = max(saved.items(), key=lambda item: item[1] or 0)
    found = "; ".join(f"{n}: {p}" for n, p in choice.skipped) or "no checkpoint folder at all"
    raise RaygptError(f"run {run_uri}: its records say {len(saved)} checkpoint(s) were saved, the last {name} at "
                      f"step {step}, but none is left intact ({found}): {RETRAIN_HINT}")


def _run_record(run_uri: str, storage: Storage) -> dict[str, Any]:
    uri = join(run_uri, RUN_RECORD_FILE)
    try:
        return storage.read_json(uri) if storage.exists(uri) else {}
    except RaygptError:  # cut off: says nothing
        return {}


def prepare_resume(run_uri: str, spec: RunSpec, storage: Storage, resume: ResumeChoice) -> Retention:
    """Before Ray starts: the run's checkpoint retention for this session (raygpt's, so Ray
    Train's listing of the checkpoints goes), after deleting the partial folders no writer owns."""
    storage.delete(join(run_uri, RAY_LISTING))
    retention = Retention(run_uri, storage, spec.checkpoint.keep, resumed_from=resume.name,
                          damaged={name: problem for name, problem in resume.skipped
                                   if not getattr(problem, "partial", False)})
    for name, problem in retention.remove_partial():
        log.warning("raygpt train: removed the partial checkpoint folder %s (%s)", join(run_uri, name), problem)
    return retention


def check_same_data(state: dict[str, Any], checkpoint: str, spec: RunSpec, saved_context: int, context: int,
                    manifest_sha256: str | None, run_uri: str, storage: Storage) -> None:
    """A RaygptError naming the first data-defining setting that differs from the checkpoint's."""
    saved = (state.get("spec") or {}).get("train") or {}
    now = {"global_batch_tokens": spec.train.global_batch_tokens, "seq_len": spec.train.seq_len or context,
           "seed": spec.train.seed}
    before = {"global_batch_tokens": saved.get("global_batch_tokens"), "seq_len": saved.get("seq_len") or saved_context,
              "seed": saved.get("seed")}
    for key in DATA_DEFINING:
        if before[key] is not None and before[key] != now[key]:
            raise RaygptError(f"train.{key}: {now[key]!r}, but the run {spec.name} was trained with {before[key]!r} "
                              f"(checkpoint {checkpoint}): resuming would read other sequences at every step; keep "
                              f"{before[key]!r} or start a new run name")
    saved_manifest = (state.get("data") or {}).get("manifest_sha256")
    if saved_manifest is None:  # checkpoints of raygpt 0.1.0
        saved_manifest = (_run_record(run_uri, storage).get("dataset") or {}).get("manifest_sha256")
    if manifest_sha256 and saved_manifest and saved_manifest != manifest_sha256:
        raise RaygptError(f"train.dataset: {spec.train.dataset} has manifest {manifest_sha256[:12]}, but the run "
                          f"{spec.name} was trained on {saved_manifest[:12]}: resuming would read other sequences; "
                          "use the dataset it was trained on or start a new run name")


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
