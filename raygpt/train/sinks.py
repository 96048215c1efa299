"""Where the run's metrics stream goes: each sink is one backend of ``MetricsStream``.

A sink gets every new report (``write``), the whole record list when the stream flushes (at
each checkpoint and at the end), and events that are not a step's metrics. ``replays``: whether
it wants steps trained again after a restart (a live view does; a sink that keeps history,
such as a tracker, has them already). Adding a backend is one class here.
"""

from __future__ import annotations

import json
import time
from typing import Any

from raygpt.stages import METRICS_FILE
from raygpt.storage import Storage, join

# metrics.jsonl is rewritten whole (object stores cannot append), so not on every report.
METRICS_WRITE_INTERVAL_S = 30.0


class MetricsSink:
    """A backend of the metrics stream; every method may be left as it is."""

    replays = False

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """``report`` as a worker sent it; ``records``, the run so far (the last one holds it)."""

    def event(self, event: dict[str, Any]) -> None:
        """A worker failure, a fatal setup error: something that is not a step's metrics."""

    def flush(self, records: list[dict[str, Any]]) -> None:
        """Make what was written durable; ``records`` is the whole run so far."""

    def close(self) -> None:
        """The run (or this session of it) ended."""


class MetricsFile(MetricsSink):
    """``<run>/metrics.jsonl``: one JSON record per reported step, the run as one uninterrupted
    sequence (a resumed attempt's records replace those after its checkpoint)."""

    replays = True

    def __init__(self, run_uri: str, storage: Storage):
        self.uri, self.storage = join(run_uri, METRICS_FILE), storage
        self._last_write = time.monotonic()

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        if time.monotonic() - self._last_write > METRICS_WRITE_INTERVAL_S:
            self.flush(records)

    def flush(self, records: list[dict[str, Any]]) -> None:
        self.storage.write_text(self.uri, "".join(json.dumps(r) + "\n" for r in records))
        self._last_write = time.monotonic()


class QueueSink(MetricsSink):
    """Forwards reports and events to a queue (the driver's progress view reads it)."""

    replays = True

    def __init__(self, queue):
        self.queue = queue

    def write(self, report: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.queue.put(report)

    def event(self, event: dict[str, Any]) -> None:
        self.queue.put(event)
