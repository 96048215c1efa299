"""Training-step throughput: tokens/s, MFU and peak memory of one model preset on this device.

    python benchmarks/train_step.py --preset gpt2-small --micro-batch 16 --steps 20 [--compile]
    python benchmarks/train_step.py --preset tiny --preset nano          # CPU-sized presets

Measures what one worker of ``raygpt train`` does per micro-batch (forward and backward under
the run's autocast, gradient clipping, fused AdamW on GPUs), on random tokens so that data
loading does not count, without Ray. The first ``--warmup`` steps (compilation, allocator
growth) are not timed. MFU is the model's training FLOPs per token (6 per weight plus
attention) times tokens/s over the GPU's dense bf16 peak; it is blank on CPUs, whose peak
raygpt does not know, unless ``--peak-tflops`` gives one.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from rich.console import Console
from rich.table import Table

from raygpt.model import GPT, PRESETS
from raygpt.train.components import choose_precision
from raygpt.train.metrics import device_name, peak_flops


def measure(preset: str, device: torch.device, precision_setting: str, micro_batch: int, seq_len: int | None,
            steps: int, warmup: int, compile_model: bool, peak_tflops: float | None) -> dict:
    config = PRESETS[preset]
    seq_len = min(seq_len or config.context_length, config.context_length)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), device.type)
    precision = choose_precision(precision_setting, device)
    step_model = torch.compile(model) if compile_model else model
    x = torch.randint(0, config.vocab_size, (micro_batch, seq_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> None:
        with precision.autocast():
            _, loss = step_model(inputs, targets)
        precision.scaler.scale(loss).backward()
        precision.scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - started

    tokens_per_s = steps * micro_batch * seq_len / seconds
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops(device, precision.name)
    if device.type == "cuda":
        memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # the process's peak resident set (Linux reports KiB)
        memory_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"preset": preset, "params": model.num_params(), "device": str(device),
            "dtype": precision.name + (" + compile" if compile_model else ""), "micro_batch": micro_batch,
            "seq_len": seq_len, "tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "mfu": model.flops_per_token(seq_len) * tokens_per_s / peak if peak else None,
            "peak_memory_gib": memory_gib}


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

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    presets = args.preset or (["gpt2-small"] if device.type == "cuda" else ["tiny"])
    micro_batch = args.micro_batch or (16 if device.type == "cuda" else 8)

    table = Table(title=f"training step on {device_name(device)} (torch {torch.__version__}, "
                        f"{torch.get_num_threads()} CPU threads)", title_justify="left")
    for column in ("preset", "params", "device", "dtype", "micro batch", "seq len", "tokens/s", "step", "MFU",
                   "peak memory"):
        table.add_column(column, justify="left" if column in ("preset", "device", "dtype") else "right")
    for preset in presets:
        r = measure(preset, device, args.precision, micro_batch, args.seq_len, args.steps, args.warmup,
                    args.compile, args.peak_tflops)
        table.add_row(r["preset"], f"{r['params'] / 1e6:.1f}M", r["device"], r["dtype"], str(r["micro_batch"]),
                      str(r["seq_len"]), f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f} ms",
                      f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a", f"{r['peak_memory_gib']:.2f} GiB")
    console = Console()
    (console if console.is_terminal else Console(width=140)).print(table)


if __name__ == "__main__":
    main()
