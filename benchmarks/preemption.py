"""What spot-readiness costs: the preemption check per step, and a lost node in seconds.

1. In a Ray Train run of 2 CPU workers at the quickstart's shape (tiny model, 32 sequences
   of 64 tokens per step), the median time of one training step and of one
   ``ray.train.get_preemption_info()`` (the collective the loop calls every
   ``train.preemption_check_s`` seconds), and their ratio: what a check at every step would
   cost, and what the default cadence costs.
2. On a loopback ``ray.cluster_utils.Cluster`` (a head without CPUs, two 2-CPU nodes), a
   ``raygpt train`` whose node is killed without notice (its raylet and workers SIGKILLed):
   the seconds from the loss to the next training step, from the run's attempts in
   ``run.json``; once at a fixed size, with a node added in its place, and once elastic
   (``train.num_workers: [2, 4]``, 4 workers on the two nodes), continuing on the 2 that remain.

    python benchmarks/preemption.py [--steps 40] [--checks 200] [--skip-node-loss]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
import yaml
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from rich.console import Console
from rich.table import Table

from raygpt.config import load_spec, spec_to_dict
from raygpt.data.prepare import prepare
from raygpt.storage import Storage, join
from raygpt.train.plan import plan_run
from raygpt.train.step import set_up_worker, train_step

REPO = Path(__file__).resolve().parent.parent
SHAPE = ["model.preset=tiny", "train.seq_len=64", "train.global_batch_tokens=2048", "train.micro_batch_size=8",
         "train.num_workers=2", "train.val_interval=0", "train.use_gpu=false"]


def make_dataset(folder: Path) -> str:
    out = str(folder / "data")
    prepare(load_spec(None, ["data.source=stdlib", f"data.output={out}", "data.tokens=200000",
                             "data.shard_tokens=100000", "data.val_tokens=4096", "data.test_tokens=4096",
                             "data.heldout_permille=100", "data.num_proc=1"]), Storage())
    return out


def measure(config: dict) -> dict:
    """A Ray Train worker: time training steps, then preemption checks (every rank alike);
    returns the medians (Ray Train's result keeps rank 0's)."""
    spec, plan = config["spec"], config["plan"]
    context = ray.train.get_context()
    w = set_up_worker(spec, plan, context.get_world_rank(), context.get_world_size(), torch.device("cpu"))
    steps, checks = [], []
    for step in range(config["steps"]):
        started = time.perf_counter()
        loss, _, _ = train_step(w, step)
        loss.item()
        steps.append(time.perf_counter() - started)
    for _ in range(config["checks"]):
        started = time.perf_counter()
        ray.train.get_preemption_info()
        checks.append(time.perf_counter() - started)
    w.close()
    return {"step_s": statistics.median(steps[2:]), "check_s": statistics.median(checks)}


def check_cost(dataset: str, folder: Path, steps: int, checks: int) -> dict:
    spec = load_spec(None, [*SHAPE, f"train.dataset={dataset}", f"train.max_steps={steps}"])
    plan = plan_run(spec, 200_000, use_gpu=False)
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        result = TorchTrainer(measure, train_loop_config={"spec": spec, "plan": plan, "steps": steps, "checks": checks},
                              scaling_config=ScalingConfig(num_workers=2),
                              run_config=RunConfig(name="preemption-check", storage_path=str(folder / "ray"))).fit()
    finally:
        ray.shutdown()
    return result.return_value


def node_loss(dataset: str, folder: Path, elastic: bool) -> dict:
    from ray.cluster_utils import Cluster

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the cluster on 127.0.0.1
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    nodes = [cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1") for _ in range(2)]
    cluster.wait_for_nodes()
    name = "elastic-loss" if elastic else "node-loss"
    runs = str(folder / "runs")
    spec_file = folder / f"{name}.yaml"
    size = ["train.num_workers=[2, 4]", "train.global_batch_tokens=4096", "train.elastic_resize_s=600"] \
        if elastic else []
    spec_file.write_text(yaml.safe_dump(spec_to_dict(load_spec(None, [
        *SHAPE, f"train.dataset={dataset}", "train.max_steps=40", "train.log_interval=1", "checkpoint.interval=5",
        "train.max_failures=2", f"storage_path={runs}", f"name={name}", *size]))))
    driver = subprocess.Popen([sys.executable, "-m", "raygpt.cli", "train", str(spec_file), "--address",
                               cluster.address], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in driver.stdout:
            if line.startswith("step 8/"):
                break
        nodes_used = next(r["nodes"] for r in _records(runs, name) if "nodes" in r)
        victim = next(n for n in nodes if n.node_id in nodes_used)
        cluster.remove_node(victim, allow_graceful=False)  # no notice: the machine is gone
        if not elastic:
            cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        driver.stdout.read()
        driver.wait(600)
    finally:
        driver.kill()
        cluster.shutdown()
    attempts = Storage().read_json(join(runs, name, "run.json"))["attempts"]
    first = attempts[0]
    return {"seconds_to_next_step": first.get("seconds_to_next_step"), "recomputed": first.get("recomputed_after"),
            "ended": first.get("ended"), "workers": [a["world_size"] for a in attempts]}


def _records(runs: str, name: str) -> list[dict]:
    from raygpt.train.metrics import read_metrics

    return read_metrics(join(runs, name), Storage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checks", type=int, default=200)
    parser.add_argument("--skip-node-loss", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="raygpt-bench-") as tmp:
        folder = Path(tmp)
        dataset = make_dataset(folder)
        cost = check_cost(dataset, folder, args.steps, args.checks)
        losses = {}
        if not args.skip_node_loss:
            losses = {"fixed size, a node added": node_loss(dataset, folder, elastic=False),
                      "elastic 4 -> 2": node_loss(dataset, folder, elastic=True)}
    default = load_spec(None, []).train.preemption_check_s
    table = Table(title="preemption readiness (2 CPU workers, quickstart shape)")
    for column in ("measure", "value"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("training step (median)", f"{1e3 * cost['step_s']:.1f} ms")
    table.add_row("get_preemption_info() (median)", f"{1e3 * cost['check_s']:.2f} ms")
    table.add_row("a check at every step", f"{100 * cost['check_s'] / cost['step_s']:.2f}% of step time")
    per_check = max(1, int(default / cost["step_s"]))
    table.add_row(f"default cadence ({default:g} s: every {per_check} steps)",
                  f"{100 * cost['check_s'] / (per_check * cost['step_s']):.3f}% of step time")
    for how, loss in losses.items():
        table.add_row(f"node killed -> next step ({how})", f"{loss['seconds_to_next_step']:.1f} s "
                      f"({loss['ended']}, {loss['recomputed']} steps recomputed, workers {loss['workers']})")
    Console().print(table)


if __name__ == "__main__":
    main()
