"""``run.json``: how to reproduce a run and what it reached.

The resolved spec, raygpt's version and git commit, package versions, the dataset's manifest
hash, seeds, hardware, the final metrics, the experiment-tracker runs (``trackers``: what a
resumed run logs to again) and the cost (``cost``: GPU-hours, wall-clock and dollars over
all sessions). It holds no credential: specs have none, and every URL in it (the spec's, a
tracker's, one quoted by an error) is stripped of any user:password part.
"""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from raygpt import __version__
from raygpt.config import RunSpec, recorded_spec
from raygpt.errors import RaygptError
from raygpt.stages import RUN_RECORD_FILE
from raygpt.storage import Storage, join, without_credentials

PACKAGES = ("torch", "ray", "numpy", "pyarrow", "tiktoken")


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
        self.earlier: dict[str, Any] = previous or {}
        """The record as the previous session left it ({} for a new run)."""
        if previous is not None:
            # A resumed run keeps its first start time, counts its sessions, and keeps its
            # tracker runs and the cost so far (this session adds to them).
            self.record["started"] = previous.get("started", self.record["started"])
            self.record["sessions"] = previous.get("sessions", 1) + 1
            for key in ("trackers", "cost"):
                if previous.get(key) is not None:
                    self.record[key] = previous[key]
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
        self.storage.write_json(self.uri, without_credentials(self.record))  # tracker URIs and errors quote URLs too

    def complete(self, status: str, final: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Finish the record a previous session left unfinished (its driver lost after the last
        checkpoint): that session's record, with its status and final metrics, rewritten."""
        self.record = {**(self.earlier or self.record)}
        self.record.pop("error", None)
        self.finish(status, final=final, **extra)
        return self.record

    def finish(self, status: str, final: dict[str, Any] | None = None, error: str | None = None, **extra: Any) -> None:
        self.record.update(status=status, finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           final=final, **extra)
        if error is not None:
            self.record["error"] = error
        self.write()
