"""The attempts of a run: each set of workers Ray Train started, what it trained, why it ended.

Pure Python (no torch, no Ray), so ``raygpt report`` reads the segments without either.
"""

from __future__ import annotations

import time
from typing import Any


class AttemptLog:
    """Every attempt of a run: the workers Ray Train started (again), the steps they trained,
    why they ended, what the next attempt trained again, and how long the loss cost.

    An attempt begins with a report that carries ``resumed_from_step`` (the first of a set of
    workers) and ends when the next one begins, when a worker fails, or when the run ends.
    ``ended``: ``finished``, ``stopped`` (the session's last step), ``preemption notice`` (it
    saved on a notice before it went), ``node lost``, ``worker lost``, ``worker error``, or
    ``resize`` (Ray Train restarted it at another size with no failure).
    """

    def __init__(self, previous: list[dict[str, Any]] | None = None):
        self.attempts: list[dict[str, Any]] = [dict(a) for a in previous or []]

    @property
    def current(self) -> dict[str, Any] | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].get("open") else None

    def begin(self, report: dict[str, Any]) -> dict[str, Any]:
        previous = self.current
        if previous is not None:
            self._end(previous, "preemption notice" if previous.get("notice") else "resize",
                      report.get("attempt_started", time.time()))
        attempt = {"attempt": len(self.attempts) + 1, "world_size": report.get("world_size"), "nodes": report.get("nodes"),
                   "resumed_from_step": report["resumed_from_step"], "first_step": report["resumed_from_step"] + 1,
                   "last_step": report["resumed_from_step"], "started": report.get("attempt_started"),
                   "first_step_at": report.get("first_step_at"), "open": True}
        if self.attempts:
            before = self.attempts[-1]
            before["recomputed_after"] = max(0, before["last_step"] - attempt["resumed_from_step"])
            if before.get("ended_at") and attempt["first_step_at"]:
                before["seconds_to_next_step"] = round(attempt["first_step_at"] - before["ended_at"], 3)
        self.attempts.append(attempt)
        return attempt

    def report(self, report: dict[str, Any]) -> None:
        attempt = self.current
        if attempt is None:
            return
        attempt["last_step"] = max(attempt["last_step"], report["step"])
        if report.get("checkpoint_reason") == "preemption":
            attempt["notice"] = True

    def failed(self, error: BaseException | str) -> None:
        attempt = self.current
        if attempt is not None:
            self._end(attempt, "preemption notice" if attempt.get("notice") else failure_kind(error), time.time(),
                      error=str(error).strip().splitlines()[-1][:300] if str(error).strip() else type(error).__name__)

    def finish(self, status: str) -> None:
        attempt = self.current
        if attempt is not None:
            self._end(attempt, status, time.time())

    @staticmethod
    def _end(attempt: dict[str, Any], why: str, when: float, error: str | None = None) -> None:
        attempt.pop("open", None)
        attempt.update(ended=why, ended_at=when)
        if error:
            attempt["error"] = error


def failure_kind(error: BaseException | str) -> str:
    """``node lost``, ``worker lost`` (its process died) or ``worker error`` (an exception)."""
    text = str(error).lower()
    names = {cls.__name__ for cls in type(error).__mro__} if isinstance(error, BaseException) else set()
    if "node" in text and ("died" in text or "dead" in text or "removed" in text):
        return "node lost"
    if names & {"RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError"}:
        return "worker lost"
    return "worker error"


def attempt_segments(attempts: list[dict[str, Any]]) -> list[tuple[int, int, int]]:
    """(first step, last step, workers) of the trajectory as it stands: each attempt counts up
    to where the next one resumed; neighbours on the same number of workers merge."""
    segments: list[tuple[int, int, int]] = []
    for i, a in enumerate(attempts):
        last = attempts[i + 1]["resumed_from_step"] if i + 1 < len(attempts) else a["last_step"]
        first = a["resumed_from_step"] + 1
        if last < first:
            continue
        if segments and segments[-1][2] == a["world_size"] and segments[-1][1] + 1 == first:
            segments[-1] = (segments[-1][0], last, a["world_size"])
        else:
            segments.append((first, last, a["world_size"]))
    return segments


def describe_attempts(attempts: list[dict[str, Any]]) -> str:
    """'steps 1-412 on 8 workers, 413-980 on 6; 37 steps recomputed, 95 s lost' (or '')."""
    segments = attempt_segments(attempts)
    if not segments:
        return ""
    parts = [f"{first}-{last} on {n} worker{'s' if n != 1 else ''}" for first, last, n in segments]
    recomputed = sum(a.get("recomputed_after", 0) for a in attempts)
    lost = sum(a.get("seconds_to_next_step", 0.0) for a in attempts)
    text = "steps " + ", ".join(parts)
    if len(attempts) > 1:
        text += f"; {len(attempts) - 1} restart(s), {recomputed} step(s) recomputed, {lost:.0f} s from losses to next steps"
    return text
