"""raygpt.cluster: the addresses ``connect`` accepts, how fast a wrong one fails, and a local
instance that listens on loopback only."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from raygpt.cluster import address_problem, check_reachable
from raygpt.errors import RaygptError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("address", ["local", "auto", "10.0.0.5:6379", "head.example.com:6379", "ray://10.0.0.5:10001",
                                     "[::1]:6379"])
def test_addresses_ray_takes(address):
    assert address_problem(address) is None


@pytest.mark.parametrize("address", ["garbage", "", "10.0.0.5", "10.0.0.5:", ":6379", "10.0.0.5:0", "10.0.0.5:65536",
                                     "10.0.0.5:6379x", "http://10.0.0.5:8265", "ray://10.0.0.5", "a b:6379",
                                     "ray://http://x:1"])
def test_addresses_refused_before_ray(address):
    assert address_problem(address)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_nothing_answers_at_fails_at_once(scheme):
    """``raygpt train --address 127.0.0.1:1`` hung: ``ray.init`` retries for minutes."""
    started = time.monotonic()
    with pytest.raises(RaygptError, match="no Ray cluster answers"):
        check_reachable(f"{scheme}127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 2


def test_an_address_that_is_no_ray_head_fails_within_seconds():
    """A port that takes connections but speaks no gRPC (here HTTP/1, as the dashboard does)."""
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        with pytest.raises(RaygptError, match="no Ray head"):
            check_reachable(f"ray://127.0.0.1:{server.server_address[1]}", timeout_s=1)
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()


LISTENING_SOCKETS = """
import json, time
import psutil, ray
from raygpt.cluster import connect

connect(None, num_cpus=1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process, listening too
time.sleep(2)  # the agents open their ports after the raylet registers
me = psutil.Process()
found = []
for process in [me, *me.children(recursive=True)]:
    try:
        found += [[process.name(), c.laddr.ip, c.laddr.port] for c in process.net_connections(kind="inet")
                  if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        pass
print(json.dumps({"node_ip": ray.util.get_node_ip_address(), "listening": found}))
ray.shutdown()
"""


@pytest.mark.integration
def test_a_local_instance_listens_on_loopback_only(tmp_path):
    """Every TCP socket that the processes of the CLI's local instance listen on (GCS, raylet,
    object manager, agents, dashboard, workers, the driver) is bound to 127.0.0.1."""
    pytest.importorskip("psutil")
    done = subprocess.run([sys.executable, "-c", LISTENING_SOCKETS], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["node_ip"] == "127.0.0.1"
    names = {name for name, _, _ in report["listening"]}
    assert {"gcs_server", "raylet"} <= names, report
    elsewhere = [s for s in report["listening"] if s[1] not in ("127.0.0.1", "::ffff:127.0.0.1")]
    assert elsewhere == [], report


def test_a_failed_worker_is_classified_by_ray_exception_type_and_node_state():
    """The unit half of tests/test_spot.py::test_a_killed_worker_and_a_killed_node_are_told_apart:
    Ray Train wraps a worker that stopped answering in WorkerHealthCheckFailedError."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from raygpt.cluster import worker_failure_kind

    def checked(error):
        return WorkerHealthCheckFailedError("A worker health check failed. node_id='n1' died", error)

    gloo = RuntimeError("[/pair.cc:553] Connection closed by peer: the node has died")  # no substring decides
    assert worker_failure_kind(checked(ActorDiedError()), node_lost=False, process_died=True) == "worker lost"
    assert worker_failure_kind(checked(ActorDiedError()), node_lost=True, process_died=True) == "node lost"
    unreachable = checked(ActorUnavailableError("connection refused", None))
    assert worker_failure_kind(unreachable, node_lost=False, process_died=False) == "node lost"
    assert worker_failure_kind(gloo, node_lost=False, process_died=False) == "worker error"
    assert worker_failure_kind(gloo, node_lost=False, process_died=True) == "worker lost"  # its own process went
    assert worker_failure_kind(gloo, node_lost=True, process_died=False) == "node lost"
    assert worker_failure_kind(None, node_lost=False, process_died=True) == "worker lost"  # no error collected yet
