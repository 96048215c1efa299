"""raygpt's training step against transformers' ``GPT2LMHeadModel`` at the same shape, in the same loop.

    python -m benchmarks.model_vs_hf                        # CPU: 4 layers, 256 wide, fp32, ~1 min on 2 cores
    python -m benchmarks.model_vs_hf --device cuda          # GPU: gpt2-small shape, 1024 tokens, bf16,
                                                            # micro-batch 16 and 64, eager and compiled
    python -m benchmarks.model_vs_hf --device cuda --batch 32 --mode compile --json model_vs_hf.json

Both models get OpenAI's GPT-2 layout (QKV bias, head tied to the token embedding, GELU-tanh,
no dropout, the vocabulary of 50,257 unless ``--vocab-multiple`` pads raygpt's), the same
random tokens and the same AdamW (decay on 2-D weights; fused on GPUs), transformers with
its SDPA attention. A step is forward, loss, backward and optimizer step, under bf16
autocast on GPUs (``--precision``), float32 on CPUs. Per case (micro-batch, eager or
``torch.compile``) both models are built, warmed up (``--warmup`` steps each: compilation,
autotuning), then take turns step by step, the order swapped every round, so a noisy machine
slows both alike; the table reports the median step time, tokens/s and the ratio. On CUDA it
also reports each model's peak memory: its weights, gradients and optimizer state plus the
most its own steps allocated on top (both models live on the GPU at once).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from rich.console import Console
from rich.table import Table

from raygpt.model import GPT, GPTConfig
from raygpt.train.components import use_device
from raygpt.train.metrics import device_name

NAMES = ("raygpt", "transformers")


def adamw(model: torch.nn.Module, device: torch.device) -> torch.optim.AdamW:
    """raygpt's optimizer rule, for either model: decay 2-D weights, not biases or LayerNorms;
    fused on GPUs, as raygpt's training builds it."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")


class Stepper:
    """One model, its optimizer and the loss it computes, stepped on fixed tokens."""

    def __init__(self, model: torch.nn.Module, loss_of, device: torch.device, dtype: torch.dtype | None,
                 compile_model: bool):
        self.model = model.to(device).train()
        self.optimizer = adamw(self.model, device)
        self.run = torch.compile(self.model) if compile_model else self.model
        self.loss_of, self.device, self.dtype = loss_of, device, dtype
        self.times: list[float] = []
        self.transient_bytes = 0

    def step(self, timed: bool) -> float:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        started = time.perf_counter()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss_of(self.run)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the device: the step is done
        if timed:
            self.times.append(time.perf_counter() - started)
        if self.device.type == "cuda":
            self.transient_bytes = max(self.transient_bytes, torch.cuda.max_memory_allocated(self.device) - before)
        return value

    def peak_memory_gib(self) -> float:
        """Weights, optimizer state and gradients, plus what the steps allocated beyond them."""
        tensors = list(self.model.parameters())
        tensors += [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        persistent = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cuda")
        return (persistent + self.transient_bytes) / 2**30


def build(args, device: torch.device, batch: int, compile_model: bool) -> dict:
    n_head = max(1, args.n_embd // 64)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=args.n_layer, n_head=n_head, n_embd=args.n_embd, context_length=args.seq_len,
                         qkv_bias=True, tie_weights=True, vocab_multiple=args.vocab_multiple))
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=args.n_layer, n_head=n_head, n_embd=args.n_embd, n_positions=args.seq_len,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa"))
    tokens = torch.randint(0, 50257, (batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()
    dtype = None if device.type == "cpu" or args.precision == "fp32" else torch.bfloat16
    # transformers shifts ``labels`` itself, so it gets the unshifted tokens: T logits, T-1 targets.
    return {"raygpt": Stepper(ours, lambda m: m(inputs, targets)[1], device, dtype, compile_model),
            "transformers": Stepper(theirs, lambda m: m(input_ids=inputs, labels=inputs).loss, device, dtype,
                                    compile_model),
            "params": ours.num_params(), "hf_attention": theirs.config._attn_implementation,
            "precision": "bf16" if dtype is not None else "fp32"}


def measure(args, device: torch.device, batch: int, compile_model: bool) -> dict:
    built = build(args, device, batch, compile_model)
    steppers = {name: built[name] for name in NAMES}
    started = time.perf_counter()
    for _ in range(args.warmup):
        for name in NAMES:
            steppers[name].step(timed=False)
    warmup_s = time.perf_counter() - started
    for i in range(args.steps):
        for name in (NAMES if i % 2 == 0 else NAMES[::-1]):
            steppers[name].step(timed=True)
    tokens = batch * args.seq_len
    result = {"batch": batch, "seq_len": args.seq_len, "mode": "compile" if compile_model else "eager",
              "precision": built["precision"], "params": built["params"], "hf_attention": built["hf_attention"],
              "warmup_s": warmup_s}
    for name, s in steppers.items():
        median = statistics.median(s.times)
        result[name] = {"median_step_s": median, "min_step_s": min(s.times), "tokens_per_s": tokens / median,
                        "peak_memory_gib": s.peak_memory_gib() if device.type == "cuda" else None}
    result["raygpt_vs_transformers"] = result["raygpt"]["tokens_per_s"] / result["transformers"]["tokens_per_s"]
    del built, steppers
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--n-layer", type=int, default=None, help="default 12 on GPUs, 4 on CPUs")
    parser.add_argument("--n-embd", type=int, default=None, help="width, heads 64 wide; default 768 GPU, 256 CPU")
    parser.add_argument("--seq-len", type=int, default=None, help="default 1024 GPU, 256 CPU")
    parser.add_argument("--batch", type=int, action="append", help="micro-batch, repeatable; default 16 and 64 "
                                                                    "on GPUs, 8 on CPUs")
    parser.add_argument("--mode", choices=["eager", "compile"], action="append",
                        help="repeatable; default eager and compile on GPUs, eager on CPUs")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="on GPUs (CPUs: fp32)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per model first (default 3 GPU, "
                                                                 "2 CPU)")
    parser.add_argument("--vocab-multiple", type=int, default=1, help="raygpt's vocabulary padding (1: none)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # not its note about the default loss, once per step

    device = use_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.n_layer = args.n_layer or (12 if gpu else 4)
    args.n_embd = args.n_embd or (768 if gpu else 256)
    args.seq_len = args.seq_len or (1024 if gpu else 256)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 2)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cases = [(batch, mode == "compile") for mode in (args.mode or (["eager", "compile"] if gpu else ["eager"]))
             for batch in (args.batch or ([16, 64] if gpu else [8]))]
    results = [measure(args, device, batch, compile_model) for batch, compile_model in cases]

    machine = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
               "transformers": transformers.__version__, "cpu_threads": torch.get_num_threads(),
               "load_average": os.getloadavg()[0]}
    console = Console()
    console = console if console.is_terminal else Console(width=160)
    console.print(f"training step, {args.n_layer} layers x {args.n_embd} wide ({results[0]['params'] / 1e6:.1f}M "
                  f"params), {args.seq_len} tokens per sequence, {args.steps} timed steps each, on "
                  f"{machine['device']}; torch {machine['torch']}"
                  + (f" (CUDA {machine['cuda']})" if gpu else "") + f", transformers {machine['transformers']} "
                  f"({results[0]['hf_attention']} attention), {machine['cpu_threads']} CPU threads, load average "
                  f"{machine['load_average']:.1f}")
    table = Table()
    for column in ("micro-batch", "mode", "dtype", "raygpt tokens/s", "transformers tokens/s", "raygpt / transformers",
                   *(("raygpt peak", "transformers peak") if gpu else ()), "warm-up"):
        table.add_column(column, justify="left" if column in ("mode", "dtype") else "right")
    for r in results:
        table.add_row(str(r["batch"]), r["mode"], r["precision"], f"{r['raygpt']['tokens_per_s']:,.0f}",
                      f"{r['transformers']['tokens_per_s']:,.0f}", f"{r['raygpt_vs_transformers']:.2f}x",
                      *((f"{r['raygpt']['peak_memory_gib']:.1f} GiB", f"{r['transformers']['peak_memory_gib']:.1f} GiB")
                        if gpu else ()), f"{r['warmup_s']:.0f} s")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "shape": {
            "n_layer": args.n_layer, "n_embd": args.n_embd, "seq_len": args.seq_len,
            "vocab_multiple": args.vocab_multiple}, "cases": results}, indent=2) + "\n")
        print(f"figures: {args.json}")


if __name__ == "__main__":
    main()
