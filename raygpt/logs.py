"""raygpt's messages go through ``logging``, under loggers named after their modules
("raygpt.train.resume", ...), so a user or Ray's log capture can filter them:
``logging.getLogger("raygpt").setLevel(logging.WARNING)`` in Python, ``RAYGPT_LOG_LEVEL=WARNING``
for the command line and the Ray workers.

``show_messages`` gives the "raygpt" logger one handler that writes the bare message to
stderr, as it is at the time of writing (pytest's capture, Ray's redirection to the worker
log). The CLI calls it, and so does every Ray task or worker that says something, since a
worker process starts with no handler of its own. Records still propagate to the root
logger, so an application that configures logging sees them there too."""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler whose stream is ``sys.stderr`` at each write, not at construction."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it
        pass


def show_messages() -> None:
    """Print raygpt's messages at INFO and above (``RAYGPT_LOG_LEVEL`` overrides) to stderr.
    Idempotent: a second call adds no second handler."""
    logger = logging.getLogger("raygpt")
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    level = os.environ.get("RAYGPT_LOG_LEVEL", "INFO").upper()
    logger.setLevel(level if level in logging.getLevelNamesMapping() else logging.INFO)
