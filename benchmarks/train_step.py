"""Training-step throughput: tokens/s, MFU and peak memory of one worker's step, without Ray.

    python benchmarks/train_step.py --preset gpt2-small --micro-batch 16 --steps 20 [--compile]
    python benchmarks/train_step.py --preset tiny --preset nano          # CPU-sized presets

Runs what one worker of ``raygpt train`` runs per step, through the same code
(``raygpt.train.step``: ``set_up_worker`` then ``train_step``: uint16 rows in reused host
buffers, pinned on GPUs; the run's autocast; clipping; fused AdamW on GPUs), on a synthetic
dataset written to a temporary folder. One micro-batch per step, one worker. The first
``--warmup`` steps (compilation, allocator growth) are not timed. MFU is the model's training
FLOPs per token (6 per weight plus attention) times tokens/s over the GPU's dense bf16 peak;
it is blank on CPUs, whose peak raygpt does not know, unless ``--peak-tflops`` gives one.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from raygpt.config import RunSpec, load_spec
from raygpt.model import PRESETS
from raygpt.train.components import use_device
from raygpt.train.metrics import device_name
from raygpt.train.plan import TrainPlan, plan_run
from raygpt.train.step import Worker, set_up_worker, train_step


def write_synthetic_dataset(root: str | Path, train_tokens: int, val_tokens: int = 0, seed: int = 0,
                            test_tokens: int = 0) -> str:
    """A prepared dataset (``manifest.json`` and uint16 shards) of learnable synthetic text:
    random slices of one fixed random passage of 4,096 tokens, so a model's loss falls from
    ln(50257) as it memorises the passage. Two train shards, a val and a test shard when asked."""
    rng = np.random.default_rng(seed)
    passage = rng.integers(0, 50_000, 4096)

    def stream(n: int) -> np.ndarray:
        starts = rng.integers(0, len(passage) - 256, n // 32 + 1)
        lengths = rng.integers(32, 256, len(starts))
        return np.concatenate([passage[s:s + n_] for s, n_ in zip(starts, lengths)])[:n].astype("<u2")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    half = train_tokens // 2
    sizes = {"train": [half, train_tokens - half], "val": [val_tokens] if val_tokens else [],
             "test": [test_tokens] if test_tokens else []}
    manifest = {"format": "raygpt-shards/1", "tokenizer": "gpt2", "dtype": "uint16", "eot_id": 50256,
                "source": "synthetic", "splits": {}}
    for split, counts in sizes.items():
        shards = []
        for i, n in enumerate(counts):
            data = stream(n).tobytes()
            name = f"{split}_{i:06d}.bin"
            (root / name).write_bytes(data)
            shards.append({"name": name, "tokens": n, "sha256": hashlib.sha256(data).hexdigest()})
        manifest["splits"][split] = {"tokens": sum(counts), "shards": shards}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return str(root)


def benchmark_spec(dataset: str, storage_path: str, preset: str, seq_len: int, micro_batch: int, steps: int,
                   precision: str, compile_model: bool, *overrides: str) -> RunSpec:
    """One worker, one micro-batch of ``micro_batch`` sequences per step."""
    return load_spec(None, [
        "name=benchmark", f"storage_path={storage_path}", f"model.preset={preset}", f"train.dataset={dataset}",
        f"train.seq_len={seq_len}", f"train.global_batch_tokens={micro_batch * seq_len}",
        f"train.micro_batch_size={micro_batch}", f"train.max_steps={steps}", "train.warmup_steps=2",
        f"train.precision={precision}", f"train.compile={str(compile_model).lower()}", "train.val_interval=0",
        *overrides])


def release(w: Worker | None) -> None:
    """Free a worker's memory so the next case's peak is its own."""
    if w is not None:
        w.close()
    gc.collect()
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure(preset: str, device: torch.device, precision: str, micro_batch: int, seq_len: int | None,
            steps: int, warmup: int, compile_model: bool, peak_tflops: float | None,
            workdir: str | Path) -> dict:
    """Time ``steps`` worker steps after ``warmup`` untimed ones."""
    config = PRESETS[preset]
    seq_len = min(seq_len or config.context_length, config.context_length)
    total = warmup + steps
    dataset = write_synthetic_dataset(Path(workdir) / f"data-{micro_batch}x{seq_len}",
                                      train_tokens=(total + 2) * micro_batch * seq_len + 4)
    spec = benchmark_spec(dataset, str(Path(workdir) / "runs"), preset, seq_len, micro_batch, total, precision,
                          compile_model)
    plan: TrainPlan = plan_run(spec, (total + 2) * micro_batch * seq_len, use_gpu=device.type == "cuda")
    release(None)
    w = set_up_worker(spec, plan, 0, 1, device)
    try:
        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        started = time.perf_counter()
        for step in range(warmup):
            train_step(w, step)
        sync()
        warmup_s = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(warmup, total):
            loss, _, _ = train_step(w, step)
        sync()
        seconds = time.perf_counter() - started
        tokens_per_s = steps * micro_batch * seq_len / seconds
        peak = peak_tflops * 1e12 if peak_tflops else w.peak_flops
        if device.type == "cuda":
            memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
        else:  # the process's peak resident set (Linux reports KiB)
            memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return {"preset": preset, "params": w.model.num_params(), "device": str(device),
                "precision": w.precision.name, "compile": compile_model,
                "fused_adamw": bool(w.optimizer.defaults.get("fused")), "micro_batch": micro_batch,
                "seq_len": seq_len, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
                "warmup_s": warmup_s, "mfu": w.flops_per_token * tokens_per_s / peak if peak else None,
                "peak_memory_gib": memory_gib, "loss": float(loss)}
    finally:
        release(w)


def step_table(results: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("preset", "params", "dtype", "micro batch", "seq len", "tokens/s", "step", "MFU", "peak memory",
                   "warm-up"):
        table.add_column(column, justify="left" if column in ("preset", "dtype") else "right")
    for r in results:
        table.add_row(r["preset"], f"{r['params'] / 1e6:.1f}M", dtype_label(r), str(r["micro_batch"]),
                      str(r["seq_len"]), f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f} ms",
                      f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a",
                      f"{r['peak_memory_gib']:.2f} GiB", f"{r['warmup_s']:.1f} s")
    return table


def dtype_label(r: dict) -> str:
    return r["precision"] + (" + compile" if r["compile"] else "") + (" + fused AdamW" if r["fused_adamw"] else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="model preset (repeatable; default gpt2-small on GPU, tiny on CPU)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 16 GPU, 8 CPU)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default, and at most: the preset's context length)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device, for MFU on CPUs "
                                                                         "or GPUs raygpt does not know")
    args = parser.parse_args()

    device = use_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    presets = args.preset or (["gpt2-small"] if device.type == "cuda" else ["tiny"])
    micro_batch = args.micro_batch or (16 if device.type == "cuda" else 8)
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as workdir:
        results = [measure(p, device, args.precision, micro_batch, args.seq_len, args.steps, args.warmup,
                           args.compile, args.peak_tflops, workdir) for p in presets]
    console = Console()
    (console if console.is_terminal else Console(width=140)).print(step_table(
        results, f"training step on {device_name(device)} (torch {torch.__version__}, "
                 f"{torch.get_num_threads()} CPU threads)"))


if __name__ == "__main__":
    main()
