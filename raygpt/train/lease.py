"""One driver per run: the lease ``<run>/lease.json`` that a training driver holds and renews.

Two drivers training one run into one folder mix their checkpoints, and one of them fails
on a checkpoint the other deleted. So the driver takes the run's lease before anything is
written: {owner (random per driver), host, pid, started, renewed_at, expires_after_s}, renewed
by a thread every quarter of the timeout and deleted when the driver ends. A second driver
that finds the lease renewed within ``expires_after_s`` refuses, naming the holder; a lease
not renewed for that long (its driver is gone), or one whose process is gone from this same
host, is taken over. Workers restarted by Ray Train (a preemption, a lost node) run under
the same driver, so they never touch the lease.

The lease is written conditionally (``raygpt.storage.conditional``): taken with a
create-if-absent write, renewed and taken over with a compare-and-swap on the version read
(S3's ETag, ``If-Match``), deleted only if unchanged. Of two drivers starting in the same
instant exactly one's write succeeds; the other refuses, and a driver whose renewal finds
another version stops at once (``lost``). At start the driver probes whether the store
enforces the conditions; on one that ignores them it falls back to writing, waiting
``settle_s`` and reading back (the last write wins; two drivers whose read-backs both come
before either's write is visible could both start), says so, and the run record keeps which
(``lease``). Clocks: ``renewed_at`` is the writer's UNIX time, so hosts' clocks must agree
to well within the timeout.

No torch, no Ray: ``raygpt submit`` checks the lease before it submits a job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from raygpt.errors import RaygptError
from raygpt.storage import Storage, is_remote, join
from raygpt.storage.conditional import conditional_file, enforces_conditions

log = logging.getLogger(__name__)

LEASE_FILE = "lease.json"


class RunLeasedError(RaygptError):
    """Another live driver holds the run's lease."""


def lease_uri(run_uri: str) -> str:
    return join(run_uri, LEASE_FILE)


def read_lease(run_uri: str, storage: Storage) -> dict[str, Any] | None:
    """The run's lease (read as its writers write it: never half of a rewrite), or None."""
    return _parsed(conditional_file(lease_uri(run_uri), storage).read()[0])


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


CONDITIONAL = "conditional writes"
"""The lease's method on a store that enforces conditional writes."""
WRITE_AND_READ_BACK = "write and read back"
"""Its method on one that ignores them."""


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
        self.method: str | None = None
        """How the lease is written: ``CONDITIONAL``, or ``WRITE_AND_READ_BACK`` on a store that
        ignores conditions; known once ``acquire`` probed the store."""
        self.started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.file = conditional_file(self.uri, storage)
        self._version: str | None = None  # the version this driver wrote last (conditional writes)
        self._stop = threading.Event()
        self._writing = threading.Lock()  # a renewal in flight finishes before release deletes
        self._renewer: threading.Thread | None = None

    def content(self) -> dict[str, Any]:
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "started": self.started,
                "renewed_at": time.time(), "expires_after_s": self.expires_after_s}

    def record(self) -> dict[str, Any]:
        """What the run record keeps of the lease."""
        if self.method == CONDITIONAL:
            return {"method": self.method}
        return {"method": self.method, "note": "the store ignores conditional writes (If-None-Match, If-Match): "
                                               "two drivers starting in the same instant could both run"}

    def acquire(self, take_over: bool = False) -> RunLease:
        """Take the lease (over, when its holder is gone or ``take_over``), or refuse with the
        holder named; then renew it in the background."""
        self.method = CONDITIONAL if enforces_conditions(self.run_uri, self.storage) else WRITE_AND_READ_BACK
        if self.method == CONDITIONAL:
            self._take(take_over)
        else:
            log.warning("raygpt train: the store of %s ignores conditional writes; the run's lease falls back to "
                        "writing and reading back, so two drivers starting in the same instant could both run",
                        self.run_uri)
            self._write_and_read_back(take_over)
        self._renewer = threading.Thread(target=self._renew, name="raygpt-lease", daemon=True)
        self._renewer.start()
        return self

    def _refuse_live_holder(self, held: dict[str, Any] | None, take_over: bool) -> None:
        if held is None or held.get("owner") == self.owner or not holder_alive(held):
            return
        if not take_over:
            raise RunLeasedError(describe_holder(self.run_name, self.run_uri, held))
        log.warning("raygpt train: taking over the lease of run %s from host %s, pid %s (train.take_over)",
                    self.run_name, held.get("host"), held.get("pid"))

    def _take(self, take_over: bool) -> None:
        """Create the lease, or swap the version read for this driver's: one of two drivers
        doing it at once succeeds."""
        data, version = self.file.read()
        self._refuse_live_holder(_parsed(data), take_over)
        body = _encoded(self.content())
        written = self.file.create(body) if version is None else self.file.replace(body, version)
        if written is None:
            data, version = self.file.read()
            if data != body:  # (equal: this write landed, and a retry of it was refused)
                now = _parsed(data)
                raise RunLeasedError(describe_holder(self.run_name, self.run_uri, now) if now else
                                     f"run {self.run_name}: its lease {self.uri} changed while this driver took it; "
                                     "another driver is starting or ending the run: try again")
            written = version
        self._version = written

    def _write_and_read_back(self, take_over: bool) -> None:
        self._refuse_live_holder(read_lease(self.run_uri, self.storage), take_over)
        self.storage.write_json(self.uri, self.content())
        time.sleep(self.settle_s)  # another driver's write in the same instant lands by now
        now = read_lease(self.run_uri, self.storage)
        if now is None or now.get("owner") != self.owner:
            raise RunLeasedError(describe_holder(self.run_name, self.run_uri, now) if now else
                                 f"run {self.run_name}: its lease {self.uri} vanished while this driver took it; "
                                 "another driver is starting or ending the run: try again")

    def _renew(self) -> None:
        interval = self.expires_after_s / 4
        while not self._stop.wait(interval):
            try:
                with self._writing:
                    if self._stop.is_set():
                        return
                    held = self._renewed()
                if held is not None:
                    self.lost = (f"run {self.run_name}: the lease was taken over by host {held.get('host')}, "
                                 f"pid {held.get('pid')}: this driver stops")
                    if self.on_lost is not None:
                        self.on_lost(self.lost)
                    return
            except RaygptError as e:  # the store is out for longer than storage.retry_minutes
                log.warning("raygpt train: cannot renew the lease of run %s: %s", self.run_name, e)

    def _renewed(self) -> dict[str, Any] | None:
        """Renew the lease; None, or the lease another driver wrote over it."""
        if self.method == WRITE_AND_READ_BACK:
            held = read_lease(self.run_uri, self.storage)
            if held is not None and held.get("owner") != self.owner:
                return held
            self.storage.write_json(self.uri, self.content())
            return None
        body = _encoded(self.content())
        written = self.file.replace(body, self._version)
        if written is None:
            data, version = self.file.read()
            if data is None:  # deleted by hand: written again, as before conditional writes
                written = self.file.create(body)
                data, version = (body, written) if written is not None else self.file.read()
            if data != body:  # (equal: this write landed, and a retry of it was refused)
                return _parsed(data) or {"host": "unknown", "pid": "unknown"}
            written = version
        self._version = written
        return None

    def release(self) -> None:
        """Stop renewing and delete the lease, unless another driver holds it now."""
        self._stop.set()
        if self.lost or self.method is None:
            return
        try:
            with self._writing:
                if self.method == CONDITIONAL:
                    deleted = self.file.delete(self._version)
                else:
                    held = read_lease(self.run_uri, self.storage)
                    deleted = held is not None and held.get("owner") == self.owner
                    if deleted:
                        self.storage.delete(self.uri)
                if deleted and not is_remote(self.run_uri):  # a run that wrote nothing leaves no empty folder
                    with contextlib.suppress(OSError):
                        os.rmdir(self.run_uri)
        except RaygptError as e:
            log.warning("raygpt train: cannot release the lease of run %s (%s); a driver started on this host "
                        "(%s) takes it over at once, once this one has exited; one on another host after %.0f s "
                        "without renewal", self.run_name, e, socket.gethostname(), self.expires_after_s)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _encoded(lease: dict[str, Any]) -> bytes:
    return (json.dumps(lease, indent=2) + "\n").encode()


def _parsed(data: bytes | None) -> dict[str, Any] | None:
    """A lease's fields; None for none, or for one written by hand or cut off (no live driver's)."""
    if data is None:
        return None
    try:
        lease = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return lease if isinstance(lease, dict) else None


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not exited. A driver that exited but whose parent
    has not reaped it yet (a Ray actor killed with its job, until its raylet waits for it) still
    answers signals: on Linux its state in /proc says it is a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]  # after the command name, which may hold spaces
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal said it exists
    return state not in ("Z", "X")
