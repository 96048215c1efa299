"""Spot-native training on a multi-node Ray cluster (``ray.cluster_utils.Cluster``): a node
drained with a preemption notice costs no step, preemptions never spend ``max_failures``, a
killed worker and a killed node are told apart, an elastic run continues on the workers that
remain and grows back, and a resume that would read other data is refused.

The tests wait on events (a record in ``metrics.jsonl``, an attempt's first report, the
driver's exit), never on a deadline a loaded machine can miss: ``CEILING_S`` only stops a
test that hangs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from two_workers import two_worker_overrides

from raygpt.config import load_spec, spec_to_dict
from raygpt.errors import RaygptError
from raygpt.storage import Storage, join
from raygpt.train.launch import train
from raygpt.train.metrics import read_metrics, step_batches, step_losses

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
CEILING_S = 900
"""The longest any wait of these tests lasts: a hang guard, not a deadline."""


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

    def wait_for(self, condition, what: str) -> None:
        """Until ``condition()``; fails at once if the driver exits first."""
        ceiling = time.monotonic() + CEILING_S
        while not condition():
            if self.process.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"raygpt train exited ({self.process.returncode}) before {what}:\n" + "\n".join(self.lines))
            if time.monotonic() > ceiling:
                self.process.kill()
                pytest.fail(f"no {what} after {CEILING_S} s (a hang):\n" + "\n".join(self.lines[-40:]))
            time.sleep(0.2)

    def finish(self) -> list[dict]:
        try:
            self.process.wait(CEILING_S)
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
                    "--deadline-remaining-seconds", str(deadline_s)], check=True, capture_output=True,
                   timeout=CEILING_S)


def kill_node(cluster, node_id: str) -> None:
    """The node's raylet and everything on it SIGKILLed at once: a machine gone without notice."""
    cluster.remove_node(node_of(cluster, node_id), allow_graceful=False)


def kill_worker_process(cluster, node_id: str) -> int:
    """SIGKILL one Ray Train worker process on the node (a child of its raylet); its pid."""
    import psutil

    raylet = psutil.Process(node_of(cluster, node_id).all_processes["raylet"][0].process.pid)
    pid = next(p.pid for p in raylet.children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline()))
    os.kill(pid, signal.SIGKILL)
    return pid


def preemption_saves(driver: Driver) -> list[dict]:
    return [r for r in driver.records() if r.get("checkpoint_reason") == "preemption"]


@pytest.mark.integration
def test_drained_nodes_cost_no_step_and_no_failure(cluster, tiny_dataset, two_worker_losses, tmp_path):
    """Two spot reclaims with ``train.max_failures: 0``, a 10 s notice and then a 6 s one. Each
    saves before its deadline, and the run resumes where it stood."""
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    driver = Driver(spot_overrides(tiny_dataset, root, "drained"), cluster.address, tmp_path)
    victims = []
    for k, deadline in enumerate((10, 6)):
        nodes = driver.worker_nodes() if k == 0 else attempt_nodes(driver, k + 1)
        add_node(cluster)  # where the workers go once their node is reclaimed
        for victim in sorted(set(nodes)):
            drain(cluster, victim, deadline_s=deadline)
        # The notice's outcome: a save on it, or (a save missed) the next attempt. The worker's
        # own clock says when the save was durable; the driver hears of it later, the more so
        # on a loaded machine.
        driver.wait_for(lambda k=k: any(r.get("attempt") == k + 1 and "durable_at" in r for r in preemption_saves(driver))
                        or any(r.get("attempt") == k + 2 for r in driver.records()), f"the outcome of notice {k + 1}")
        saved = next((r for r in preemption_saves(driver) if r.get("attempt") == k + 1 and "durable_at" in r), None)
        assert saved is not None, f"notice {k + 1} passed without a save:\n" + "\n".join(driver.lines[-40:])
        notice = next(r["preemption_notice"] for r in driver.records() if "preemption_notice" in r
                      and r.get("attempt") == k + 1)
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
    assert [a["ended"] for a in attempts] == ["preemption notice"] * 2 + ["finished"]
    assert [a["recomputed_after"] for a in attempts[:2]] == [0, 0]
    assert all(a["world_size"] == 2 for a in attempts)
    for before, after, gone in zip(attempts, attempts[1:], victims):
        assert gone <= set(before["nodes"]) and not gone & set(after["nodes"])
        assert after["resumed_from_step"] == before["last_step"] and before["seconds_to_next_step"] > 0
    assert record["status"] == "finished"
    assert next(r for r in records if "preemption_notice" in r)["preemption_notice"]["deadline_ms"] > 0


def attempt_nodes(driver: Driver, attempt: int) -> list[str]:
    """The nodes of the ``attempt``-th attempt, once it has reported."""
    driver.wait_for(lambda: any(r.get("attempt") == attempt and "nodes" in r for r in driver.records()),
                    f"attempt {attempt} to report")
    return next(r["nodes"] for r in driver.records() if r.get("attempt") == attempt and "nodes" in r)


@pytest.mark.integration
def test_a_killed_worker_and_a_killed_node_are_told_apart(cluster, tiny_dataset, two_worker_losses, tmp_path):
    """One worker process SIGKILLed on a node that stays (``worker lost``), then a whole node
    SIGKILLed (``node lost``), in one fixed-size run; each costs one of ``max_failures``."""
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    driver = Driver(spot_overrides(tiny_dataset, root, "killed", "train.max_failures=2", "train.stop_at_step=24"),
                    cluster.address, tmp_path)
    kill_worker_process(cluster, driver.worker_nodes()[-1])
    nodes = attempt_nodes(driver, 2)
    add_node(cluster)  # where the workers go once their node is gone
    kill_node(cluster, nodes[-1])
    attempt_nodes(driver, 3)
    records = driver.finish()

    assert step_losses(records) == {s: loss for s, loss in two_worker_losses.items() if s <= 24}  # bitwise
    record = Storage().read_json(join(driver.run, "run.json"))
    attempts = record["attempts"]
    assert [a["ended"] for a in attempts] == ["worker lost", "node lost", "stopped"], attempts
    assert record["restarts"] == 2 and all(a["seconds_to_next_step"] > 0 for a in attempts[:2])
    assert nodes[-1] not in attempts[2]["nodes"]


@pytest.mark.integration
def test_a_killed_drivers_session_stays_in_the_run_record(ray_local, tiny_dataset, two_worker_losses, tmp_path):
    """A driver SIGKILLed mid-run leaves run.json 'running' with its attempt, sessions and cost
    so far; the next session closes that attempt as 'driver lost' at its last recorded step,
    counts from then to its own first step, and adds its cost to the killed session's."""
    from ray._private.state import actors

    overrides = two_worker_overrides(tiny_dataset, str(tmp_path / "runs"), "killed-driver", "train.stop_at_step=16")
    driver = Driver(overrides, ray_local.get_runtime_context().gcs_address, tmp_path)
    driver.wait_for(lambda: any(r.get("checkpoint") and r["step"] >= 8 for r in driver.records()), "a checkpoint at 8")
    driver.process.kill()
    driver.process.wait()
    left = Storage().read_json(join(driver.run, "run.json"))
    assert left["status"] == "running" and left["sessions"] == 1 and left["cost"]["wall_clock_s"] > 0
    assert [a.get("open") for a in left["attempts"]] == [True]

    # The killed driver's job ends, and Ray stops its workers.
    ceiling = time.monotonic() + CEILING_S
    while any(a["ActorClassName"] == "RayTrainWorker" for a in actors(actor_state_name="ALIVE").values()):
        assert time.monotonic() < ceiling, "the killed driver's workers are still alive"
        time.sleep(0.2)
    summary = train(load_spec(None, overrides))
    first, second = summary["attempts"]
    assert first["ended"] == "driver lost" and first["last_step"] >= 8 and first["ended_at"] is not None
    assert second["resumed_from_step"] <= first["last_step"] and second["ended"] == "stopped"
    assert first["seconds_to_next_step"] > 0
    assert summary["sessions"] == 2 and summary["cost"]["wall_clock_s"] > left["cost"]["wall_clock_s"]
    assert step_losses(read_metrics(driver.run, Storage())) == {s: v for s, v in two_worker_losses.items() if s <= 16}


@pytest.mark.integration
def test_a_resume_that_would_change_the_data_is_refused(ray_local, tiny_dataset):
    root = f"s3://raygpt-test/spot-{os.urandom(4).hex()}"
    overrides = spot_overrides(tiny_dataset, root, "refused", "train.max_steps=8", "train.stop_at_step=4")
    train(load_spec(None, overrides))
    for change, message in (("train.seq_len=16", "train.seq_len: 16, but the run refused was trained with 32"),
                            ("train.seed=7", "train.seed: 7, but the run refused was trained with 1337"),
                            ("train.global_batch_tokens=4096",
                             "train.global_batch_tokens: 4096, but the run refused was trained with 1024")):
        with pytest.raises(RaygptError, match=message + r" \(checkpoint .*checkpoint_00000004\): resuming would "
                                                        r"read other sequences at every step"):
            train(load_spec(None, [*overrides, change, "train.stop_at_step=null"]))
    # The worker count may change: the same run continues on one worker.
    summary = train(load_spec(None, [*overrides, "train.num_workers=1", "train.stop_at_step=null"]))
    assert summary["status"] == "finished" and summary["final"]["step"] == 8


# Longer steps (128 sequences) and fewer: growing back waits for Ray's resource
# coordinator, which looks at the cluster every 20 s.
ELASTIC = ("train.num_workers=4", "train.global_batch_tokens=4096", "train.max_steps=36")
# Ray Train looks for capacity to grow back every train.elastic_resize_s; kept above the 15 s
# Ray takes to declare a killed node dead, so it does not take the dead node for capacity.
ELASTIC_RESIZE_S = 20


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
                                   "train.max_failures=1", f"train.elastic_resize_s={ELASTIC_RESIZE_S}"),
                    cluster.address, tmp_path)
    nodes = driver.worker_nodes()
    assert len(nodes) == 4
    kill_node(cluster, nodes[-1])  # no notice: the node is simply gone
    shrunk = attempt_nodes(driver, 2)
    assert len(shrunk) == 2 and nodes[-1] not in shrunk
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
    # Growing back stops the workers at once (Ray Train tells them nothing first): what they
    # trained since the last checkpoint is trained again: a checkpoint interval (4 steps), or
    # two when the last save was still uploading.
    assert attempts[1]["recomputed_after"] < 2 * 4
