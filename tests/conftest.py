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


@pytest.fixture(scope="session")
def tiny_dataset(s3_server, tmp_path_factory):
    """A prepared dataset in the test store (``s3://raygpt-test/datasets/tiny``): synthetic text,
    about 64k train tokens in two shards and 4k each of val and test; prepared once per session."""
    import random

    from raygpt.config import load_spec
    from raygpt.data.prepare import prepare
    from raygpt.storage import Storage

    os.environ.update(s3_server.env())
    rng = random.Random(0)
    vocabulary = [("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 8)))) for _ in range(400)]
    paragraphs = [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(20, 60))) + "." for _ in range(3000)]
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n\n".join(paragraphs))
    uri = f"s3://{BUCKET}/datasets/tiny"
    spec = load_spec(None, [f"data.source={corpus}", f"data.output={uri}", "data.txt_documents=paragraphs",
                            "data.tokens=65536", "data.shard_tokens=32768", "data.val_tokens=4096",
                            "data.test_tokens=4096", "data.heldout_permille=100", "data.num_proc=1"])
    prepare(spec, Storage())
    return uri


@pytest.fixture(scope="session")
def two_worker_losses(ray_local, tiny_dataset):
    """The per-step losses of an uninterrupted run of ``two_workers.two_worker_overrides``."""
    from two_workers import two_worker_overrides

    from raygpt.config import load_spec
    from raygpt.storage import Storage, join
    from raygpt.train.launch import train
    from raygpt.train.metrics import read_metrics, step_losses

    root = f"s3://{BUCKET}/reference-{os.urandom(4).hex()}"
    train(load_spec(None, two_worker_overrides(tiny_dataset, root, "reference")))
    return step_losses(read_metrics(join(root, "reference"), Storage()))
