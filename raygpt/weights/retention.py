"""Which of a run's checkpoint folders stay: ``checkpoint.keep`` counted over intact checkpoints only.

Ray Train's own retention counts every checkpoint it registered, a damaged one included, and
knows nothing of folders it never registered (a save cut off when its driver was killed), so
raygpt keeps the folders itself (Ray Train's ``num_to_keep`` is off):

- After each checkpoint a session saves (``after_save``), among the run's folders up to that
  one: the newest ``keep`` intact checkpoints stay, and so does the one the session resumed
  from (the only one whose every byte it read back and hashed). Intact here means complete
  (every recorded file there at its size, the trainer state matching its own digest) and not
  found damaged by the resume's hashing; older ones are not hashed again at every save.
  Everything else goes: older intact checkpoints, damaged ones (no resume takes them), and
  partial folders (a save that never finished).
- When a run resumes (``remove_partial``), partial folders go at once.

A partial folder may still have a writer: a killed driver's workers go on for a few seconds
(~3.5 s seen) and keep uploading into the run. A folder goes only once none of its files
changed for ``QUIET_S`` (60 s, far beyond that); one written more recently stays for a later
pass. Folders newer than the checkpoint just saved stay too: this session may be writing them.
The store's clock and this host's must agree to well within ``QUIET_S``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from raygpt.storage import Storage, join
from raygpt.weights.integrity import Problem, stored_checkpoint_problem
from raygpt.weights.layout import checkpoint_names, checkpoint_order

BEYOND_KEEP = "beyond checkpoint.keep"
"""How the reason for routine pruning begins (an intact checkpoint with ``keep`` newer ones)."""
QUIET_S = 60.0
"""Seconds without a change after which no writer owns a partial folder."""


@dataclass
class Retention:
    """The retention of one run's checkpoints during one session."""

    run_uri: str
    storage: Storage
    keep: int
    resumed_from: str | None = None
    """The folder this session resumed from: never deleted by it."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Folders the resume found damaged by their digests, and what is wrong with each."""
    _intact: set[str] = field(default_factory=set, init=False, repr=False)  # complete: checked once

    def remove_partial(self, now: float | None = None) -> list[tuple[str, str]]:
        """Delete the partial folders no writer owns; returns (name, problem) of each."""
        now = time.time() if now is None else now
        removed = []
        for name in checkpoint_names(self.run_uri, self.storage):
            problem = self._problem(name)
            if problem is not None and problem.partial and self._quiet(name, now):
                removed.append(self._delete(name, problem))
        return removed

    def after_save(self, newest: str, now: float | None = None) -> list[tuple[str, str]]:
        """Apply ``keep`` once the checkpoint ``newest`` is saved; returns (name, why) of each
        folder deleted."""
        now = time.time() if now is None else now
        self._intact.add(newest)
        kept, removed = 0, []
        for name in checkpoint_names(self.run_uri, self.storage):
            if checkpoint_order(name) > checkpoint_order(newest):
                continue
            problem = self._problem(name)
            if problem is None:
                kept += 1
                if kept <= self.keep or name == self.resumed_from:
                    continue
                problem = Problem(f"{BEYOND_KEEP}: {self.keep} newer intact checkpoint(s)")
            if problem.partial and not self._quiet(name, now):
                continue
            removed.append(self._delete(name, problem))
        return removed

    def _problem(self, name: str) -> Problem | None:
        if name in self._intact or name == self.resumed_from:
            return None
        if name in self.damaged:
            return Problem(self.damaged[name])
        problem = stored_checkpoint_problem(join(self.run_uri, name), self.storage, hashes=False)
        if problem is None:
            self._intact.add(name)
        return problem

    def _quiet(self, name: str, now: float) -> bool:
        changed = self.storage.last_modified(join(self.run_uri, name))
        return changed is None or now - changed >= QUIET_S

    def _delete(self, name: str, why: str) -> tuple[str, str]:
        self.storage.delete(join(self.run_uri, name))
        return name, why
