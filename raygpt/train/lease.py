"""One driver per run: the lease ``<run>/lease.json`` that a training driver holds and renews.

Two drivers training one run into one folder mix their checkpoints, and one of them fails
on a checkpoint the other deleted. So the driver takes the run's lease before anything is
written: {owner (random per driver), host, pid, started, renewed_at, expires_after_s}, renewed
by a thread every quarter of the timeout and deleted when the driver ends. A second driver
that finds the lease renewed within ``expires_after_s`` refuses, naming the holder; a lease
not renewed for that long (its driver is gone), or one whose process is gone from this same
host, is taken over. Workers restarted by Ray Train (a preemption, a lost node) run under
the same driver, so they never touch the lease.

The residual race: S3 through pyarrow has no compare-and-swap, so two drivers starting within
the same second can both write the lease. Each writes, waits ``settle_s``, and reads it back:
the one whose write landed last keeps it, the other refuses. Two drivers whose write-and-read
windows overlap exactly (both read back before either's write is visible, on a store without
read-after-write consistency) could both proceed; on S3 and SeaweedFS, which are
read-after-write consistent, that needs both writes to land in the same instant. A driver
whose renewal finds another owner stops at once (``lost``). Clocks: ``renewed_at`` is the
writer's UNIX time, so hosts' clocks must agree to well within the timeout.

No torch, no Ray: ``raygpt submit`` checks the lease before it submits a job.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join

LEASE_FILE = "lease.json"


class RunLeasedError(RaygptError):
    """Another live driver holds the run's lease."""


def lease_uri(run_uri: str) -> str:
    return join(run_uri, LEASE_FILE)


def read_lease(run_uri: str, storage: Storage) -> dict[str, Any] | None:
    uri = lease_uri(run_uri)
    if not storage.exists(uri):
        return None
    try:
        return storage.read_json(uri)
    except RaygptError:  # written by hand, or cut off: not a live driver's
        return None


def holder_alive(lease: dict[str, Any], now: float | None = None) -> bool:
    """Whether the lease's driver may still be running: renewed within its timeout, and not a
    process known to be gone from this host."""
    now = time.time() if now is None else now
    if now - float(lease.get("renewed_at", 0)) > float(lease.get("expires_after_s", 0)):
        return False
    if lease.get("host") == socket.gethostname() and isinstance(lease.get("pid"), int):
        return _pid_alive(lease["pid"])
    return True


def describe_holder(run_name: str, run_uri: str, lease: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    ago = max(0.0, now - float(lease.get("renewed_at", 0)))
    timeout = float(lease.get("expires_after_s", 0))
    return (f"run {run_name} is being trained by another driver (host {lease.get('host')}, pid {lease.get('pid')}, "
            f"started {lease.get('started')}): its lease {lease_uri(run_uri)} was renewed {ago:.0f} s ago; it is "
            f"taken over once it goes {timeout:.0f} s without renewal (in {max(0.0, timeout - ago):.0f} s). "
            "Follow that run instead, or, if its driver is gone, wait or pass --set train.take_over=true")


def check_free(run_name: str, run_uri: str, storage: Storage) -> None:
    """A RaygptError naming the holder when a live driver holds the run's lease."""
    lease = read_lease(run_uri, storage)
    if lease is not None and holder_alive(lease):
        raise RunLeasedError(describe_holder(run_name, run_uri, lease))


class RunLease:
    """The run's lease, held by this driver from ``acquire`` to ``release``."""

    def __init__(self, run_name: str, run_uri: str, storage: Storage, expires_after_s: float,
                 settle_s: float = 1.0, on_lost: Callable[[str], None] | None = None):
        self.run_name, self.run_uri, self.storage = run_name, run_uri, storage
        self.uri = lease_uri(run_uri)
        self.expires_after_s, self.settle_s = expires_after_s, settle_s
        self.owner = secrets.token_hex(8)
        self.on_lost = on_lost
        self.lost: str | None = None
        """Why this driver lost the lease (another took it over), or None."""
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a renewal in flight finishes before release deletes
        self._renewer: threading.Thread | None = None

    def content(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "renewed_at": time.time(), "expires_after_s": self.expires_after_s}

    def acquire(self, take_over: bool = False) -> RunLease:
        """Take the lease (over, when its holder is gone or ``take_over``), or refuse with the
        holder named; then renew it in the background."""
        held = read_lease(self.run_uri, self.storage)
        if held is not None and held.get("owner") != self.owner and holder_alive(held):
            if not take_over:
                raise RunLeasedError(describe_holder(self.run_name, self.run_uri, held))
            print(f"raygpt train: taking over the lease of run {self.run_name} from host {held.get('host')}, "
                  f"pid {held.get('pid')} (train.take_over)", file=sys.stderr)
        self.storage.write_json(self.uri, self.content())
        time.sleep(self.settle_s)  # another driver's write in the same instant lands by now
        now = read_lease(self.run_uri, self.storage)
        if now is None or now.get("owner") != self.owner:
            raise RunLeasedError(describe_holder(self.run_name, self.run_uri, now) if now else
                              f"run {self.run_name}: its lease {self.uri} vanished while this driver took it; "
                              "another driver is starting or ending the run: try again")
        self._renewer = threading.Thread(target=self._renew, name="raygpt-lease", daemon=True)
        self._renewer.start()
        return self

    def _renew(self) -> None:
        interval = self.expires_after_s / 4
        while not self._stop.wait(interval):
            try:
                held = read_lease(self.run_uri, self.storage)
                if held is not None and held.get("owner") != self.owner:
                    self.lost = (f"run {self.run_name}: the lease was taken over by host {held.get('host')}, "
                                 f"pid {held.get('pid')}: this driver stops")
                    if self.on_lost is not None:
                        self.on_lost(self.lost)
                    return
                with self._writing:
                    if self._stop.is_set():
                        return
                    self.storage.write_json(self.uri, self.content())
            except RaygptError as e:  # the store is out for longer than storage.retry_minutes
                print(f"raygpt train: cannot renew the lease of run {self.run_name}: {e}", file=sys.stderr)

    def release(self) -> None:
        """Stop renewing and delete the lease, unless another driver holds it now."""
        self._stop.set()
        if self.lost:
            return
        try:
            with self._writing:
                held = read_lease(self.run_uri, self.storage)
                if held is not None and held.get("owner") == self.owner:
                    self.storage.delete(self.uri)
                    if not is_remote(self.run_uri):  # a run that wrote nothing leaves no empty folder
                        with contextlib.suppress(OSError):
                            os.rmdir(self.run_uri)
        except RaygptError as e:
            print(f"raygpt train: cannot release the lease of run {self.run_name} ({e}); the next driver "
                  f"takes it over after {self.expires_after_s:.0f} s", file=sys.stderr)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
