"""Training on Ray Train: 2 CPU workers against the SeaweedFS store, checkpoint layout, run
records, and exact resume after a killed worker or a whole new session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raygpt.checkpoint import latest_checkpoint, load_model
from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.runrecord import read_metrics, step_losses
from raygpt.storage import Storage, join
from raygpt.train import plan_run, train

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


def test_global_batch_the_workers_cannot_divide_is_a_clear_error():
    spec = load_spec(None, ["model.preset=tiny", "train.seq_len=32", "train.global_batch_tokens=1024",
                            "train.num_workers=3", "train.micro_batch_size=4"])
    with pytest.raises(RaygptError, match=r"train.global_batch_tokens: 1024 tokens = 32 sequences of 32, which 3 "
                                          r"workers x micro_batch_size 4 = 12 sequences per pass cannot divide; "
                                          r"use a multiple of 384 tokens \(e.g. 768 or 1152\)"):
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


# ---------------------------------------------------------------------------------------------
# Real runs: 2 workers, Gloo, the test store


@pytest.fixture(scope="module")
def reference(ray_local, tiny_dataset, tmp_path_factory):
    """An uninterrupted run (local storage, synchronous uploads): the per-step losses to match."""
    root = str(tmp_path_factory.mktemp("runs"))
    spec = tiny_spec(root, tiny_dataset, "reference", "checkpoint.async_upload=false")
    train(spec)
    losses = step_losses(read_metrics(join(root, "reference"), Storage()))
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    return losses


@pytest.mark.integration
def test_run_on_s3_with_async_checkpoints(reference, tiny_dataset, s3_server, capfd):
    storage = Storage()
    root = f"s3://raygpt-test/runs-{id(reference)}"
    spec = tiny_spec(root, tiny_dataset, "s3run")
    summary = train(spec)
    run = join(root, "s3run")

    # Same losses as the reference: async uploads and S3 change nothing about the maths.
    records = read_metrics(run, storage)
    assert step_losses(records) == reference
    assert records[-1]["loss"] < records[0]["loss"]
    assert [r["step"] for r in records] == [2, 3, 4, 6, 8]  # log interval 2, checkpoints at 3, 6, 8
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert {r["step"] for r in records if "checkpoint_stall_s" in r} == {3, 6, 8}
    assert all(r["checkpoint_stall_s"] >= 0 for r in records if "checkpoint_stall_s" in r)
    first = records[0]
    assert first["resumed_from_step"] == 0 and first["world_size"] == 2 and len(first["devices"]) == 2

    # Checkpoints: Ray Train keeps the last two, each holding every component.
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
    assert record["spec"]["train"]["dataset"] == tiny_dataset and record["seeds"] == {"train": 1337}
    assert len(record["dataset"]["manifest_sha256"]) == 64
    assert {"torch", "ray", "numpy", "pyarrow", "tiktoken"} <= set(record["packages"])
    assert record["plan"]["grad_accum_steps"] == 2 and record["hardware"]["workers"] == 2
    assert record["final"]["step"] == MAX_STEPS and record["final"]["val_loss"] == records[-1]["val_loss"]

    # Evaluation and fine-tuning read the newest checkpoint by run name.
    model, info = load_model("s3run", spec, storage)
    assert (info["step"], info["tokens"], info["checkpoint"]) == (8, 8192, latest_checkpoint(run, storage))

    # No credential anywhere: records, driver output, or any Ray log of the session.
    import ray

    secret = s3_server.secret_key
    assert secret not in storage.read_text(join(run, "run.json"))
    assert secret not in storage.read_text(join(run, "metrics.jsonl"))
    out, err = capfd.readouterr()
    assert secret not in out + err
    logs = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.integration
def test_killed_worker_restarts_from_the_last_checkpoint_with_the_same_losses(reference, tiny_dataset, tmp_path):
    spec = tiny_spec(str(tmp_path), tiny_dataset, "killed", "train.fail_at_step=5", "checkpoint.async_upload=false")
    summary = train(spec)
    records = read_metrics(str(tmp_path / "killed"), Storage())
    assert step_losses(records) == reference  # bitwise: dropout masks, data order, optimizer all restored
    resumed = [r["resumed_from_step"] for r in records if "resumed_from_step" in r]
    assert resumed == [0, 3]  # the second attempt started from checkpoint_00000003
    assert summary["restarts"] == 1 and summary["status"] == "finished"


@pytest.mark.integration
def test_new_session_of_the_same_run_continues_from_storage(reference, tiny_dataset, tmp_path):
    """A whole-cluster loss: the run is started again, and Ray Train resumes it by name."""
    first = train(tiny_spec(str(tmp_path), tiny_dataset, "sessions", "train.stop_at_step=3"))
    assert first["status"] == "stopped" and first["final"]["step"] == 3
    second = train(tiny_spec(str(tmp_path), tiny_dataset, "sessions"))
    assert second["status"] == "finished" and second["sessions"] == 2
    records = read_metrics(str(tmp_path / "sessions"), Storage())
    assert step_losses(records) == reference
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [0, 3]
    again = train(tiny_spec(str(tmp_path), tiny_dataset, "sessions"))  # already done: no new session
    assert again["final"]["step"] == MAX_STEPS
    run_json = json.loads((tmp_path / "sessions" / "run.json").read_text())
    assert run_json["sessions"] == 2
