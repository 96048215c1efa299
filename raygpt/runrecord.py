"""What a run leaves next to its checkpoints: ``run.json`` (the run record) and ``metrics.jsonl``.

``run.json`` says how to reproduce a run and what it reached: the resolved spec, raygpt's
version and git commit, package versions, the dataset's manifest hash, seeds, hardware and
the final metrics. ``metrics.jsonl`` holds one record per reported step (loss of every step,
lr, grad norm, tokens/s, MFU, val loss, checkpoint stalls).

``MetricsLog`` is a Ray Train ``UserCallback``: it runs in the Train controller, which
outlives worker restarts, and forwards every record to the driver's display. After a restart
the steps since the last checkpoint are trained again, so their first records are dropped
and the log reads like one uninterrupted run. Neither file holds a credential: specs have
none, and URLs are stripped of any user:password part.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ray.train import UserCallback

from raygpt import __version__
from raygpt.config import RunSpec, spec_to_dict
from raygpt.errors import RaygptError
from raygpt.storage import Storage, join

RUN_RECORD_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PACKAGES = ("torch", "ray", "numpy", "pyarrow", "tiktoken")
# metrics.jsonl is rewritten whole (object stores cannot append), so not on every report.
METRICS_WRITE_INTERVAL_S = 30.0


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(run_uri: str, storage: Storage) -> list[dict[str, Any]]:
    """The records of ``run_uri/metrics.jsonl``, or [] when there is none yet."""
    uri = join(run_uri, METRICS_FILE)
    if not storage.exists(uri):
        return []
    records = []
    for number, line in enumerate(storage.read_text(uri).splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RaygptError(f"{uri}: line {number} is not valid JSON") from None
    return records


def step_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    """Training loss of every step, from the per-step losses each record carries."""
    return {int(step): loss for r in records for step, loss in r.get("step_losses", {}).items()}


class MetricsLog(UserCallback):
    """Keeps one record per reported step, writes ``metrics.jsonl`` and forwards records to the driver.

    Workers report dicts with a ``step``; a report that only adds to a step (the seconds a
    checkpoint stalled training) is merged into that step's record. A record with
    ``resumed_from_step`` starts a new attempt: records after that step are discarded.
    """

    def __init__(self, run_uri: str, storage: Storage, previous: list[dict[str, Any]], queue=None):
        self.uri = join(run_uri, METRICS_FILE)
        self.storage = storage
        self.records: list[dict[str, Any]] = list(previous)
        self.queue = queue
        self._last_write = 0.0
        self._devices_seen = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        record = dict(metrics[0])
        if "step" not in record:  # a setup error every worker agreed on: the driver reports it
            self._forward(record)
            return
        if not self._devices_seen and "device" in record:
            record["devices"] = [m.get("device") for m in metrics]
            self._devices_seen = True
        if "resumed_from_step" in record:
            self.records = [r for r in self.records if r["step"] <= record["resumed_from_step"]]
        if self.records and self.records[-1]["step"] == record["step"]:
            self.records[-1].update(record)
        else:
            self.records.append(record)
        if checkpoint is not None:
            self.records[-1]["checkpoint"] = os.path.basename(checkpoint.path)
        now = time.monotonic()
        saved = checkpoint is not None or "checkpoint_stall_s" in record
        if saved or now - self._last_write > METRICS_WRITE_INTERVAL_S:
            self.write()
        self._forward(record)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.write()
        rank, error = next(iter(sorted(worker_exceptions.items())))
        self._forward({"event": "worker_failure", "rank": rank, "error": last_line(str(error))})

    def write(self) -> None:
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        self.storage.write_text(self.uri, text)
        self._last_write = time.monotonic()

    def _forward(self, record: dict[str, Any]) -> None:
        if self.queue is not None:
            self.queue.put(record)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text


# ---------------------------------------------------------------------------------------------
# run.json


def git_commit() -> str | None:
    """The commit of the raygpt checkout this code runs from (``+dirty`` when modified), or None."""
    repo = Path(__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no", "--",
                                "raygpt"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def without_userinfo(url: str | None) -> str | None:
    """``http://user:secret@host:9000`` -> ``http://host:9000``: a URL may carry credentials."""
    if not url or "@" not in url:
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def recorded_spec(spec: RunSpec) -> dict[str, Any]:
    """The resolved spec as run records and checkpoints keep it: the endpoint without any user:password."""
    resolved = spec_to_dict(spec)
    resolved["storage"]["endpoint_url"] = without_userinfo(resolved["storage"]["endpoint_url"])
    return resolved


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class RunRecord:
    """``run.json``: written when a run starts (status ``running``) and again when it ends."""

    def __init__(self, spec: RunSpec, storage: Storage, *, manifest_sha256: str, plan: dict[str, Any],
                 model: dict[str, Any], hardware: dict[str, Any]):
        self.storage = storage
        self.uri = join(spec.storage_path, spec.name, RUN_RECORD_FILE)
        self.record: dict[str, Any] = {
            "name": spec.name,
            "status": "running",
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "finished": None,
            "raygpt_version": __version__,
            "git_commit": git_commit(),
            "packages": package_versions(),
            "spec": recorded_spec(spec),
            "dataset": {"uri": spec.train.dataset, "manifest_sha256": manifest_sha256},
            "seeds": {"train": spec.train.seed},
            "plan": plan,
            "model": model,
            "hardware": hardware,
            "final": None,
        }
        previous = self.previous()
        if previous is not None:
            # A resumed run keeps its first start time and counts its sessions.
            self.record["started"] = previous.get("started", self.record["started"])
            self.record["sessions"] = previous.get("sessions", 1) + 1
        else:
            self.record["sessions"] = 1

    def previous(self) -> dict[str, Any] | None:
        if not self.storage.exists(self.uri):
            return None
        try:
            return self.storage.read_json(self.uri)
        except RaygptError:
            return None

    def write(self) -> None:
        self.storage.write_json(self.uri, self.record)

    def finish(self, status: str, final: dict[str, Any] | None = None, error: str | None = None, **extra: Any) -> None:
        self.record.update(status=status, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           final=final, **extra)
        if error is not None:
            self.record["error"] = error
        self.write()
