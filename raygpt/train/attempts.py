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
    saved on a notice before it went), ``node lost``, ``worker lost``, ``worker error``
    (``raygpt.cluster.worker_failure_kind``), ``resize`` (Ray Train restarted it at another
    size with no failure), ``interrupted``, ``failed``, or ``driver lost`` (its session's
    driver went without a word: found open by the next session).

    ``ended_at`` is when its last reported step ended (the workers' clock), not when Ray
    noticed (``noticed_at``): a node that froze a minute before its health check failed cost
    that minute, and ``seconds_to_next_step`` counts it.
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
                      report.get("attempt_started") or time.time())
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
        if report["step"] >= attempt["last_step"] and report.get("time") is not None:
            attempt["last_step_at"] = report["time"]
        attempt["last_step"] = max(attempt["last_step"], report["step"])
        if report.get("checkpoint_reason") == "preemption":
            attempt["notice"] = True

    def failed(self, kind: str, error: str) -> None:
        """A worker failed (``kind``: ``raygpt.cluster.worker_failure_kind``; ``error``: its message)."""
        attempt = self.current
        if attempt is not None:
            self._end(attempt, "preemption notice" if attempt.get("notice") else kind, time.time(), error=error[:300])

    def finish(self, status: str) -> None:
        attempt = self.current
        if attempt is not None:
            self._end(attempt, status, time.time())

    @staticmethod
    def _end(attempt: dict[str, Any], why: str, noticed: float, error: str | None = None) -> None:
        attempt.pop("open", None)
        attempt.update(ended=why, ended_at=attempt.get("last_step_at") or noticed, noticed_at=noticed)
        if error:
            attempt["error"] = error


def close_orphaned(attempts: list[dict[str, Any]], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attempts an earlier session left in ``run.json``, its open one ended as ``driver
    lost`` (its driver went without closing it) at the last step ``records`` (``metrics.jsonl``)
    hold after the step it resumed from."""
    attempts = [dict(a) for a in attempts]
    if attempts and attempts[-1].get("open"):
        attempt = attempts[-1]
        after = [r for r in records if r["step"] > attempt["resumed_from_step"]]
        if after:
            attempt["last_step"] = max(attempt["last_step"], after[-1]["step"])
            attempt["last_step_at"] = after[-1].get("time") or attempt.get("last_step_at")
        attempt.pop("open")
        attempt.update(ended="driver lost", ended_at=attempt.get("last_step_at"))
    return attempts


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
