"""The GPU paths, run on a CPU: bf16 autocast training, the fused AdamW the GPU path builds,
batches widened on the device, torch.compile under DDP on two Gloo workers with a checkpoint
that loads into a bare model, reports held back for a background checkpoint, and the Ray-free
GPU check (benchmarks/gpu_check.py) end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raygpt.model import GPT, GPTConfig
from raygpt.train.plan import plan_run
from raygpt.train.step import Reports, set_up_worker, start_checkpoint, train_step
from raygpt.weights import checkpoint as checkpoint_module
from raygpt.weights.checkpoint import CheckpointWriter, load_training_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from train_step import benchmark_spec, write_synthetic_dataset  # noqa: E402

SEQ_LEN, BATCH, MICRO_BATCH = 32, 16, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synthetic", train_tokens=40_000,
                                   val_tokens=2_000)


def worker_spec(dataset: str, storage_path, *overrides: str):
    """The tiny preset, BATCH sequences of SEQ_LEN per step in micro-batches of MICRO_BATCH."""
    spec = benchmark_spec(dataset, str(storage_path), "tiny", SEQ_LEN, MICRO_BATCH, 10, "fp32", False,
                          f"train.global_batch_tokens={BATCH * SEQ_LEN}", "train.lr=3e-3", *overrides)
    return spec, plan_run(spec, 40_000, use_gpu=False)


def train(w, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss, _ = train_step(w, w.state.step)
        w.state.advance(w.plan.global_batch_tokens)
        losses.append(float(loss))
    return losses


def test_bf16_autocast_trains_like_fp32_through_the_worker_step(dataset, tmp_path):
    losses, weights = {}, {}
    for precision in ("fp32", "bf16"):
        spec, plan = worker_spec(dataset, tmp_path, f"train.precision={precision}")
        w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
        try:
            assert w.precision.dtype == (torch.bfloat16 if precision == "bf16" else None)
            losses[precision] = train(w, 4)
            assert all(p.dtype == torch.float32 for p in w.model.parameters())  # autocast: fp32 master weights
            start_checkpoint(w, tmp_path / precision)
            w.writer.wait()
            weights[precision] = {k: v.clone() for k, v in w.model.state_dict().items()}
        finally:
            w.close()
    assert losses["bf16"] != losses["fp32"]  # the matmuls did run in bf16
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=2e-2)
    assert losses["bf16"][-1] < losses["bf16"][0]
    # A bf16 run's checkpoint is an ordinary fp32 one.
    spec, plan = worker_spec(dataset, tmp_path, "train.precision=fp32")
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"), tmp_path / "bf16", "bf16")
    try:
        assert w.state.step == 4
        assert all(torch.equal(v, weights["bf16"][k]) for k, v in w.model.state_dict().items())
    finally:
        w.close()


def test_the_fused_adamw_the_gpu_path_builds_steps_on_cpu_like_the_default():
    config = GPTConfig(vocab_size=97, context_length=16, n_layer=2, n_head=2, n_embd=16)
    models, optimizers = [], []
    for device_type in ("cuda", "cpu"):  # what configure_optimizer builds for a GPU, and for a CPU
        torch.manual_seed(0)
        models.append(GPT(config))
        optimizers.append(models[-1].configure_optimizer(1e-2, 0.1, (0.9, 0.95), device_type))
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    data = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randint(0, 97, (4, 16), generator=data)
        for model, optimizer in zip(models, optimizers):
            _, loss = model(x, x.roll(-1, dims=1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for fused, default in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)
    # The fused optimizer's state is an ordinary AdamW state: a CPU run resumes from it.
    optimizers[1].load_state_dict(optimizers[0].state_dict())


def test_device_batches_are_the_reference_micro_batches(dataset, tmp_path):
    spec, plan = worker_spec(dataset, tmp_path)
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        for step in range(3):
            reference = w.batches.micro_batches(step, 0, 1, MICRO_BATCH)
            on_device = w.device_batches.micro_batches(step)
            assert len(on_device) == len(reference) == BATCH // MICRO_BATCH
            for (x, y), (rx, ry) in zip(on_device, reference):
                assert x.dtype == torch.int64 and torch.equal(x, rx) and torch.equal(y, ry)
        with pytest.raises(ValueError, match="out: expected uint16 of shape"):
            w.batches.rows(0, 0, 1, MICRO_BATCH, out=np.empty((BATCH, SEQ_LEN), dtype=np.uint16))
    finally:
        w.close()


def test_reports_behind_a_background_checkpoint_wait_for_its_files_and_keep_their_order(monkeypatch):
    release_write = threading.Event()
    written = []

    def slow_write(snapshot, directory):
        release_write.wait(timeout=60)
        if directory == "broken":
            raise OSError("No space left on device")
        written.append(directory)

    monkeypatch.setattr(checkpoint_module, "write_training_snapshot", slow_write)
    writer = CheckpointWriter()
    reports = Reports(writer, world_size=1, device=torch.device("cpu"))
    sent = []

    def send(metrics, checkpoint):
        assert checkpoint is None or checkpoint in written  # never before its files are complete
        sent.append((metrics["step"], checkpoint))

    try:
        reports.add({"step": 1})
        reports.release(send)
        assert sent == [(1, None)]

        writer.start(object(), "ckpt-2")
        reports.add({"step": 2}, "ckpt-2")
        reports.add({"step": 2, "checkpoint_stall_s": 0.01})
        reports.release(send)
        reports.add({"step": 3})
        reports.release(send)
        assert sent == [(1, None)]  # held: the files are being written
        release_write.set()
        reports.release(send, wait=True)
        assert sent == [(1, None), (2, "ckpt-2"), (2, None), (3, None)]

        writer.start(object(), "broken")
        reports.add({"step": 4}, "broken")
        with pytest.raises(OSError, match="No space left"):
            reports.release(send, wait=True)
    finally:
        release_write.set()
        writer.close()


# ---------------------------------------------------------------------------------------------
# torch.compile under DDP: two Gloo workers


def ddp_worker(rank: int, init_file: str, dataset: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        spec, plan = worker_spec(dataset, out, "train.compile=true")
        w = set_up_worker(spec, plan, rank, 2, torch.device("cpu"))
        try:
            wrapped = w.training_model
            assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
            assert hasattr(wrapped.module, "_orig_mod")  # compiled, then wrapped
            losses = train(w, 3)
            start_checkpoint(w, Path(out) / "checkpoint")
            w.writer.wait()
            (Path(out) / f"losses{rank}.json").write_text(json.dumps(losses))
            torch.save(w.model.state_dict(), Path(out) / f"weights{rank}.pt")
        finally:
            w.close()
    finally:
        dist.destroy_process_group()


def test_compiled_ddp_on_two_gloo_workers_trains_like_one_eager_worker_and_saves_a_bare_checkpoint(dataset, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(ddp_worker, args=(str(tmp_path / "init"), dataset, str(tmp_path)), nprocs=2, join=True)
    # Each worker reports its part of the global batch's mean loss: their sum is that mean.
    ddp_losses = np.sum([json.loads((tmp_path / f"losses{r}.json").read_text()) for r in (0, 1)], axis=0)

    spec, plan = worker_spec(dataset, tmp_path)
    eager = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        eager_losses = train(eager, 3)
    finally:
        eager.close()
    # The same gradients (the global batch's mean), summed in another order.
    assert ddp_losses.tolist() == pytest.approx(eager_losses, rel=1e-5)

    checkpoint = tmp_path / "checkpoint"
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "model.pt", "model_config.json", "optimizer.pt", "rng_rank0.pt", "rng_rank1.pt", "trainer_state.json"]
    bare = GPT(GPTConfig(**json.loads((checkpoint / "model_config.json").read_text())))
    assert list(torch.load(checkpoint / "model.pt", weights_only=True)) == list(bare.state_dict())  # no prefixes
    weights = torch.load(tmp_path / "weights0.pt", weights_only=True)
    spec, plan = worker_spec(dataset, tmp_path)
    resumed = set_up_worker(spec, plan, 0, 1, torch.device("cpu"), checkpoint, "compiled-ddp")
    try:
        assert resumed.state.step == 3
        assert all(torch.equal(v, weights[k]) for k, v in resumed.model.state_dict().items())
        optimizer = bare.configure_optimizer(1e-3, 0.1, (0.9, 0.95), "cpu")
        assert load_training_checkpoint(checkpoint, 1, model=bare, optimizer=optimizer, trainer=resumed.state,
                                        rng=resumed.rng, expected="the tiny preset", where="compiled-ddp")
    finally:
        resumed.close()


# ---------------------------------------------------------------------------------------------
# The GPU check, on a CPU, where neither Ray nor boto3 can be imported


def test_the_gpu_check_runs_end_to_end_without_ray_or_boto3(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # sitecustomize runs in every Python process started with this PYTHONPATH: the check's
    # own child (the training that is killed) cannot import them either.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules.update({'ray': None, 'boto3': None})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT)])}
    figures = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick",
                           "--json", str(figures)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "raygpt GPU check on cpu" in done.stdout
    r = json.loads(figures.read_text())
    assert r["bf16_logits"]["ok"] and r["flash_attention"]["ok"] and r["kv_cache"]["ok"]
    assert [s["micro_batch"] for s in r["step"]] == [2] and r["step"][0]["tokens_per_s"] > 0
    resume = r["resume"]
    assert (resume["resumed_from"], resume["redone_steps"], resume["latest"]) == (4, [5, 5], "checkpoint_00000006")
    assert resume["max_loss_difference"] == 0.0  # bitwise on CPU
    assert r["checkpoint_stall"]["synchronous_s"] > 0 and r["checkpoint_stall"]["stall_s"] >= 0
