"""One driver per run: the lease a training driver holds, a second driver's refusal, a stale
lease taken over, and two drivers starting at once."""

from __future__ import annotations

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
from raygpt.train.launch import train
from raygpt.train.lease import RunLease, RunLeasedError, check_free, lease_uri, read_lease

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
