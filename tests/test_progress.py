"""The driver's progress view without Ray: foreign text is shown as it is, and the view keeps
showing reports after an error of its own."""

from __future__ import annotations

import io
import logging
import time

from ray.util.queue import Empty
from rich.console import Console

from raygpt.config import load_spec
from raygpt.train.plan import plan_run
from raygpt.train.progress import ProgressView

# What gloo says when a peer's node goes: to rich, "[/__w/...]" is a closing tag.
GLOO = "[/__w/1/s/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:5113"


class ListQueue:
    """The view's side of a ``ray.util.queue.Queue``: ``get`` until the list is empty."""

    def __init__(self, items: list):
        self.items = list(items)

    def get(self, block: bool = True, timeout: float | None = None):
        if self.items:
            return self.items.pop(0)
        if block:
            time.sleep(min(timeout or 0.05, 0.05))
        raise Empty


def step(k: int, **extra) -> dict:
    return {"step": k, "loss": 5.0 - k / 10, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, **extra}


def test_foreign_text_is_shown_verbatim_and_the_view_survives_its_own_errors(caplog):
    plan = plan_run(load_spec(None, ["model.preset=tiny", "train.max_steps=8", "train.seq_len=32",
                                     "train.global_batch_tokens=256", "train.micro_batch_size=4"]),
                    train_tokens=65536, use_gpu=False)
    out = io.StringIO()
    records = [
        step(1, resumed_from_step=0, world_size=2),
        {"event": "worker_failure", "rank": 1, "error": GLOO},
        step(2, resumed_from_step=0, world_size=2, skipped_checkpoints=[["checkpoint_[/b]", "[bold]model.pt[/]: bad"]]),
        {"step": 3, "loss": 4.7},  # no lr: the view's own line fails on it
        step(4, samples=[{"prompt": "[red]", "text": " [/red] ok"}]),
        step(5),
    ]
    view = ProgressView(plan, 0, ListQueue(records), console=Console(file=out, width=400, color_system=None))
    with caplog.at_level(logging.WARNING, logger="raygpt.train.progress"):
        with view:
            deadline = time.monotonic() + 60
            while "step 5/8" not in out.getvalue() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert view._thread.is_alive()
    text = out.getvalue()
    assert f"worker 1 failed ({GLOO})" in text
    assert "skipped checkpoint checkpoint_[/b]: [bold]model.pt[/]: bad" in text
    assert "'[red]' -> ' [/red] ok'" in text
    assert "step 5/8" in text and "step 4/8" in text and "step 3/8" not in text
    assert [r["step"] for r in view.records] == [1, 2, 3, 4, 5]
    assert any("cannot show a report of step 3" in r.getMessage() for r in caplog.records)
