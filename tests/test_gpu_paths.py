"""The GPU paths, run on a CPU: bf16 autocast training, the fused AdamW the GPU path builds,
batches widened on the device, torch.compile under DDP on two Gloo workers with a checkpoint
that loads into a bare model, reports held back for a background checkpoint, and the Ray-free
GPU check (benchmarks/gpu_check.py) end to end, and every benchmark's handling of a device
name against the rule torch.cuda.set_device enforces."""

from __future__ import annotations

import ast
import importlib
import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.model import GPT, GPTConfig
from raygpt.train.components import use_device
from raygpt.train.metrics import MetricsWindow, summarize
from raygpt.train.plan import plan_run
from raygpt.train.step import (
    Reports,
    nonfinite_stop,
    reserve_checkpoint_buffers,
    set_up_worker,
    start_checkpoint,
    train_step,
    weights_finite,
)
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
        loss, _, _ = train_step(w, w.state.step)
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


def test_a_new_run_trains_a_padded_vocabulary_and_an_unpadded_checkpoint_resumes_unpadded(dataset, tmp_path):
    spec, plan = worker_spec(dataset, tmp_path)  # model.vocab_multiple left open, as in the shipped specs
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        assert w.model.transformer.wte.weight.shape == (50304, 32)
    finally:
        w.close()
    spec, plan = worker_spec(dataset, tmp_path, "model.vocab_multiple=1")  # a run of raygpt before the default
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        train(w, 2)
        start_checkpoint(w, tmp_path / "unpadded")
        w.writer.wait()
        weights = {k: v.clone() for k, v in w.model.state_dict().items()}
    finally:
        w.close()
    spec, plan = worker_spec(dataset, tmp_path)
    resumed = set_up_worker(spec, plan, 0, 1, torch.device("cpu"), tmp_path / "unpadded", "unpadded")
    try:
        assert resumed.state.step == 2 and resumed.model.config.padded_vocab_size == 50257
        assert all(torch.equal(v, weights[k]) for k, v in resumed.model.state_dict().items())
        train(resumed, 1)
    finally:
        resumed.close()


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


def test_with_its_buffers_reserved_the_first_save_allocates_no_host_memory(dataset, tmp_path, monkeypatch):
    spec, plan = worker_spec(dataset, tmp_path, "model.tie_weights=true")
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        train(w, 1)  # the optimizer's state exists from the first step on
        reserve_checkpoint_buffers(w)
        w.writer.wait()
        allocations = []
        empty = torch.empty

        def counting_empty(*args, **kwargs):
            allocations.append(kwargs.get("pin_memory"))  # HostCopies always says whether to pin
            return empty(*args, **kwargs)

        monkeypatch.setattr(torch, "empty", counting_empty)
        parts = start_checkpoint(w, tmp_path / "first")
        w.writer.wait()
        monkeypatch.setattr(torch, "empty", empty)
        assert allocations == [] and set(parts) == {"previous_write_s", "copy_s"}
        saved = torch.load(tmp_path / "first" / "model.pt", weights_only=True)
        assert all(torch.equal(v, saved[k]) for k, v in w.model.state_dict().items())
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
# Non-finite steps: skipped on the device, counted in the metrics, a stop that names the steps


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_a_step_with_a_non_finite_gradient_norm_leaves_weights_and_optimizer_alone(dataset, tmp_path, fused):
    spec, plan = worker_spec(dataset, tmp_path, "train.lr=1e4", "train.warmup_steps=0")
    w = set_up_worker(spec, plan, 0, 1, torch.device("cpu"))
    try:
        if fused:  # what a GPU worker builds: the skip travels to the kernel as found_inf, no host sync
            w.optimizer = w.model.configure_optimizer(1e4, 0.1, (0.9, 0.95), "cuda")
            assert w.optimizer.defaults["fused"]
        loss, grad_norm, skipped = train_step(w, 0)
        assert torch.isfinite(grad_norm) and not skipped  # the first step is fine, and throws the weights far
        w.state.advance(plan.global_batch_tokens)
        weights = {k: v.clone() for k, v in w.model.state_dict().items()}
        moments = {k: v.clone() for k, v in w.optimizer.state_dict()["state"][0].items()}
        for step in (1, 2):
            loss, grad_norm, skipped = train_step(w, step)
            assert skipped and not torch.isfinite(grad_norm)
        assert all(torch.equal(v, weights[k]) for k, v in w.model.state_dict().items())
        assert all(torch.equal(v, moments[k]) for k, v in w.optimizer.state_dict()["state"][0].items())
        assert weights_finite(w.model)
        with torch.no_grad():
            next(w.model.parameters())[0, 0] = float("nan")
        assert not weights_finite(w.model)
    finally:
        w.close()


def test_the_metrics_window_lists_skipped_steps_and_counts_them_in_a_row():
    window = MetricsWindow(first_step=1, world_size=1, global_batch_tokens=64, flops_per_token=1, peak_flops=None,
                           device=torch.device("cpu"))
    flags = [False, True, False, True, True, True]
    for i, flag in enumerate(flags):
        window.add(torch.tensor(float("nan") if flag else 2.0 + i), torch.tensor(1.0), 1e-3, 0, torch.tensor(flag))
        if i in (2, 5):
            record = window.flush(i + 1, 64 * (i + 1))
            if i == 2:
                assert record["skipped_steps"] == [2] and record["loss"] == 3.0  # the mean of steps 1 and 3
                assert (window.skipped_in_a_row, window.first_skipped) == (0, None)
    assert record["skipped_steps"] == [4, 5, 6] and math.isnan(record["loss"])
    assert (window.skipped_in_a_row, window.first_skipped) == (3, 4)
    assert summarize([{"step": 3, "skipped_steps": [2]}, record])["skipped_steps"] == 4


def test_non_finite_steps_stop_the_run_with_a_message_naming_them():
    spec = load_spec(None, ["train.max_nonfinite_skips=3"])
    assert nonfinite_stop(spec.train, 0, None, 9) is None
    assert nonfinite_stop(spec.train, 2, 8, 9) is None  # skipped, not yet 3 in a row
    assert nonfinite_stop(spec.train, 3, 7, 9).startswith(
        "train: steps 7-9: 3 steps in a row had a non-finite loss or gradient norm and were skipped "
        "(train.max_nonfinite_skips: 3): the training diverged; lower train.lr")
    spec.train.on_nonfinite = "stop"
    assert nonfinite_stop(spec.train, 1, 9, 10).startswith(
        "train: step 9 had a non-finite loss or gradient norm (train.on_nonfinite: stop); its update was skipped and "
        "the run stopped at step 10")


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


# ---------------------------------------------------------------------------------------------
# Device names: torch.cuda.set_device refuses a CUDA device without an index ("cuda")


class DeviceTaken(Exception):
    """The stand-in for torch.cuda.set_device accepted the device: the script stops there."""


@pytest.fixture
def strict_cuda(monkeypatch):
    """A CUDA that exists for the device handling only: set_device checks its argument by
    torch's own rule (a ValueError for ``cuda`` without an index), then stops the caller."""
    def set_device(device):
        raise DeviceTaken(torch.cuda._utils._get_device_index(device))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)


@pytest.mark.parametrize("script", ["gpu_check", "train_step", "checkpoint_stall", "model_vs_hf"])
@pytest.mark.parametrize("name,index", [("cuda", 0), ("cuda:1", 1)])
def test_every_benchmark_takes_a_cuda_device_with_or_without_an_index(strict_cuda, monkeypatch, script, name, index):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--device", name])
    with pytest.raises(DeviceTaken) as taken:
        module.main()
    assert taken.value.args == (index,)


def test_use_device_names_one_device_and_refuses_cuda_where_there_is_none(strict_cuda, monkeypatch):
    assert use_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceTaken) as taken:
        use_device(torch.device("cuda"))
    assert taken.value.args == (0,)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RaygptError, match="device cuda: no CUDA device here"):
        use_device("cuda")


def test_only_use_device_calls_torch_cuda_set_device():
    """A new entry point that calls set_device itself would bring the index-less crash back."""
    callers = []
    for path in [*(ROOT / "raygpt").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                calls = [c for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)
                         and c.func.attr == "set_device"]
                callers += [f"{path.relative_to(ROOT)}:{node.name}" for _ in calls]
    assert callers == ["raygpt/train/components.py:use_device"]
