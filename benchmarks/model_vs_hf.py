"""raygpt's training step against transformers' ``GPT2LMHeadModel`` at the same shape, on the CPU.

    python -m benchmarks.model_vs_hf                                   # 4 layers, 256 wide, ~1 min on 2 cores
    python -m benchmarks.model_vs_hf --n-layer 12 --n-embd 768 --seq-len 1024 --batch 4 --steps 5

Both models get OpenAI's GPT-2 layout (QKV bias, head tied to the token embedding, GELU-tanh,
no dropout), the same random tokens and the same AdamW (decay on 2-D weights), in float32.
A step is forward, loss, backward and optimizer step. The two models take turns step by step,
the order swapped every round, so a noisy shared machine slows both alike; the first
``--warmup`` steps of each are not timed, and the table reports the median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import transformers
from rich.console import Console
from rich.table import Table

from raygpt.model import GPT, GPTConfig


def adamw(model: torch.nn.Module) -> torch.optim.AdamW:
    """raygpt's optimizer rule, for either model: decay 2-D weights, not biases or LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=6e-4, betas=(0.9, 0.95))


def build(args) -> dict:
    """One step function per model, each with its own optimizer, on the same tokens."""
    n_head = max(1, args.n_embd // 64)
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=args.n_layer, n_head=n_head, n_embd=args.n_embd, context_length=args.seq_len,
                         qkv_bias=True, tie_weights=True, vocab_multiple=args.vocab_multiple))
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=args.n_layer, n_head=n_head, n_embd=args.n_embd, n_positions=args.seq_len,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    tokens = torch.randint(0, 50257, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].contiguous()

    def stepper(model, loss_of):
        model.train()
        optimizer = adamw(model)

        def step() -> float:
            loss = loss_of(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()
        return step

    # transformers shifts ``labels`` itself, so it gets the unshifted tokens: T logits, T-1 targets.
    return {"raygpt": stepper(ours, lambda m: m(inputs, targets)[1]),
            "transformers": stepper(theirs, lambda m: m(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss),
            "params": ours.num_params(), "hf_attention": theirs.config._attn_implementation}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256, help="width; heads are 64 wide")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--vocab-multiple", type=int, default=1, help="raygpt's vocabulary padding (1: none)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()  # not its note about the default loss, once per step

    built = build(args)
    names = ["raygpt", "transformers"]
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            built[name]()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - started)

    tokens = args.batch * args.seq_len
    median = {name: statistics.median(times[name]) for name in names}
    console = Console()
    console = console if console.is_terminal else Console(width=120)
    console.print(f"training step, float32, {args.n_layer} layers x {args.n_embd} wide ({built['params'] / 1e6:.1f}M "
                  f"params), batch {args.batch} x {args.seq_len} tokens, {args.steps} timed steps each; torch "
                  f"{torch.__version__}, transformers {transformers.__version__} "
                  f"({built['hf_attention']} attention), {torch.get_num_threads()} CPU "
                  f"threads, load average {os.getloadavg()[0]:.1f}")
    table = Table()
    for column in ("model", "median step", "min step", "tokens/s", "vs transformers"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name in names:
        table.add_row(name, f"{1000 * median[name]:.1f} ms", f"{1000 * min(times[name]):.1f} ms",
                      f"{tokens / median[name]:,.0f}", f"{median['transformers'] / median[name]:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
