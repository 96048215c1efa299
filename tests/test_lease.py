"""One driver per run: the lease a training driver holds, a second driver's refusal, a stale
lease taken over, two drivers starting at once, and the conditional writes under it (local
files, SeaweedFS, and a store that ignores the conditions)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from raygpt.config import load_spec, spec_to_dict
from raygpt.errors import RaygptError
from raygpt.storage import Storage
from raygpt.storage.conditional import conditional_file, enforces_conditions
from raygpt.train.launch import train
from raygpt.train.lease import (
    CONDITIONAL,
    WRITE_AND_READ_BACK,
    RunLease,
    RunLeasedError,
    check_free,
    lease_uri,
    read_lease,
)

REPO = Path(__file__).resolve().parent.parent
HELD = (r"run r1 is being trained by another driver \(host .+, pid \d+, started .+\): its lease .*r1/lease.json "
        r"was renewed \d+ s ago; it is taken over once it goes 60 s without renewal \(in \d+ s\)")


def spec_for(root: Path, *extra: str):
    return load_spec(None, ["name=r1", f"storage_path={root}", "train.dataset=/nowhere", "train.lease_timeout_s=60",
                            *extra])


def test_a_second_driver_refuses_while_the_lease_is_renewed(tmp_path):
    st, run = Storage(), str(tmp_path / "r1")
    with RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire():
        assert read_lease(run, st)["expires_after_s"] == 60
        with pytest.raises(RunLeasedError, match=HELD + r"\. Follow that run instead, or, if its driver is gone, "
                                                        r"wait or pass --set train.take_over=true"):
            train(spec_for(tmp_path))  # refused before it reads the (missing) dataset
        with pytest.raises(RunLeasedError, match=HELD):
            check_free("r1", run, st)  # what raygpt submit asks before it submits
    assert read_lease(run, st) is None  # released at the end
    check_free("r1", run, st)


def test_raygpt_train_refuses_with_one_message(tmp_path):
    st, run = Storage(), str(tmp_path / "r1")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_to_dict(spec_for(tmp_path))))
    with RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire():
        done = subprocess.run([sys.executable, "-m", "raygpt.cli", "train", str(spec)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "run r1 is being trained by another driver" in done.stderr and "Traceback" not in done.stderr


def test_a_stale_lease_and_a_gone_process_are_taken_over(tmp_path):
    st, run = Storage(), str(tmp_path / "r1")
    stale = {"owner": "x", "host": "elsewhere", "pid": 1, "started": "then", "renewed_at": time.time() - 61,
             "expires_after_s": 60}
    st.write_json(lease_uri(run), stale)
    with RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire() as lease:
        assert read_lease(run, st)["owner"] == lease.owner
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    import socket
    st.write_json(lease_uri(run), {**stale, "host": socket.gethostname(), "pid": gone.pid, "renewed_at": time.time()})
    with RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire() as lease:
        assert read_lease(run, st)["owner"] == lease.owner


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are told apart through /proc")
def test_a_driver_that_exited_but_is_not_reaped_yet_is_gone(tmp_path):
    """A Ray actor that drove a run is killed with its job, then waits for its raylet to reap it:
    it still answers signals meanwhile, but its lease is free."""
    import socket

    st, run = Storage(), str(tmp_path / "r1")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it exits
    try:
        ceiling = time.monotonic() + 60  # a hang guard: `pass` exits at once
        while Path(f"/proc/{exited.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < ceiling, "the child never exited"
            time.sleep(0.01)
        st.write_json(lease_uri(run), {"owner": "x", "host": socket.gethostname(), "pid": exited.pid,
                                       "started": "then", "renewed_at": time.time(), "expires_after_s": 60})
        check_free("r1", run, st)
        with RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire() as lease:
            assert read_lease(run, st)["owner"] == lease.owner
    finally:
        exited.wait()


def test_the_lease_is_renewed_and_a_take_over_stops_the_holder(tmp_path):
    st, run = Storage(), str(tmp_path / "r1")
    lost = []
    first = RunLease("r1", run, st, expires_after_s=0.4, settle_s=0, on_lost=lost.append).acquire()
    renewed = read_lease(run, st)["renewed_at"]
    time.sleep(0.5)
    assert read_lease(run, st)["renewed_at"] > renewed  # a lease older than its timeout, but renewed: alive
    with pytest.raises(RunLeasedError):
        RunLease("r1", run, st, expires_after_s=0.4, settle_s=0).acquire()
    second = RunLease("r1", run, st, expires_after_s=60, settle_s=0).acquire(take_over=True)
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "the lease was taken over by host" in lost[0]
    first.release()  # the holder that lost does not delete the new owner's lease
    assert read_lease(run, st)["owner"] == second.owner
    second.release()


def test_of_two_drivers_starting_at_once_one_trains(tmp_path):
    st, run = Storage(), str(tmp_path / "r1")
    outcomes: list = []
    barrier = threading.Barrier(2)

    def start() -> None:
        lease = RunLease("r1", run, st, expires_after_s=60, settle_s=0.5)
        barrier.wait()
        try:
            outcomes.append(lease.acquire())
        except RaygptError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [o for o in outcomes if isinstance(o, RunLease)]
    assert len(held) == 1 and isinstance(next(o for o in outcomes if o not in held), RunLeasedError)
    assert read_lease(run, st)["owner"] == held[0].owner
    held[0].release()


# ---------------------------------------------------------------------------------------------
# Conditional writes: local files, and SeaweedFS as S3


def conditional_semantics(file) -> None:
    """Create-if-absent, compare-and-swap and delete-if-unchanged, as the lease uses them."""
    assert file.read() == (None, None)
    first = file.create(b"one")
    assert first is not None and file.create(b"two") is None
    assert file.read() == (b"one", first)
    second = file.replace(b"three", first)
    assert second is not None and file.replace(b"four", first) is None  # a stale version is refused
    assert not file.delete(first) and file.read() == (b"three", second)
    assert file.delete(second) and file.read() == (None, None)
    assert file.replace(b"five", second) is None  # gone: nothing to swap


def test_local_conditional_writes(tmp_path):
    conditional_semantics(conditional_file(str(tmp_path / "run" / "lease.json"), Storage()))
    assert enforces_conditions(str(tmp_path / "run"), Storage())
    assert os.listdir(tmp_path / "run") == []  # the probe is deleted


def test_of_many_local_creators_and_swappers_exactly_one_wins(tmp_path):
    path = str(tmp_path / "lease.json")
    for _ in range(20):
        barrier = threading.Barrier(8)
        won: list[int] = []

        def create(i: int) -> None:
            barrier.wait()
            if conditional_file(path, Storage()).create(str(i).encode()) is not None:
                won.append(i)

        run_threads(create, 8)
        assert len(won) == 1 and conditional_file(path, Storage()).read()[0] == str(won[0]).encode()
        version = conditional_file(path, Storage()).read()[1]
        swapped: list[int] = []

        def swap(i: int) -> None:
            barrier.wait()
            if conditional_file(path, Storage()).replace(f"swap {i}".encode(), version) is not None:
                swapped.append(i)

        run_threads(swap, 8)
        assert len(swapped) == 1
        os.unlink(path)


def run_threads(target, n: int) -> None:
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


@pytest.mark.integration
def test_seaweedfs_enforces_conditional_writes(s3_env):
    root = f"s3://raygpt-test/conditional-{os.urandom(4).hex()}"
    conditional_semantics(conditional_file(f"{root}/lease.json", Storage()))
    assert enforces_conditions(root, Storage())


# Two `raygpt train` drivers of a run, reduced to what decides which one runs: each takes the
# lease of run r<k> at its scheduled instant of round k, and keeps what it took until both
# drivers are through every round.
DRIVER = """
import json, sys, time
from raygpt.storage import Storage
from raygpt.train.lease import RunLease, RunLeasedError
root, starts = sys.argv[1], json.loads(sys.argv[2])
print("ready", flush=True)
t0 = float(sys.stdin.readline())
held = []
for k, offset in enumerate(starts):
    time.sleep(max(0.0, t0 + offset - time.time()))
    started = time.time()
    lease = RunLease(f"r{k}", f"{root}/r{k}", Storage(), expires_after_s=60)
    try:
        held.append(lease.acquire())
        print(json.dumps({"round": k, "held": True, "method": lease.method, "started": started}), flush=True)
    except RunLeasedError:
        print(json.dumps({"round": k, "held": False, "started": started}), flush=True)
sys.stdin.readline()
for lease in held:
    lease.release()
"""


@pytest.mark.integration
def test_of_two_drivers_started_within_50_ms_exactly_one_runs_20_rounds_on_seaweedfs(s3_env):
    import json
    import random

    root, rounds, pace = f"s3://raygpt-test/lease-race-{os.urandom(4).hex()}", 20, 0.5
    rng = random.Random(7)
    schedules = [[k * pace + rng.uniform(0, 0.05) for k in range(rounds)] for _ in range(2)]
    drivers = [subprocess.Popen([sys.executable, "-c", DRIVER, root, json.dumps(starts)], cwd=REPO, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE) for starts in schedules]
    for driver in drivers:
        assert driver.stdout.readline().strip() == "ready"
    t0 = time.time() + 1.0
    for driver in drivers:
        driver.stdin.write(f"{t0}\n")
        driver.stdin.flush()
    outcomes = [[json.loads(driver.stdout.readline()) for _ in range(rounds)] for driver in drivers]
    for driver in drivers:
        driver.communicate("release\n", timeout=120)
    assert [d.returncode for d in drivers] == [0, 0]
    assert all(abs(a - b) < 0.05 for a, b in zip(*schedules))  # each round's two starts lie within 50 ms
    for k in range(rounds):
        first, second = outcomes[0][k], outcomes[1][k]
        assert first["round"] == second["round"] == k
        assert first["held"] + second["held"] == 1, (k, first, second)  # exactly one driver runs
        assert (first if first["held"] else second)["method"] == CONDITIONAL
    assert read_lease(f"{root}/r0", Storage()) is None  # the winners released theirs at the end


@pytest.mark.integration
def test_a_store_that_ignores_the_conditions_is_found_and_the_lease_falls_back(s3_env, monkeypatch, caplog):
    """SeaweedFS with the If-None-Match / If-Match headers taken off every request before it is
    signed: a store that writes whatever it is sent."""
    from raygpt.storage import conditional

    new_client = conditional.s3_client.__wrapped__

    def ignoring_client(endpoint_url, region):
        client = new_client(endpoint_url, region)

        def without_conditions(request, **_):
            for header in ("If-None-Match", "If-Match"):
                if header in request.headers:
                    del request.headers[header]

        client.meta.events.register("before-sign.s3", without_conditions)
        return client

    monkeypatch.setattr(conditional, "s3_client", ignoring_client)
    root = f"s3://raygpt-test/no-conditions-{os.urandom(4).hex()}"
    st = Storage()
    assert not enforces_conditions(root, st)
    lease = RunLease("r1", f"{root}/r1", st, expires_after_s=60, settle_s=0.2).acquire()
    assert lease.method == WRITE_AND_READ_BACK
    assert lease.record() == {"method": "write and read back", "note": "the store ignores conditional writes "
                              "(If-None-Match, If-Match): two drivers starting in the same instant could both run"}
    assert "ignores conditional writes" in caplog.text
    with pytest.raises(RunLeasedError, match=HELD):
        RunLease("r1", f"{root}/r1", st, expires_after_s=60, settle_s=0.2).acquire()
    assert read_lease(f"{root}/r1", st)["owner"] == lease.owner
    lease.release()
    assert read_lease(f"{root}/r1", st) is None


@pytest.mark.integration
def test_a_stale_lease_in_s3_is_taken_over_by_one_of_two_drivers(s3_env):
    run, st = f"s3://raygpt-test/stale-{os.urandom(4).hex()}/r1", Storage()
    st.write_json(lease_uri(run), {"owner": "x", "host": "elsewhere", "pid": 1, "started": "then",
                                   "renewed_at": time.time() - 61, "expires_after_s": 60})
    outcomes: list = []
    barrier = threading.Barrier(2)

    def take(_: int) -> None:
        lease = RunLease("r1", run, st, expires_after_s=60)
        barrier.wait()
        try:
            outcomes.append(lease.acquire())
        except RunLeasedError as e:
            outcomes.append(e)

    run_threads(take, 2)
    held = [o for o in outcomes if isinstance(o, RunLease)]
    assert len(held) == 1 and read_lease(run, st)["owner"] == held[0].owner
    held[0].release()
