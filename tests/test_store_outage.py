"""A store outage mid-run: SeaweedFS stopped for 20 s while 2 workers train. The run goes on,
retries its uploads, and ends as an uninterrupted run would: every step in
``metrics.jsonl``, ``run.json`` complete, every checkpoint in the store complete."""

from __future__ import annotations

import threading
import time

import pytest

from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.localstore import SeaweedFS, free_port_block
from raygpt.storage import Storage, join
from raygpt.train.launch import train
from raygpt.train.metrics import read_metrics, step_losses
from two_workers import two_worker_overrides
from raygpt.weights.checkpoint import CHECKPOINT_NAME, stored_checkpoint_problem
from raygpt.weights.refs import load_model

STEPS = 32  # of the reference run's 80: the same schedule, stopped early
OUTAGE_S = 20


@pytest.fixture
def outage_store(s3_server, tmp_path):
    """A store of the test's own (the session's must not go down), with the session store's
    credentials, which the Ray workers already have; the tiny dataset is copied into it."""
    store = SeaweedFS(tmp_path / "weed", bucket="outage", port=free_port_block())
    store.access_key, store.secret_key = s3_server.access_key, s3_server.secret_key
    store.start()
    yield store
    store.stop()


@pytest.mark.integration
def test_a_store_outage_mid_run_loses_nothing(ray_local, tiny_dataset, two_worker_losses, outage_store, tmp_path):
    reference = {step: loss for step, loss in two_worker_losses.items() if step <= STEPS}

    store = Storage(endpoint_url=outage_store.endpoint_url)
    local = tmp_path / "dataset"
    Storage().download(tiny_dataset, local)
    store.upload(local, "s3://outage/datasets/tiny")
    spec = load_spec(None, two_worker_overrides("s3://outage/datasets/tiny", "s3://outage/runs", "outage",
                                                f"train.stop_at_step={STEPS}",
                                                f"storage.endpoint_url={outage_store.endpoint_url}"))
    run = join(spec.storage_path, spec.name)
    outcome: dict = {}

    def drive() -> None:
        try:
            outcome["summary"] = train(spec)
        except BaseException as e:  # reported by the test below
            outcome["error"] = e

    driver = threading.Thread(target=drive, daemon=True)
    driver.start()

    def reached() -> int:
        try:
            return max((r["step"] for r in read_metrics(run, store)), default=0)
        except RaygptError:
            return 0

    deadline = time.monotonic() + 180
    while reached() < 8 and driver.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert driver.is_alive(), f"the run ended before the outage: {outcome}"
    outage_store.stop()  # by pid; the same port and data folder come back
    down = time.time()
    time.sleep(OUTAGE_S)
    up = time.time()
    outage_store.start()
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not end after the store came back"
    assert "error" not in outcome, f"the run failed: {outcome['error']!r}"

    record = store.read_json(join(run, "run.json"))
    assert record["status"] == "stopped" and record["final"]["step"] == STEPS  # at stop_at_step
    assert [a["ended"] for a in record["attempts"]] == ["stopped"]  # no worker failed
    records = read_metrics(run, store)
    losses = step_losses(records)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == reference  # bitwise: the same 2 workers' arithmetic as without the outage
    assert any(down < r["time"] < up for r in records), "no step was trained while the store was down"
    names = [n for n in store.list(run) if CHECKPOINT_NAME.match(n)]
    assert names and names[-1] == f"checkpoint_{STEPS:08d}"
    for name in names:
        assert stored_checkpoint_problem(join(run, name), store) is None  # complete, every file's SHA-256 right
    model, info = load_model(join(run, names[-1]), spec, store)
    assert info["step"] == STEPS
    assert not store.exists(join(run, "lease.json"))
