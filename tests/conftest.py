"""Shared fixtures: a real SeaweedFS S3 server and a local Ray instance, started once per session."""

from __future__ import annotations

import os

import pytest

from raygpt.localstore import SeaweedFS, free_port_block

BUCKET = "raygpt-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS ``weed mini`` on a free loopback port with bucket ``raygpt-test``; stopped by pid at the end."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), bucket=BUCKET, port=free_port_block()).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS variables that point clients (pyarrow, boto3, Ray workers) at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray instance with 4 logical CPUs (2 training workers plus the controller).

    Ray's worker processes inherit the environment at start, so the test store's variables
    are set before ``ray.init``.
    """
    import ray

    os.environ.update(s3_server.env())
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
