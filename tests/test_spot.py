"""Spot-native training on a multi-node Ray cluster (``ray.cluster_utils.Cluster``): a node
drained with a preemption notice costs no step, preemptions never spend ``max_failures``, an
elastic run continues on the workers that remain and grows back, and a resume that would read
other data is refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from raygpt.config import load_spec, spec_to_dict
from raygpt.errors import RaygptError
from raygpt.storage import Storage, join
from raygpt.train.launch import train
from raygpt.train.metrics import read_metrics, step_batches, step_losses
from two_workers import two_worker_overrides

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def spot_overrides(dataset: str, storage_path: str, name: str, *extra: str) -> list[str]:
    """The fault tests' 2-worker run, checking for a preemption notice every step."""
    return two_worker_overrides(dataset, storage_path, name, "train.preemption_check_s=0.01", *extra)


@pytest.fixture
def cluster(s3_server, monkeypatch):
    """A head without CPUs (the drivers, Ray Train's controller) and two 2-CPU worker nodes, all
    on 127.0.0.1."""
    from ray.cluster_utils import Cluster

    for key, value in s3_server.env().items():  # the nodes' processes inherit the store's credentials
        monkeypatch.setenv(key, value)
    # Ray turns a 127.0.0.1 address into the machine's own address unless clusters are local-only.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray Train looks for draining nodes every 5 s: most of a 6 s notice. Spot notices give
    # 30 s to 2 min; the test's short ones need a quicker look.
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.5")
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "node_ip_address": LOOPBACK})
    for _ in range(2):
        add_node(cluster)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


def add_node(cluster):
    return cluster.add_node(num_cpus=2, node_ip_address=LOOPBACK)


class Driver:
    """``raygpt train`` in its own process against the cluster, its output followed line by line."""

    def __init__(self, overrides: list[str], address: str, tmp_path: Path):
        spec = tmp_path / "spec.yaml"
        spec.write_text(yaml.safe_dump(spec_to_dict(load_spec(None, overrides))))
        self.spec = load_spec(str(spec))
        self.lines: list[str] = []
        self.process = subprocess.Popen([sys.executable, "-m", "raygpt.cli", "train", str(spec), "--address", address],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())

    @property
    def run(self) -> str:
        return join(self.spec.storage_path, self.spec.name)

    def step(self) -> int:
        steps = [int(m.group(1)) for line in self.lines if (m := re.match(r"step (\d+)/", line))]
        return max(steps, default=0)

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"raygpt train exited ({self.process.returncode}) before {what}:\n" + "\n".join(self.lines))
            if time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    def finish(self, timeout: float = 300) -> list[dict]:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail("raygpt train did not finish:\n" + "\n".join(self.lines[-40:]))
        self._reader.join(5)
        assert self.process.returncode == 0, "\n".join(self.lines)
        return read_metrics(self.run, Storage())

    def records(self) -> list[dict]:
        """metrics.jsonl as it stands (the driver rewrites it whole: a read may meet a rewrite)."""
        try:
            return read_metrics(self.run, Storage())
        except RaygptError:
            return []

    def worker_nodes(self) -> list[str]:
        """The nodes the current attempt's workers run on, by rank (from its first record)."""
        self.wait_for(lambda: any("nodes" in r for r in self.records()), "the first checkpoint")
        return [r["nodes"] for r in self.records() if "nodes" in r][-1]


def node_of(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


def drain(cluster, node_id: str, deadline_s: int) -> None:
    subprocess.run(["ray", "drain-node", "--address", cluster.address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (test)",
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True, timeout=60)


def preemption_saves(driver: Driver) -> list[dict]:
    return [r for r in driver.records() if r.get("checkpoint_reason") == "preemption"]


@pytest.mark.integration
def test_drained_nodes_cost_no_step_and_no_failure(cluster, tiny_dataset, two_worker_losses, tmp_path):
    """Three spot reclaims with ``train.max_failures: 0``: the first with a 20 s notice, then two
    with 6 s. Each saves before its deadline, and the run resumes where it stood."""
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    driver = Driver(spot_overrides(tiny_dataset, root, "drained"), cluster.address, tmp_path)
    victims = []
    for k, deadline in enumerate((20, 6, 6)):
        nodes = driver.worker_nodes() if k == 0 else attempt_nodes(driver, k + 1)
        add_node(cluster)  # where the workers go once their node is reclaimed
        for victim in sorted(set(nodes)):
            drain(cluster, victim, deadline_s=deadline)
        driver.wait_for(lambda k=k: any(r["attempt"] == k + 1 and "durable_at" in r for r in preemption_saves(driver)),
                        f"a checkpoint saved on notice {k + 1}", timeout=60)
        # The worker's own clock says when the save was durable (the driver hears of it later).
        saved = next(r for r in preemption_saves(driver) if r["attempt"] == k + 1 and "durable_at" in r)
        notice = next(r["preemption_notice"] for r in driver.records() if "preemption_notice" in r
                      and r["attempt"] == k + 1)
        assert saved["durable_at"] * 1000 < notice["deadline_ms"], "the save landed after the deadline"
        # At the deadline Ray Train stops the workers and starts them elsewhere; then the node goes.
        attempt_nodes(driver, k + 2)
        for victim in sorted(set(nodes)):
            cluster.remove_node(node_of(cluster, victim))
        victims.append(set(nodes))
    records = driver.finish()

    assert step_losses(records) == two_worker_losses  # bitwise: the same 2 workers' arithmetic
    record = Storage().read_json(join(driver.run, "run.json"))
    attempts = record["attempts"]
    assert [a["ended"] for a in attempts] == ["preemption notice"] * 3 + ["finished"]
    assert [a["recomputed_after"] for a in attempts[:3]] == [0, 0, 0]
    assert all(a["world_size"] == 2 for a in attempts)
    for before, after, gone in zip(attempts, attempts[1:], victims):
        assert gone <= set(before["nodes"]) and not gone & set(after["nodes"])
        assert after["resumed_from_step"] == before["last_step"] and before["seconds_to_next_step"] > 0
    assert record["status"] == "finished"
    assert next(r for r in records if "preemption_notice" in r)["preemption_notice"]["deadline_ms"] > 0


def attempt_nodes(driver: Driver, attempt: int) -> list[str]:
    """The nodes of the ``attempt``-th attempt, once it has reported."""
    driver.wait_for(lambda: any(r.get("attempt") == attempt and "nodes" in r for r in driver.records()),
                    f"attempt {attempt} to report", timeout=120)
    return next(r["nodes"] for r in driver.records() if r.get("attempt") == attempt and "nodes" in r)


@pytest.mark.integration
def test_a_resume_that_would_change_the_data_is_refused(ray_local, tiny_dataset):
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    overrides = spot_overrides(tiny_dataset, root, "refused", "train.max_steps=8", "train.stop_at_step=4")
    train(load_spec(None, overrides))
    for change, message in (("train.seq_len=16", "train.seq_len: 16, but the run refused was trained with 32"),
                            ("train.seed=7", "train.seed: 7, but the run refused was trained with 1337"),
                            ("train.global_batch_tokens=4096",
                             "train.global_batch_tokens: 4096, but the run refused was trained with 2048")):
        with pytest.raises(RaygptError, match=message + r" \(checkpoint .*checkpoint_00000004\): resuming would "
                                                        r"read other sequences at every step"):
            train(load_spec(None, [*overrides, change, "train.stop_at_step=null"]))
    # The worker count may change: the same run continues on one worker.
    summary = train(load_spec(None, [*overrides, "train.num_workers=1", "train.stop_at_step=null"]))
    assert summary["status"] == "finished" and summary["final"]["step"] == 8


# Longer steps (128 sequences) and fewer: growing back waits for Ray's resource
# coordinator, which looks at the cluster every 20 s.
ELASTIC = ("train.num_workers=4", "train.global_batch_tokens=4096", "train.max_steps=36")


@pytest.fixture(scope="module")
def four_worker_run(ray_local, tiny_dataset):
    """An uninterrupted run on 4 workers: the elastic run's yardstick."""
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    train(load_spec(None, spot_overrides(tiny_dataset, root, "four", *ELASTIC)))
    records = read_metrics(join(root, "four"), Storage())
    return step_losses(records), step_batches(records)


@pytest.mark.integration
def test_an_elastic_run_continues_on_fewer_workers_and_grows_back(cluster, tiny_dataset, four_worker_run, tmp_path):
    losses, batches = four_worker_run
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    driver = Driver(spot_overrides(tiny_dataset, root, "elastic", *ELASTIC, "train.num_workers=[2, 4]",
                                   "train.max_failures=1", "train.elastic_resize_s=2"), cluster.address, tmp_path)
    nodes = driver.worker_nodes()
    assert len(nodes) == 4
    cluster.remove_node(node_of(cluster, nodes[-1]))  # no notice: the node is simply gone
    shrunk = attempt_nodes(driver, 2)
    assert len(shrunk) == 2
    add_node(cluster)  # capacity comes back
    assert len(attempt_nodes(driver, 3)) == 4
    records = driver.finish()

    assert step_batches(records) == batches  # the same sequences at every step, on 4, 2 and 4 workers
    elastic = step_losses(records)
    assert sorted(elastic) == sorted(losses)
    worst = max(abs(elastic[s] - losses[s]) / abs(losses[s]) for s in losses)
    assert worst <= 1e-5, f"max relative difference {worst:.2e}"
    attempts = Storage().read_json(join(driver.run, "run.json"))["attempts"]
    assert [a["world_size"] for a in attempts] == [4, 2, 4]
    assert [a["ended"] for a in attempts] == ["node lost", "resize", "finished"]
