"""Store outages mid-run. SeaweedFS stopped for 20 s while 2 workers train: the run goes on,
retries its uploads, and ends as an uninterrupted run would (every step in ``metrics.jsonl``,
``run.json`` complete, every checkpoint in the store complete). Stopped for longer than
``storage.retry_minutes``: the run ends with the outage named, ``run.json`` says so, the lease
is released, and a rerun resumes where the store left the run."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from two_workers import two_worker_overrides

from raygpt.config import load_spec
from raygpt.errors import RaygptError
from raygpt.localstore import SeaweedFS, free_port_block
from raygpt.storage import Storage, join
from raygpt.train.launch import train
from raygpt.train.metrics import read_metrics, step_losses
from raygpt.weights.integrity import stored_checkpoint_problem
from raygpt.weights.layout import CHECKPOINT_NAME
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


def outage_spec(tiny_dataset: str, store, tmp_path, name: str, *extra: str):
    """The two-worker run, stopped at ``STEPS``, on a copy of the tiny dataset in ``store``."""
    local = tmp_path / "dataset"
    Storage().download(tiny_dataset, local)
    Storage(endpoint_url=store.endpoint_url).upload(local, "s3://outage/datasets/tiny")
    return load_spec(None, two_worker_overrides("s3://outage/datasets/tiny", "s3://outage/runs", name,
                                                f"train.stop_at_step={STEPS}",
                                                f"storage.endpoint_url={store.endpoint_url}", *extra))


class Driver(threading.Thread):
    """``train(spec)`` in a thread of the test; ``outcome`` holds its summary or its error."""

    def __init__(self, spec):
        super().__init__(daemon=True)
        self.spec, self.outcome = spec, {}
        self.start()

    def run(self) -> None:
        try:
            self.outcome["summary"] = train(self.spec)
        except BaseException as e:  # reported by the tests
            self.outcome["error"] = e

    def wait_for_step(self, store: Storage, step: int) -> None:
        def reached() -> int:
            try:
                return max((r["step"] for r in read_metrics(join(self.spec.storage_path, self.spec.name), store)),
                           default=0)
            except RaygptError:
                return 0

        ceiling = time.monotonic() + CEILING_S
        while reached() < step and self.is_alive() and time.monotonic() < ceiling:
            time.sleep(0.2)
        assert self.is_alive(), f"the run ended before the outage: {self.outcome}"


CEILING_S = 600
"""The longest a wait of these tests lasts: a hang guard, not a deadline."""


@pytest.mark.integration
def test_a_store_outage_mid_run_loses_nothing(ray_local, tiny_dataset, two_worker_losses, outage_store, tmp_path):
    reference = {step: loss for step, loss in two_worker_losses.items() if step <= STEPS}

    store = Storage(endpoint_url=outage_store.endpoint_url)
    spec = outage_spec(tiny_dataset, outage_store, tmp_path, "outage")
    run = join(spec.storage_path, spec.name)
    driver = Driver(spec)
    driver.wait_for_step(store, 8)
    outcome = driver.outcome
    outage_store.stop()  # by pid; the same port and data folder come back
    down = time.time()
    time.sleep(OUTAGE_S)
    up = time.time()
    outage_store.start()
    driver.join(timeout=CEILING_S)
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


class Logged(logging.Handler):
    """Sets ``event`` when a record's message starts with ``prefix``."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.event = prefix, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.event.set()


@pytest.mark.integration
def test_an_outage_past_the_retries_ends_the_run_cleanly_and_a_rerun_resumes(ray_local, tiny_dataset,
                                                                             two_worker_losses, outage_store,
                                                                             tmp_path):
    """The store stays down past ``storage.retry_minutes`` (12 s): the workers' uploads give
    up and the run ends, naming the outage; the driver marks run.json failed and releases
    the lease once the store answers again; the same command then resumes the run."""
    store = Storage(endpoint_url=outage_store.endpoint_url)
    spec = outage_spec(tiny_dataset, outage_store, tmp_path, "long", "storage.retry_minutes=0.2")
    run = join(spec.storage_path, spec.name)
    stopped = Logged("training stopped")
    logging.getLogger("raygpt.train.launch").addHandler(stopped)
    try:
        driver = Driver(spec)
        driver.wait_for_step(store, 8)
        outage_store.stop()
        assert stopped.event.wait(CEILING_S), f"the run did not stop for the outage: {driver.outcome}"
        outage_store.start()  # while the driver retries its last writes
        driver.join(timeout=CEILING_S)
    finally:
        logging.getLogger("raygpt.train.launch").removeHandler(stopped)
    assert not driver.is_alive()
    error = driver.outcome.get("error")
    assert isinstance(error, RaygptError), driver.outcome
    message = str(error)
    assert message.startswith("training stopped: the store did not answer (") and "retry_minutes: 0.2" in message
    assert "run the same command again once it answers" in message and "run.json" not in message
    record = store.read_json(join(run, "run.json"))
    assert record["status"] == "failed" and record["error"] == message
    assert not store.exists(join(run, "lease.json"))

    summary = train(spec)  # the store is back: the same command resumes the run
    assert summary["status"] == "stopped" and summary["final"]["step"] == STEPS and summary["sessions"] == 2
    losses = step_losses(read_metrics(run, store))
    assert losses == {step: loss for step, loss in two_worker_losses.items() if step <= STEPS}  # bitwise
    assert [a["ended"] for a in summary["attempts"]][-1] == "stopped"
