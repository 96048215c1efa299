"""Training on Ray Train: 2 CPU workers against the SeaweedFS store, checkpoint layout, run
records, and exact resume after a killed worker or a whole new session."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from raygpt.cluster import FAIL_AT_STEP_ENV
from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.storage import Storage, join
from raygpt.train.launch import train
from raygpt.train.metrics import read_metrics, step_losses
from raygpt.train.plan import plan_run
from raygpt.weights.integrity import checkpoint_problem, latest_checkpoint
from raygpt.weights.refs import load_model

MAX_STEPS = 8


def tiny_spec(storage_path: str, dataset: str, name: str, *overrides: str):
    """A tiny model, 2 workers x 1 CPU, 32 sequences of 32 tokens per step (2 micro-batches per
    worker), dropout on so that exact resume needs the RNG states too."""
    return load_spec(None, [
        f"name={name}", f"storage_path={storage_path}", "model.preset=tiny", "model.dropout=0.1",
        f"train.dataset={dataset}", "train.seq_len=32", "train.global_batch_tokens=1024", "train.micro_batch_size=8",
        "train.num_workers=2", f"train.max_steps={MAX_STEPS}", "train.warmup_steps=2", "train.lr=3e-3",
        "train.log_interval=2", "train.val_interval=4", "train.val_tokens=1024", "train.max_failures=1",
        "checkpoint.interval=3", "checkpoint.keep=2", *overrides])


# ---------------------------------------------------------------------------------------------
# The plan: unit tests, no Ray


def test_any_worker_count_splits_the_batch_but_micro_batches_must_divide_it():
    spec = load_spec(None, ["model.preset=tiny", "train.seq_len=32", "train.global_batch_tokens=1024",
                            "train.num_workers=[2, 3]", "train.micro_batch_size=4"])
    plan = plan_run(spec, train_tokens=100_000, use_gpu=False)  # 8 micro-batches: shares of 3, 3, 2 on 3 workers
    assert (plan.micro_batches, plan.min_workers, plan.num_workers, plan.grad_accum_steps) == (8, 2, 3, 3)
    spec.train.micro_batch_size = 5
    with pytest.raises(RaygptError, match=r"train.global_batch_tokens: 1024 tokens = 32 sequences of 32, which "
                                          r"micro-batches of train.micro_batch_size 5 cannot divide; use a multiple "
                                          r"of 160 tokens \(e.g. 960 or 1120\)"):
        plan_run(spec, train_tokens=100_000, use_gpu=False)
    spec.train.micro_batch_size, spec.train.num_workers = 16, 3
    with pytest.raises(RaygptError, match="train.num_workers: 3 workers, but a step has only 2 micro-batches"):
        plan_run(spec, train_tokens=100_000, use_gpu=False)
    spec.train.global_batch_tokens = 1000
    with pytest.raises(RaygptError, match="not a multiple of the sequence length 32"):
        plan_run(spec, train_tokens=100_000, use_gpu=False)


def test_plan_derives_accumulation_and_steps_from_the_token_budget():
    spec = load_spec(None, ["model.preset=tiny", "train.global_batch_tokens=4096", "train.num_workers=2",
                            "train.micro_batch_size=8", "train.stop_at_step=5"])
    plan = plan_run(spec, train_tokens=100_000, use_gpu=False)
    assert (plan.seq_len, plan.global_batch_size, plan.grad_accum_steps) == (64, 64, 4)
    assert (plan.max_steps, plan.stop_step) == (100_000 // 4096, 5)
    with pytest.raises(RaygptError, match="less than one global batch"):
        plan_run(spec, train_tokens=4000, use_gpu=False)
    spec.train.seq_len = 128
    with pytest.raises(RaygptError, match="train.seq_len: 128 exceeds the context length 64"):
        plan_run(spec, train_tokens=100_000, use_gpu=False)


class ListQueue:
    """The driver's side of the Ray queue the metrics arrive by."""

    def __init__(self, records):
        self.records = list(records)

    def get(self, block=True, timeout=None):
        from ray.util.queue import Empty

        if not self.records:
            raise Empty
        return self.records.pop(0)


def test_progress_view_on_a_terminal():
    from io import StringIO

    from rich.console import Console

    from raygpt.train.progress import ProgressView

    plan = plan_run(load_spec(None, ["model.preset=tiny", "train.global_batch_tokens=1024", "train.max_steps=10"]),
                    train_tokens=100_000, use_gpu=False)
    console = Console(file=StringIO(), force_terminal=True, width=160)
    records = [
        {"step": 5, "loss": 9.5, "lr": 1e-3, "grad_norm": 0.9, "tokens_per_s": 12345.0, "mfu": 0.41,
         "resumed_from_step": 0, "val_loss": 9.4},
        {"step": 5, "checkpoint_stall_s": 0.25},
        {"event": "worker_failure", "rank": 1, "error": "ActorDiedError: the worker died"},
        {"step": 10, "loss": 9.0, "lr": 1e-4, "grad_norm": 0.8, "tokens_per_s": 12000.0, "mfu": None,
         "resumed_from_step": 5},
    ]
    with ProgressView(plan, 0, ListQueue(records), console) as view:
        pass
    text = console.file.getvalue()
    assert "step 5: loss 9.5000  lr 1.00e-03  grad 0.900  12,345 tok/s  MFU 41.0%  val 9.4000" in text
    assert "checkpoint saved, stalled 0.25 s" in text
    assert "worker 1 failed (ActorDiedError: the worker died); Ray Train restarts" in text
    assert "resumed from step 5" in text and "10/10" in text
    assert [r["step"] for r in view.records] == [5, 10] and len(view.failures) == 1


# ---------------------------------------------------------------------------------------------
# Real runs: 2 workers, Gloo, the test store


@pytest.fixture(scope="module")
def s3_run(ray_local, tiny_dataset):
    """One uninterrupted run into the S3 store with asynchronous checkpoint uploads; its per-step
    losses are what every interrupted run must reproduce."""
    import contextlib
    import io

    root = f"s3://raygpt-test/runs-{os.urandom(4).hex()}"
    spec = tiny_spec(root, tiny_dataset, "s3run")
    driver_output = io.StringIO()
    with contextlib.redirect_stdout(driver_output), contextlib.redirect_stderr(driver_output):
        summary = train(spec)
    records = read_metrics(join(root, "s3run"), Storage())
    return {"spec": spec, "summary": summary, "run": join(root, "s3run"), "records": records,
            "losses": step_losses(records), "driver_output": driver_output.getvalue()}


@pytest.fixture(scope="module")
def reference(s3_run):
    return s3_run["losses"]


@pytest.mark.integration
def test_run_on_s3_with_async_checkpoints(s3_run, s3_server):
    storage = Storage()
    spec, summary, run, records = s3_run["spec"], s3_run["summary"], s3_run["run"], s3_run["records"]

    assert sorted(s3_run["losses"]) == list(range(1, MAX_STEPS + 1))  # the loss of every step
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]  # log interval 2, checkpoints at 3, 6, 8
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert {r["step"] for r in records if "checkpoint_stall_s" in r} == {3, 6, 8}
    assert all(r["checkpoint_stall_s"] >= 0 for r in records if "checkpoint_stall_s" in r)
    first = records[0]
    assert first["resumed_from_step"] == 0 and first["world_size"] == 2 and len(first["devices"]) == 2
    assert "step 8/8 loss" in s3_run["driver_output"]

    # Checkpoints: the last two are kept (checkpoint.keep), each holding every component.
    names = storage.list(run)
    assert [n for n in names if n.startswith("checkpoint_0")] == ["checkpoint_00000006", "checkpoint_00000008"]
    assert sorted(storage.list(join(run, "checkpoint_00000008"))) == [
        "model.pt", "model_config.json", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"]
    state = storage.read_json(join(run, "checkpoint_00000008", "trainer_state.json"))
    assert (state["step"], state["tokens_seen"], state["data"]["next_batch"]) == (8, 8 * 1024, 8)
    assert state["schedule"]["max_steps"] == MAX_STEPS and state["world_size"] == 2

    # The run record: how to reproduce the run, and what it reached.
    record = storage.read_json(join(run, "run.json"))
    assert summary["status"] == record["status"] == "finished"
    assert record["spec"]["train"]["dataset"] == spec.train.dataset and record["seeds"] == {"train": 1337}
    assert len(record["dataset"]["manifest_sha256"]) == 64
    assert {"torch", "ray", "numpy", "pyarrow", "tiktoken"} <= set(record["packages"])
    assert record["plan"]["grad_accum_steps"] == 2 and record["hardware"]["workers"] == 2
    assert record["lease"] == {"method": "conditional writes"}  # SeaweedFS enforces If-None-Match / If-Match
    assert record["final"]["step"] == MAX_STEPS and record["final"]["val_loss"] == records[-1]["val_loss"]
    # Where the time from ray.init to the first step went, part by part (they add up to no more).
    startup = record["startup"]
    parts = ("ray_start_s", "driver_s", "workers_start_s", "checkpoint_fetch_s", "model_s", "data_open_s",
             "checkpoint_load_s", "wrap_s", "first_batch_s", "first_step_s")
    assert set(startup) == {*parts, "to_first_step_s"} and all(startup[k] >= 0 for k in parts)
    assert sum(startup[k] for k in parts) <= startup["to_first_step_s"] + 0.01
    stalls = [r["checkpoint_stall_parts"] for r in records if "checkpoint_stall_parts" in r]
    assert len(stalls) == 3 and all(set(s) == {"reports_s", "previous_write_s", "copy_s", "other_s"} for s in stalls)
    assert [r.get("val_s", 0) > 0 for r in records if "val_loss" in r] == [True, True]

    # Evaluation and fine-tuning read the newest checkpoint by run name.
    model, info = load_model("s3run", spec, storage)
    assert (info["step"], info["tokens"], info["checkpoint"]) == (8, 8192, latest_checkpoint(run, storage))

    # No credential anywhere: records, driver output, or any Ray log of the session.
    import ray

    secret = s3_server.secret_key
    assert secret not in storage.read_text(join(run, "run.json"))
    assert secret not in storage.read_text(join(run, "metrics.jsonl"))
    assert secret not in s3_run["driver_output"]
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.integration
def test_a_run_interrupted_twice_computes_the_same_losses(reference, tiny_dataset, tmp_path, monkeypatch):
    """A lost cluster (the run is started again: Ray Train resumes it by name from storage),
    then a lost worker (FailureConfig restarts the workers from the last checkpoint). Local
    storage and synchronous uploads this time: neither changes the maths either."""
    first = train(tiny_spec(str(tmp_path), tiny_dataset, "twice", "train.stop_at_step=3",
                            "checkpoint.async_upload=false"))
    assert first["status"] == "stopped" and first["final"]["step"] == 3 and first["sessions"] == 1

    monkeypatch.setenv(FAIL_AT_STEP_ENV, "5")  # the driver forwards it to the workers
    second = train(tiny_spec(str(tmp_path), tiny_dataset, "twice", "checkpoint.async_upload=false"))
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    assert second["status"] == "finished" and second["sessions"] == 2 and second["restarts"] == 1
    records = read_metrics(str(tmp_path / "twice"), Storage())
    # Bitwise: dropout masks, data order, optimizer and schedule all continue where they were.
    assert step_losses(records) == reference
    # Session 1 from scratch; session 2 from checkpoint_00000003, and again after the kill at step 5.
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [0, 3]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]

    again = train(tiny_spec(str(tmp_path), tiny_dataset, "twice"))  # already finished: nothing to do
    assert again["final"]["step"] == MAX_STEPS
    assert json.loads((tmp_path / "twice" / "run.json").read_text())["sessions"] == 2


# ---------------------------------------------------------------------------------------------
# Damaged checkpoints and unfinished run records (issue 13)


@pytest.fixture(scope="module")
def six_steps(ray_local, tiny_dataset, tmp_path_factory):
    """A run stopped after step 6 on local storage: checkpoints 3 and 6 (Ray Train's listing
    names 6). Tests copy it and damage the copy."""
    root = tmp_path_factory.mktemp("six")
    summary = train(tiny_spec(str(root), tiny_dataset, "six", "train.stop_at_step=6", "checkpoint.async_upload=false"))
    assert summary["status"] == "stopped" and summary["final"]["step"] == 6
    return root / "six"


@pytest.fixture(scope="module")
def eight_steps(six_steps, tiny_dataset, tmp_path_factory):
    """``six_steps`` trained to its end (step 8), as ``killed``: tests copy it and take back
    what a driver killed during the final upload would not have written."""
    root = tmp_path_factory.mktemp("eight")
    copy_run(six_steps, root, "killed")
    summary = train(tiny_spec(str(root), tiny_dataset, "killed", "checkpoint.async_upload=false"))
    assert summary["status"] == "finished"
    return root / "killed"


def copy_run(source: Path, root: Path, name: str) -> Path:
    import shutil

    shutil.copytree(source, root / name)
    return root / name


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def flip_inside(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensors' bytes: the size stays
    path.write_bytes(bytes(data))


def edit_step(checkpoint: Path, step: int) -> None:
    """What the fault experiment did: ``"step": 6`` changed by hand, every other file intact."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "step": step}, indent=2))


# Damage, the problem it is skipped for, and whether it is a partial folder (a save cut off:
# deleted when the run resumes) rather than a complete one changed since (deleted at a save).
DAMAGE = {
    "optimizer-truncated": (lambda c: truncate(c / "optimizer.pt"), r"optimizer.pt holds \d+ bytes", True),
    "model-bytes-changed": (lambda c: flip_inside(c / "model.pt"), r"model.pt differs from the SHA-256", False),
    "state-edited": (lambda c: edit_step(c, 7), r"trainer_state.json differs from the SHA-256 it records of itself",
                     False),
}


def age(folder: Path, seconds: float) -> None:
    """Date every file of ``folder`` ``seconds`` back: written by a writer long gone."""
    for path in folder.iterdir():
        os.utime(path, (time.time() - seconds,) * 2)


@pytest.mark.integration
# Every kind of damage is told apart in tests/test_checkpoint.py; end to end, the three that
# went wrong in different ways before: a PyTorch archive error, bytes used without a word, and
# an edited step resumed from.
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(
        damage, six_steps, reference, tiny_dataset, tmp_path, capsys, caplog):
    import re

    from raygpt.weights.retention import QUIET_S

    run = copy_run(six_steps, tmp_path, "damaged")
    corrupt, problem, partial = DAMAGE[damage]
    corrupt(run / "checkpoint_00000006")
    age(run / "checkpoint_00000006", QUIET_S + 1)
    # What a killed driver's workers leave after its last checkpoint: rank 1's part of a save alone.
    (run / "checkpoint_00000005").mkdir()
    (run / "checkpoint_00000005" / "rng_rank1.pt").write_bytes(b"rank 1 only")
    age(run / "checkpoint_00000005", QUIET_S + 1)
    summary = train(tiny_spec(str(tmp_path), tiny_dataset, "damaged", "checkpoint.async_upload=false"))
    output = capsys.readouterr()
    assert re.search(r"skipped checkpoint \S*checkpoint_00000006: " + problem, output.err), output.err
    removed = {line.split("removed the partial checkpoint folder ")[1].split(" ")[0].rsplit("/", 1)[-1]
               for line in caplog.text.splitlines() if "removed the partial checkpoint folder" in line}
    assert removed == ({"checkpoint_00000006"} if partial else set()) | {"checkpoint_00000005"}
    assert "resuming from " in output.err and "checkpoint_00000003, the newest intact checkpoint" in output.err
    assert summary["status"] == "finished" and summary["final"]["step"] == MAX_STEPS
    assert summary["resumed_from"]["checkpoint"] == "checkpoint_00000003"
    assert [s["checkpoint"] for s in summary["resumed_from"]["skipped"]] == ["checkpoint_00000006",
                                                                            "checkpoint_00000005"]
    records = read_metrics(str(run), Storage())
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [0, 3]
    first = next(r for r in records if r.get("resumed_from_step") == 3)
    # The workers took the driver's choice; Ray Train's own listing, which named the damaged
    # one, was removed before it started (raygpt keeps the checkpoints).
    assert (first["resumed_from_checkpoint"], first["ray_checkpoint"]) == ("checkpoint_00000003", None)
    assert step_losses(records) == reference
    # Step 6 was saved again beside a damaged folder under its own name (folders are deleted
    # whole); a partial one was gone by then. Kept: the two newest intact ones (keep 2) and the
    # one resumed from; the damaged and the partial ones are gone, and every one left is intact.
    saved_again = "checkpoint_00000006" if partial else "checkpoint_00000006.1"
    assert saved_again in {r.get("checkpoint") for r in records}
    left = sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint_0"))
    assert left == ["checkpoint_00000003", saved_again, "checkpoint_00000008"]
    assert all(checkpoint_problem(run / name) is None for name in left)


@pytest.mark.integration
@pytest.mark.parametrize("loss", ["emptied", "deleted"])
def test_a_run_whose_checkpoints_are_lost_stops_rather_than_train_again(loss, six_steps, tiny_dataset, tmp_path):
    """run.json and metrics.jsonl say checkpoints 3 and 6 were saved, but their folders were
    emptied (or are gone): the run must not start over from step 1 and report success."""
    import shutil

    run = copy_run(six_steps, tmp_path, "lost")
    for checkpoint in run.glob("checkpoint_0*"):
        shutil.rmtree(checkpoint)
        if loss == "emptied":
            checkpoint.mkdir()
    metrics_before = (run / "metrics.jsonl").read_text()
    with pytest.raises(RaygptError, match=r"run \S*lost: its records say 2 checkpoint\(s\) were saved, the last "
                                          r"checkpoint_00000006 at step 6, but none is left intact \(" +
                                          (r"checkpoint_00000006: no trainer_state.json .*" if loss == "emptied" else
                                           r"no checkpoint folder at all") + r"\): put an intact copy back"):
        train(tiny_spec(str(tmp_path), tiny_dataset, "lost"))
    assert (run / "metrics.jsonl").read_text() == metrics_before  # nothing trained again, nothing written
    assert json.loads((run / "run.json").read_text())["final"]["step"] == 6


@pytest.mark.integration
def test_no_intact_checkpoint_is_one_clear_error(six_steps, tiny_dataset, tmp_path):
    run = copy_run(six_steps, tmp_path, "ruined")
    flip_inside(run / "checkpoint_00000006" / "model.pt")
    truncate(run / "checkpoint_00000003" / "optimizer.pt")
    with pytest.raises(RaygptError, match=r"run \S*ruined: none of its 2 checkpoint\(s\) is intact \("
                                          r"checkpoint_00000006: model.pt differs .*; checkpoint_00000003: optimizer.pt "
                                          r"holds \d+ bytes .*\): put an intact copy back, or start a new run name"):
        train(tiny_spec(str(tmp_path), tiny_dataset, "ruined"))


@pytest.mark.integration
@pytest.mark.parametrize("carried", [True, False], ids=["restored", "lost"])
def test_a_rerun_completes_the_record_a_driver_killed_during_the_final_upload_left(
        carried, eight_steps, reference, tiny_dataset, tmp_path, capsys):
    """The last checkpoint reached the store, but the driver died before run.json and the last
    record of metrics.jsonl (steps 7 and 8) were written."""
    run = copy_run(eight_steps, tmp_path, "killed")
    spec = tiny_spec(str(tmp_path), tiny_dataset, "killed", "checkpoint.async_upload=false")
    record = json.loads((run / "run.json").read_text())
    record.update(status="running", final=None, finished=None)
    (run / "run.json").write_text(json.dumps(record))
    kept = {key: record[key] for key in ("attempts", "cost", "sessions")}  # what the killed session recorded
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == MAX_STEPS
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    if not carried:  # a checkpoint of raygpt before 0.4: it carries no metrics
        state_file = run / os.path.basename(latest_checkpoint(str(run), Storage())) / "trainer_state.json"
        state = json.loads(state_file.read_text())
        del state["recent_metrics"], state["state_sha256"]  # nor a digest of its own
        state_file.write_text(json.dumps(state))
    capsys.readouterr()

    summary = train(spec)
    output = capsys.readouterr()
    assert "already at step 8 of 8, but its run record was left 'running': completed it as 'finished'" in output.out
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == summary["status"] == "finished" and record["final"]["step"] == MAX_STEPS
    assert record["finished"] is not None and record["sessions"] == 2
    assert {key: record[key] for key in kept} == kept and record["attempts"]
    records = read_metrics(str(run), Storage())
    if carried:
        assert step_losses(records) == reference and records[-1]["step"] == MAX_STEPS
        assert record["final"]["loss"] == records[-1]["loss"] and "lost_steps" not in record
        assert "restored step(s) 7-8" in output.err
    else:
        assert record["lost_steps"] == [7, 8] and "step(s) 7-8 are lost" in output.err
        assert sorted(step_losses(records)) == list(range(1, 7))

    again = train(spec)  # complete now: nothing to do
    assert again["status"] == "finished" and "nothing to do" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# A run that diverges (issue 19)


@pytest.mark.integration
def test_a_diverging_run_skips_its_non_finite_steps_then_stops_naming_them_and_saves_none_of_them(
        ray_local, tiny_dataset, tmp_path):
    """lr 1e4: the first steps throw the weights far, then every gradient norm is infinite. The
    skipped steps never reach the weights, so the checkpoints saved meanwhile hold the last
    finite step's; the third skip in a row stops the run before its save."""
    import torch

    spec = tiny_spec(str(tmp_path), tiny_dataset, "diverged", "train.lr=1e4", "train.warmup_steps=0",
                     "train.log_interval=1", "train.val_interval=0", "checkpoint.interval=1",
                     "checkpoint.async_upload=false", "checkpoint.keep=3", "train.max_nonfinite_skips=3")
    with pytest.raises(RaygptError) as stopped:
        train(spec)
    run = tmp_path / "diverged"
    records = read_metrics(str(run), Storage())
    skipped = [step for r in records for step in r.get("skipped_steps", [])]
    last = records[-1]["step"]
    assert skipped == [last - 2, last - 1, last] and last < MAX_STEPS  # one step each report: the flags of each
    assert str(stopped.value).startswith(
        f"train: steps {last - 2}-{last}: 3 steps in a row had a non-finite loss or gradient norm and were skipped "
        "(train.max_nonfinite_skips: 3): the training diverged; lower train.lr")
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == str(stopped.value)
    assert record["final"]["skipped_steps"] == 3 and record["final"]["step"] == last
    newest = latest_checkpoint(str(run), Storage())
    assert newest.endswith(f"checkpoint_{last - 1:08d}")  # none at the step that stopped the run
    finite = torch.load(Path(newest.replace("file://", "")) / "model.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in finite.values())
    before = torch.load(run / f"checkpoint_{last - 3:08d}" / "model.pt", weights_only=True)
    assert all(torch.equal(before[k], finite[k]) for k in before)  # the skipped steps changed nothing
