"""``raygpt quickstart``: the whole path on this machine, offline, as a user runs it: from the
folder they cloned raygpt into, which holds a ``raygpt/`` checkout."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from raygpt.cli.quickstart import quickstart_spec
from raygpt.cluster import package_root
from raygpt.train.plan import plan_run

CHECKOUT = Path(__file__).resolve().parents[1]


def test_embedded_spec_is_valid_and_its_batches_divide():
    spec = quickstart_spec("my-bucket", "/data/books/", ["train.max_steps=5"])
    assert spec.name.startswith("quickstart-") and spec.storage_path == "s3://my-bucket/runs"
    assert spec.train.dataset == spec.eval.dataset == spec.data.output == "s3://my-bucket/datasets/quickstart-books"
    plan = plan_run(spec, train_tokens=spec.data.tokens, use_gpu=False)
    assert (plan.num_workers, plan.max_steps, plan.use_gpu) == (2, 5, False)


def test_workers_of_a_local_ray_are_pointed_at_the_package_the_driver_runs():
    # The tests import raygpt from this checkout (python -m puts it first), not site-packages.
    assert package_root() == str(CHECKOUT)


@pytest.mark.integration
def test_quickstart_offline_end_to_end(tmp_path):
    # A fresh machine: no store configured, no Ray cluster, no hub; and the folder the user cloned
    # into, which holds the checkout as raygpt/ (no __init__.py there): Ray's workers put this
    # folder first on their path, where it would be an empty namespace package.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "raygpt").symlink_to(CHECKOUT, target_is_directory=True)
    # As the `raygpt` console script runs: the package found where it is installed (here, this
    # checkout), the current folder not on the driver's path.
    launcher = f"import sys; sys.path[0] = {str(CHECKOUT)!r}; from raygpt.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", launcher, "quickstart", "--workdir", str(tmp_path / "work"),
               "--set", "data.tokens=100000", "--set", "train.max_steps=12", "--set", "train.val_interval=6",
               "--set", "checkpoint.interval=6"]
    done = subprocess.run(command, env=env, cwd=clone, capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "unknown location" not in output

    assert "docstrings of the Python standard library" in output  # the fallback corpus is announced
    assert "SeaweedFS at http://127.0.0.1:" in output
    for column in ("run", "params", "tokens", "steps", "time", "tokens/s", "val loss", "unigram entropy", "test loss"):
        assert column in output
    assert "unigram entropy of the training split:" in output and "samples at step 6:" in output

    summary = json.loads((tmp_path / "work" / "summary.json").read_text())
    batch = quickstart_spec("bkt", "stdlib", []).train.global_batch_tokens
    assert summary["source"] == "stdlib" and summary["steps"] == 12 and summary["tokens"] == 12 * batch
    assert summary["params"] == 3_243_776
    assert 4 < summary["unigram_entropy"] < math.log(50257)
    assert summary["sample"]["prompt"] and isinstance(summary["sample"]["text"], str)
    shown = (summary["sample"]["prompt"] + summary["sample"]["text"]).replace("\n", "")
    assert shown in output.replace("\n", "")  # streamed to the terminal as it was generated
    # Better than uniform guessing over GPT-2's vocabulary after a dozen steps.
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] < math.log(50257)
    assert summary["val_loss"] < math.log(50257) and summary["tokens_per_s"] > 0

    # The store was stopped, and its data stays in the workdir.
    port = int(summary["endpoint"].rsplit(":", 1)[1])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert (tmp_path / "work" / "s3").is_dir()
