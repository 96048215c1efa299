"""The whole GPU check in one command, without Ray, boto3 or a network.

    PYTHONPATH=. python3 benchmarks/gpu_check.py                        # one CUDA GPU, at most 8 minutes
    PYTHONPATH=. python3 benchmarks/gpu_check.py --device cpu --quick   # the same path, tiny, on a CPU

Needs torch, numpy, safetensors, pyyaml, rich and pyarrow. Four parts, then one table and the
same figures as JSON (``--json``, default ``gpu_check.json``):

1. correctness: the model's logits under bf16 autocast against fp32; SDPA's flash kernel
   against attention written out in fp32 (outputs and gradients), and the model's own
   attention running on the flash kernel; KV-cache generation against full recomputation.
2. step: the gpt2-small training step as a worker runs it (``raygpt.train.step``: bf16,
   fused AdamW, batches from pinned uint16 buffers), compile off and on, micro-batch 16, 32
   and 64 of 1024 tokens: tokens/s, MFU, peak memory (reset between cases).
3. resume: a small model trained for 60 steps through the workers' step and checkpoint code,
   a checkpoint every 20 steps into a local run folder. A child process trains and is
   SIGKILLed after step 50; this process resumes from the newest complete checkpoint (step
   40), trains steps 41-50 again and goes on to 60. Reported: the largest difference between
   the losses of steps 41-50 before and after the resume (0 on CPU, where training is
   bitwise reproducible).
4. checkpoint stall: the loop's wait for a gpt2-small-sized checkpoint, synchronous against
   background (``benchmarks/checkpoint_stall.py``).

``--quick`` shrinks every part (tiny preset, short sequences, 6 steps with a checkpoint every
2 and the kill after step 5) so the CPU test suite runs the whole path in seconds; compile is
then off unless ``--compile`` asks for it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks

from checkpoint_stall import measure_stall  # noqa: E402
from train_step import benchmark_spec, measure, release, write_synthetic_dataset  # noqa: E402

from raygpt.model import GPT, PRESETS  # noqa: E402
from raygpt.storage import Storage  # noqa: E402
from raygpt.train.components import use_device  # noqa: E402
from raygpt.train.metrics import device_name  # noqa: E402
from raygpt.train.plan import plan_run  # noqa: E402
from raygpt.train.step import set_up_worker, start_checkpoint, train_step, validation_loss  # noqa: E402
from raygpt.weights.integrity import latest_checkpoint  # noqa: E402
from raygpt.weights.layout import checkpoint_dir_name  # noqa: E402

# Tolerances of the correctness checks.
BF16_LOGITS_REL = 2e-2
"""||bf16 logits - fp32 logits|| / ||fp32 logits||: bf16 keeps 8 bits of mantissa (0.4%), and
the error grows over the layers."""
BF16_LOSS_ABS = 2e-2
"""|bf16 loss - fp32 loss|, in nats."""
FLASH_REL = 2e-2
"""||flash - reference|| / ||reference|| for the attention output and each input's gradient,
bf16 inputs against the same inputs in fp32."""


class Check:
    """Figures and a table row per finding; a failed check makes the exit status 1."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []
        self.figures: dict = {}
        self.failed = False

    def row(self, section: str, what: str, result: str, verdict: bool | None = None) -> None:
        if verdict is False:
            self.failed = True
        self.rows.append((section, what, result, {True: "ok", False: "FAIL", None: ""}[verdict]))


# ---------------------------------------------------------------------------------------------
# 1. Correctness


def no_tf32():
    """fp32 references in true fp32 (the workers turn TF32 on)."""
    class Context:
        def __enter__(self):
            self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
    return Context()


def check_bf16_logits(device: torch.device, preset: str, batch: int, seq_len: int) -> dict:
    torch.manual_seed(0)
    model = GPT(PRESETS[preset]).to(device).eval()
    x = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), device=device)
    with torch.no_grad(), no_tf32():
        _, reference_loss = model(x[:, :-1], x[:, 1:])  # with targets, the model may return no logits
        reference = model(x[:, :-1])[0].float()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(x[:, :-1])[0].float()
            _, loss = model(x[:, :-1], x[:, 1:])
    rel = float((logits - reference).norm() / reference.norm())
    top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    return {"preset": preset, "shape": [batch, seq_len], "rel_error": rel, "top1_agreement": top1,
            "loss_fp32": float(reference_loss), "loss_bf16": float(loss),
            "ok": rel <= BF16_LOGITS_REL and abs(float(loss) - float(reference_loss)) <= BF16_LOSS_ABS}


def reference_attention(q, k, v):
    """Causal attention written out, in fp32."""
    q, k, v = q.float(), k.float(), v.float()
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def check_flash_attention(device: torch.device, preset: str, batch: int, seq_len: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = PRESETS[preset]
    head_dim = config.n_embd // config.n_head
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, config.n_head, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device=device, generator=generator, dtype=torch.bfloat16).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(shape, device=device, generator=generator, dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(grad_out)
    flash_grads = [t.grad.float() for t in (q, k, v)]
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    with no_tf32():
        reference = reference_attention(q32, k32, v32)
        reference.backward(grad_out.float())

    def rel(a, b):
        return float((a.detach().float() - b.detach()).norm() / b.detach().norm())

    errors = {"out": rel(out, reference), "dq": rel(flash_grads[0], q32.grad), "dk": rel(flash_grads[1], k32.grad),
              "dv": rel(flash_grads[2], v32.grad)}
    # The model's own attention on the flash kernel: sdpa_kernel raises if its call could not use it.
    torch.manual_seed(0)
    model = GPT(config).to(device)
    x = torch.randint(0, config.vocab_size, (batch, min(seq_len, config.context_length)), device=device)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), torch.autocast(device.type, dtype=torch.bfloat16):
        _, loss = model(x, x)
    loss.backward()
    return {"shape": list(shape), "rel_errors": errors, "model_runs_on_flash": True,
            "ok": max(errors.values()) <= FLASH_REL}


def check_kv_cache(device: torch.device, preset: str, prompt_lengths: list[int], new_tokens: int) -> dict:
    """Batched, left-padded generation with the KV cache against greedy decoding that
    recomputes the whole sequence for every token, one prompt at a time, in fp32."""
    torch.manual_seed(0)
    model = GPT(PRESETS[preset]).to(device).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in prompt_lengths]
    with torch.no_grad(), no_tf32():
        cached = model.generate(prompts, new_tokens, eos_id=None)
        recomputed, smallest_gap = [], math.inf
        for prompt in prompts:
            sequence = list(prompt)
            for _ in range(new_tokens):
                logits = model(torch.tensor([sequence], device=device))[0][0, -1]
                top2 = torch.topk(logits.float(), 2).values
                smallest_gap = min(smallest_gap, float(top2[0] - top2[1]))
                sequence.append(int(logits.argmax()))
            recomputed.append(sequence[len(prompt):])
    same = sum(a == b for c, r in zip(cached, recomputed) for a, b in zip(c, r))
    total = sum(len(r) for r in recomputed)
    return {"prompts": prompt_lengths, "new_tokens": new_tokens, "tokens_equal": same, "tokens": total,
            "smallest_top2_gap": smallest_gap, "ok": same == total and all(len(c) == new_tokens for c in cached)}


# ---------------------------------------------------------------------------------------------
# 3. Training, a kill, and the resume


def resume_spec(workdir: Path, q: dict, device: torch.device):
    dataset = workdir / "resume-data"
    if not (dataset / "manifest.json").exists():
        tokens = (q["steps"] + 2) * q["batch"] * q["seq_len"] + 4
        write_synthetic_dataset(dataset, train_tokens=tokens, val_tokens=4 * q["seq_len"] * q["micro_batch"] + 1)
    spec = benchmark_spec(str(dataset), str(workdir / "runs"), q["preset"], q["seq_len"], q["micro_batch"],
                          q["steps"], "auto", q["compile"], "name=resume", "model.dropout=0.1",
                          f"train.global_batch_tokens={q['batch'] * q['seq_len']}", f"train.lr={q['lr']}",
                          f"checkpoint.interval={q['every']}", f"train.val_tokens={2 * q['seq_len'] * q['micro_batch']}")
    plan = plan_run(spec, (q["steps"] + 2) * q["batch"] * q["seq_len"], use_gpu=device.type == "cuda")
    return spec, plan, workdir / "runs" / "resume"


def train_until_killed(workdir: Path, q: dict, device: torch.device) -> None:
    """The child: train from scratch, a checkpoint every ``every`` steps, each step's loss to
    losses.jsonl, then SIGKILL itself after step ``kill_after``."""
    spec, plan, run = resume_spec(workdir, q, device)
    w = set_up_worker(spec, plan, 0, 1, device)
    with open(workdir / "losses-before.jsonl", "w") as out:
        while True:
            loss, _, _ = train_step(w, w.state.step)
            w.state.advance(plan.global_batch_tokens)
            out.write(json.dumps({"step": w.state.step, "loss": float(loss)}) + "\n")
            out.flush()
            if w.state.step % q["every"] == 0:
                w.writer.wait()
                start_checkpoint(w, run / checkpoint_dir_name(w.state.step))
            if w.state.step == q["kill_after"]:
                w.writer.wait()
                os.kill(os.getpid(), signal.SIGKILL)


def check_resume(workdir: Path, q: dict, device: torch.device) -> dict:
    child = subprocess.run([sys.executable, __file__, "--device", str(device), "--child", str(workdir),
                            json.dumps(q)], capture_output=True, text=True, env=os.environ.copy())
    if child.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the training child exited with {child.returncode}, not SIGKILL:\n{child.stderr[-3000:]}")
    before = {r["step"]: r["loss"] for r in map(json.loads, (workdir / "losses-before.jsonl").read_text().splitlines())}
    spec, plan, run = resume_spec(workdir, q, device)
    latest = latest_checkpoint(str(run), Storage())
    started = time.perf_counter()
    w = set_up_worker(spec, plan, 0, 1, device, latest, os.path.basename(latest))
    after = {}
    try:
        resumed_from = w.state.step
        while w.state.step < plan.stop_step:
            loss, _, _ = train_step(w, w.state.step)
            w.state.advance(plan.global_batch_tokens)
            after[w.state.step] = float(loss)
            if w.state.step % q["every"] == 0:
                start_checkpoint(w, run / checkpoint_dir_name(w.state.step))
        w.writer.wait()
        val = validation_loss(w)
    finally:
        release(w)
    redone = [s for s in after if s in before]
    difference = max(abs(after[s] - before[s]) for s in redone)
    return {"preset": q["preset"], "steps": q["steps"], "checkpoint_every": q["every"], "killed_after": q["kill_after"],
            "resumed_from": resumed_from, "redone_steps": [min(redone), max(redone)],
            "max_loss_difference": difference, "first_loss": before[1], "final_loss": after[plan.stop_step],
            "val_loss": val, "resume_and_finish_s": time.perf_counter() - started,
            "latest": os.path.basename(latest_checkpoint(str(run), Storage())),
            # Learning: the resumed steps' mean loss below the first step's (one step's loss is noisy).
            "ok": resumed_from == q["kill_after"] - q["kill_after"] % q["every"]
            and sum(after.values()) / len(after) < before[1]
            and (device.type == "cuda" or difference == 0.0)}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (the CPU test)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="also measure compiled steps and compile the resumed run (default: on CUDA only)")
    parser.add_argument("--json", default="gpu_check.json", help="where the figures go")
    parser.add_argument("--child", nargs=2, metavar=("WORKDIR", "SETTINGS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; on a CPU run it with --device cpu --quick")
    device = use_device(args.device)
    if args.child:
        train_until_killed(Path(args.child[0]), json.loads(args.child[1]), device)
        return

    compile_too = args.compile if args.compile is not None else device.type == "cuda"
    began = time.perf_counter()
    check = Check()
    check.figures["machine"] = {"device": device_name(device), "torch": torch.__version__,
                                "cuda": torch.version.cuda, "python": platform.python_version(),
                                "cpu_threads": torch.get_num_threads(), "quick": args.quick}
    small = "tiny" if args.quick else "gpt2-small"
    with tempfile.TemporaryDirectory(prefix="raygpt-gpu-check-") as workdir:
        workdir = Path(workdir)

        # 1. correctness
        r = check_bf16_logits(device, small, *((2, 32) if args.quick else (4, 512)))
        check.figures["bf16_logits"] = r
        check.row("correctness", f"bf16 autocast vs fp32 logits, {small} {r['shape'][0]}x{r['shape'][1]}",
                  f"rel. error {r['rel_error']:.2e} (<= {BF16_LOGITS_REL:g}), top-1 agree {100 * r['top1_agreement']:.1f}%,"
                  f" loss {r['loss_bf16']:.4f} vs {r['loss_fp32']:.4f} (<= {BF16_LOSS_ABS:g})", r["ok"])
        r = check_flash_attention(device, small, *((2, 32) if args.quick else (4, 1024)))
        check.figures["flash_attention"] = r
        check.row("correctness", f"SDPA flash vs fp32 reference attention, {tuple(r['shape'])}",
                  ", ".join(f"{k} {v:.1e}" for k, v in r["rel_errors"].items())
                  + f" (<= {FLASH_REL:g}); the model runs on flash", r["ok"])
        r = check_kv_cache(device, small, [5, 17, 3] if args.quick else [7, 64, 200, 1], 8 if args.quick else 32)
        check.figures["kv_cache"] = r
        check.row("correctness", f"KV-cache generation vs full recomputation, prompts {r['prompts']}",
                  f"{r['tokens_equal']}/{r['tokens']} greedy tokens equal (smallest top-2 gap "
                  f"{r['smallest_top2_gap']:.1e})", r["ok"])
        check.figures["seconds"] = {"correctness": time.perf_counter() - began}

        # 2. the training step
        cases = [(c, mb) for c in ([False, True] if compile_too else [False]) for mb in
                 ((2,) if args.quick else (16, 32, 64))]
        check.figures["step"] = []
        for compile_model, micro_batch in cases:
            r = measure(small, device, "auto", micro_batch, 32 if args.quick else 1024, 2 if args.quick else 20,
                        1 if args.quick else 3, compile_model, None, workdir / "step")
            check.figures["step"].append(r)
            mfu = f"MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else "MFU n/a"
            check.row("step", f"{small} {r['precision']}{' compile' if compile_model else ''}"
                      f"{' fused AdamW' if r['fused_adamw'] else ''}, {micro_batch}x{r['seq_len']}",
                      f"{r['tokens_per_s']:,.0f} tokens/s, {mfu}, {r['step_ms']:.0f} ms/step, peak "
                      f"{r['peak_memory_gib']:.1f} GiB, warm-up {r['warmup_s']:.0f} s")

        check.figures["seconds"]["step"] = time.perf_counter() - began - sum(check.figures["seconds"].values())
        # 3. train, kill, resume
        q = ({"preset": "tiny", "seq_len": 32, "batch": 8, "micro_batch": 4, "steps": 6, "every": 2,
              "kill_after": 5, "lr": 1e-2} if args.quick else
             {"preset": "nano", "seq_len": 256, "batch": 64, "micro_batch": 32, "steps": 60, "every": 20,
              "kill_after": 50, "lr": 3e-3})
        q["compile"] = compile_too
        r = check_resume(workdir, q, device)
        check.figures["resume"] = r
        check.row("resume", f"{r['preset']} {r['steps']} steps, checkpoint every {r['checkpoint_every']}, "
                  f"SIGKILL after {r['killed_after']}",
                  f"resumed from {r['resumed_from']}; steps {r['redone_steps'][0]}-{r['redone_steps'][1]} again: "
                  f"max |loss difference| {r['max_loss_difference']:.2e}; loss {r['first_loss']:.3f} -> "
                  f"{r['final_loss']:.3f}, val {r['val_loss']:.3f}", r["ok"])

        check.figures["seconds"]["resume"] = time.perf_counter() - began - sum(check.figures["seconds"].values())
        # 4. the checkpoint stall
        r = measure_stall(small, device, workdir / "stall", 1 if args.quick else 3)
        check.figures["checkpoint_stall"] = r
        check.row("checkpoint", f"{r['preset']} state, {r['state_gib']:.2f} GiB",
                  f"synchronous save {r['synchronous_s']:.2f} s; background: stall {r['stall_s']:.3f} s "
                  f"(first save {r['first_stall_s']:.3f} s, its buffers reserved in {r['reserve_s']:.2f} s before), "
                  f"write {r['background_write_s']:.2f} s behind the loop; {100 * r['stall_ratio']:.1f}% of "
                  "synchronous")

    check.figures["seconds"]["checkpoint"] = time.perf_counter() - began - sum(check.figures["seconds"].values())
    check.figures["elapsed_s"] = time.perf_counter() - began
    table = Table(title=f"raygpt GPU check on {device_name(device)}, torch {torch.__version__} "
                        f"(CUDA {torch.version.cuda}), {check.figures['elapsed_s']:.0f} s", title_justify="left")
    for column in ("part", "check", "result", ""):
        table.add_column(column)
    for section, what, result, verdict in check.rows:
        table.add_row(section, what, result, verdict)
    console = Console()
    (console if console.is_terminal else Console(width=200)).print(table)
    Path(args.json).write_text(json.dumps(check.figures, indent=2) + "\n")
    print(f"figures: {args.json}")
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
