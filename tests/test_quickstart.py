"""``raygpt quickstart``: the whole path on this machine, offline, as a user runs it."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest

from raygpt.cli.quickstart import quickstart_spec
from raygpt.train.plan import plan_run


def test_embedded_spec_is_valid_and_its_batches_divide():
    spec = quickstart_spec("my-bucket", "/data/books/", ["train.max_steps=5"])
    assert spec.name.startswith("quickstart-") and spec.storage_path == "s3://my-bucket/runs"
    assert spec.train.dataset == spec.eval.dataset == spec.data.output == "s3://my-bucket/datasets/quickstart-books"
    plan = plan_run(spec, train_tokens=spec.data.tokens, use_gpu=False)
    assert (plan.num_workers, plan.grad_accum_steps, plan.max_steps, plan.use_gpu) == (2, 2, 5, False)


@pytest.mark.integration
def test_quickstart_offline_end_to_end(tmp_path):
    # A fresh machine: no store configured, no Ray cluster, no hub.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env["HF_HUB_OFFLINE"] = "1"
    command = [sys.executable, "-m", "raygpt.cli", "quickstart", "--workdir", str(tmp_path),
               "--set", "data.tokens=100000", "--set", "train.max_steps=12", "--set", "train.val_interval=6",
               "--set", "checkpoint.interval=6"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]

    assert "docstrings of the Python standard library" in output  # the fallback corpus is announced
    assert "SeaweedFS at http://127.0.0.1:" in output
    for column in ("run", "params", "tokens", "steps", "time", "tokens/s", "val loss", "test loss"):
        assert column in output

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["source"] == "stdlib" and summary["steps"] == 12 and summary["tokens"] == 12 * 2048
    assert summary["params"] == 3_243_776
    # Better than uniform guessing over GPT-2's vocabulary after a dozen steps.
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] < math.log(50257)
    assert summary["val_loss"] < math.log(50257) and summary["tokens_per_s"] > 0

    # The store was stopped, and its data stays in the workdir.
    port = int(summary["endpoint"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert (tmp_path / "s3").is_dir()
