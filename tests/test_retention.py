"""Checkpoint retention: ``checkpoint.keep`` counts intact checkpoints only, the one a session
resumed from stays, and partial folders go once no writer can own them (a killed driver's
workers write on for seconds)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from raygpt.config import load_spec
from raygpt.model import GPT, GPTConfig
from raygpt.storage import Storage
from raygpt.train.components import RngState, TrainerState, choose_precision
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import save_training_checkpoint
from raygpt.weights.integrity import newest_intact_checkpoint
from raygpt.weights.retention import QUIET_S, Retention

CONFIG = GPTConfig(vocab_size=97, context_length=16, n_layer=1, n_head=2, n_embd=16)


def write_run(run: Path, steps: list[int], suffix: str = "") -> None:
    """Complete, intact checkpoints of a tiny model at ``steps`` (folders ``checkpoint_<step><suffix>``)."""
    spec = load_spec(None, ["model.preset=tiny"])
    model = GPT(CONFIG)
    optimizer = model.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
    state = TrainerState(WarmupCosine(1e-3, 1, 4), choose_precision("fp32", torch.device("cpu")).scaler, 0, spec, 1)
    for step in steps:
        state.step = step
        save_training_checkpoint(run / f"checkpoint_{step:08d}{suffix}", 0, model=model, optimizer=optimizer,
                                 trainer=state, rng=RngState())


def partial(run: Path, name: str, age_s: float) -> None:
    """What a killed save leaves: rank 1's RNG file alone, written ``age_s`` seconds ago."""
    (run / name).mkdir(parents=True)
    (run / name / "rng_rank1.pt").write_bytes(b"rng")
    stamp = time.time() - age_s
    os.utime(run / name / "rng_rank1.pt", (stamp, stamp))


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def listing(run: Path) -> list[str]:
    return sorted(os.listdir(run))


def test_keep_counts_intact_checkpoints_and_the_resumed_from_one_stays(tmp_path):
    """The fault experiment's case: keep 4, a resume past a damaged newest checkpoint. Ray
    Train's retention counted the damaged one and deleted an intact one; here every kept
    checkpoint is intact, and the one resumed from is never deleted."""
    run = tmp_path / "demo"
    write_run(run, [1, 2, 3, 4, 5])
    flip(run / "checkpoint_00000005" / "model.pt")
    resume = newest_intact_checkpoint(str(run), Storage())
    assert resume.name == "checkpoint_00000004"
    retention = Retention(str(run), Storage(), keep=4, resumed_from=resume.name,
                          damaged={name: problem for name, problem in resume.skipped})

    write_run(run, [5], suffix=".1")  # the resumed session's save of step 5, beside the damaged folder
    removed = retention.after_save("checkpoint_00000005.1")
    assert [name for name, _ in removed] == ["checkpoint_00000005", "checkpoint_00000001"]
    assert "model.pt differs from the SHA-256" in removed[0][1] and "beyond checkpoint.keep: 4" in removed[1][1]
    assert listing(run) == ["checkpoint_00000002", "checkpoint_00000003", "checkpoint_00000004",
                            "checkpoint_00000005.1"]

    for step in (6, 7, 8, 9):
        write_run(run, [step])
        retention.after_save(f"checkpoint_{step:08d}")
    assert listing(run) == ["checkpoint_00000004", "checkpoint_00000006", "checkpoint_00000007",
                            "checkpoint_00000008", "checkpoint_00000009"]  # 4 intact, and the resumed-from


def test_partial_folders_go_once_no_writer_can_own_them(tmp_path):
    run = tmp_path / "demo"
    write_run(run, [2, 4])
    partial(run, "checkpoint_00000003", age_s=QUIET_S + 5)  # a killed driver's, long ago
    partial(run, "checkpoint_00000001", age_s=1)  # a killed driver's worker may still be writing
    partial(run, "checkpoint_00000006", age_s=QUIET_S + 5)
    retention = Retention(str(run), Storage(), keep=1, resumed_from="checkpoint_00000004")
    removed = retention.remove_partial()
    assert [name for name, _ in removed] == ["checkpoint_00000006", "checkpoint_00000003"]
    assert all("is missing" in problem or "no trainer_state.json" in problem for _, problem in removed)
    assert listing(run) == ["checkpoint_00000001", "checkpoint_00000002", "checkpoint_00000004"]

    write_run(run, [5])
    partial(run, "checkpoint_00000006", age_s=QUIET_S + 5)  # newer than the save: this session may be writing it
    removed = retention.after_save("checkpoint_00000005")
    assert [name for name, _ in removed] == ["checkpoint_00000002"]  # beyond keep 1; 1 is still fresh
    assert listing(run) == ["checkpoint_00000001", "checkpoint_00000004", "checkpoint_00000005",
                            "checkpoint_00000006"]
    removed = retention.after_save("checkpoint_00000005", now=time.time() + QUIET_S)
    assert [name for name, _ in removed] == ["checkpoint_00000001"]
    assert "checkpoint_00000004" in listing(run)  # the resumed-from one, though beyond keep 1
