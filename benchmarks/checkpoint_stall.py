"""How long a checkpoint save stalls the training loop, for a gpt2-small-sized state, without Ray.

    python benchmarks/checkpoint_stall.py [--preset gpt2-small] [--device cpu|cuda] [--dir /tmp]

The state is a model of the preset and its AdamW moments after one step (gpt2-small: 163M
parameters, 1.82 GiB with the optimizer), on the device. Compared:

- buffers reserved: allocating (and pinning, on CUDA) the host buffers, which the training
  loop has done in the background since its first step (``reserve_checkpoint_buffers``):
  what a first save stalled for before that;
- background, first save: the loop's wait in ``raygpt.train.step.start_checkpoint`` with the
  buffers reserved;
- background, later saves: the same wait, the buffers reused: the device-to-host copy (a
  plain copy on CPU); the write then runs in a background thread, timed apart;
- synchronous: ``save_training_checkpoint``, what the loop waited for before: every file
  serialised and written while training stands still. Measured last, so that its pinned
  buffers, freed into torch's pinned-memory cache, cannot make a first save look free.

Each later background save is timed over ``--repeats`` saves; the table shows the median.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from raygpt.config import load_spec
from raygpt.model import GPT, PRESETS
from raygpt.train.components import RngState, TrainerState, choose_precision, use_device
from raygpt.train.metrics import device_name
from raygpt.train.schedule import WarmupCosine
from raygpt.weights.checkpoint import (
    CheckpointWriter,
    host_staged_state,
    save_training_checkpoint,
    snapshot_training_state,
)


def training_state(preset: str, device: torch.device) -> dict:
    """A model, its AdamW after one step (so the moments exist), trainer and RNG state."""
    torch.manual_seed(0)
    model = GPT(PRESETS[preset]).to(device)
    optimizer = model.configure_optimizer(6e-4, 0.1, (0.9, 0.95), device.type)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    spec = load_spec(None, [f"model.preset={preset}"])
    trainer = TrainerState(WarmupCosine(6e-4, 10, 100), choose_precision("fp32", device).scaler, 0, spec, 1)
    return dict(model=model, optimizer=optimizer, trainer=trainer, rng=RngState())


def state_bytes(state: dict) -> int:
    tensors = list(state["model"].state_dict().values())
    tensors += [t for s in state["optimizer"].state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_stall(preset: str, device: torch.device, directory: str | Path, repeats: int = 3) -> dict:
    """Seconds the loop waits per save: synchronous vs background (first and later saves), and
    the reservation of the background saves' buffers."""
    directory = Path(directory)
    state = training_state(preset, device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    writer = CheckpointWriter()
    stalls, writes = [], []
    try:
        sync()
        started = time.perf_counter()
        writer.reserve(host_staged_state(state["model"], state["optimizer"]))
        writer.wait()
        reserve_s = time.perf_counter() - started
        for i in range(1 + repeats):
            sync()
            started = time.perf_counter()
            writer.start(snapshot_training_state(0, **state, host=writer.host), directory / f"background-{i}")
            stalls.append(time.perf_counter() - started)
            writer.wait()
            writes.append(time.perf_counter() - started - stalls[-1])
            shutil.rmtree(directory / f"background-{i}")
    finally:
        writer.close()

    sync()
    started = time.perf_counter()
    save_training_checkpoint(directory / "synchronous", 0, **state)
    synchronous_s = time.perf_counter() - started
    shutil.rmtree(directory / "synchronous")
    steady = statistics.median(stalls[1:])
    return {"preset": preset, "device": str(device), "state_gib": state_bytes(state) / 2**30,
            "synchronous_s": synchronous_s, "reserve_s": reserve_s, "first_stall_s": stalls[0], "stall_s": steady,
            "background_write_s": statistics.median(writes[1:]), "stall_ratio": steady / synchronous_s}


def stall_table(r: dict, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("state", "synchronous save", "buffers reserved", "first save: stall", "later saves: stall",
                   "background write", "stall / synchronous"):
        table.add_column(column, justify="right")
    table.add_row(f"{r['preset']}, {r['state_gib']:.2f} GiB", f"{r['synchronous_s']:.2f} s", f"{r['reserve_s']:.2f} s",
                  f"{r['first_stall_s']:.2f} s", f"{r['stall_s']:.2f} s", f"{r['background_write_s']:.2f} s",
                  f"{100 * r['stall_ratio']:.1f}%")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (default: a temporary folder)")
    parser.add_argument("--repeats", type=int, default=3, help="background saves after the first")
    args = parser.parse_args()
    device = use_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="raygpt-stall-", dir=args.dir) as directory:
        result = measure_stall(args.preset, device, directory, args.repeats)
    console = Console()
    (console if console.is_terminal else Console(width=140)).print(stall_table(
        result, f"checkpoint stall on {device_name(device)} (torch {torch.__version__})"))


if __name__ == "__main__":
    main()
