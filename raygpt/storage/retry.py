"""How the storage seam rides out a store outage: a transient error (the endpoint does not
answer, is overloaded, or fails inside) is retried with exponential backoff until a budget
of time is spent; a permanent one (access denied, no such bucket, not found) fails at once.

An outage that outlasts the budget ends in one ``StoreUnavailableError`` that says for how
long the store was tried. Its message leaves out pyarrow's ``AWS Error ...`` tokens on
purpose: Ray Train retries an upload whose error carries them, which would spend the whole
budget again, three times over.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

# Matched against the lowered text of an OSError. Permanent wins: pyarrow's text for a 403
# can also mention the (successful) connection, and a host name that does not resolve comes
# as a NETWORK_CONNECTION error, though it is a wrong endpoint (or no network), not an outage.
PERMANENT = ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "forbidden",
             "nosuchbucket", "bucket does not exist", "nosuchkey", "path does not exist", "not found",
             "no such file", "credentials", "invalid argument", "resolve host")
TRANSIENT = ("network_connection", "couldn't connect", "could not connect", "connection refused",
             "connection reset", "connection was reset", "broken pipe", "timed out", "timeout",
             "service_unavailable", "slow_down", "internal_failure", "503", "502", "504",
             "empty reply", "recv failure", "send failure", "curl error")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an error a working store stops giving once it is back."""
    if isinstance(exc, StoreUnavailableError):
        return False  # the budget is spent already: an outer retry would spend it again
    if not isinstance(exc, OSError) or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError,
                                                        NotADirectoryError, FileExistsError)):
        return False
    text = str(exc).lower()
    return not any(s in text for s in PERMANENT) and any(s in text for s in TRANSIENT)


class StoreUnavailableError(OSError):
    """The store did not answer within the retry budget: ``waited_s`` seconds, ``attempts`` tries."""

    def __init__(self, what: str, waited_s: float, attempts: int, budget_s: float, cause: str):
        self.what, self.waited_s, self.attempts, self.budget_s, self.cause = what, waited_s, attempts, budget_s, cause
        super().__init__(f"{what}: {self.reason()}")

    def reason(self) -> str:
        return (f"the S3 endpoint did not answer for {_duration(self.waited_s)} ({self.attempts} attempts, "
                f"storage.retry_minutes: {self.budget_s / 60:g}): {self.cause}")

    def __reduce__(self):  # raised in Ray workers, pickled to the driver
        return type(self), (self.what, self.waited_s, self.attempts, self.budget_s, self.cause)


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient errors for ``budget_s`` seconds, waiting ``first_delay_s`` after the
    first failure and twice as long after each one after it, at most ``max_delay_s``."""

    budget_s: float = 0.0
    first_delay_s: float = 0.5
    max_delay_s: float = 15.0

    def call(self, action: Callable[[], T], what: str, sleep: Callable[[float], None] = time.sleep,
             clock: Callable[[], float] = time.monotonic) -> T:
        """``action()``, retried as the policy says; ``what`` names it in messages ("write s3://b/k")."""
        started = clock()
        delay, failures = self.first_delay_s, 0
        while True:
            try:
                return action()
            except OSError as e:
                if not is_transient(e):
                    raise
                failures += 1
                waited = clock() - started
                if waited + delay > self.budget_s:
                    if self.budget_s <= 0:
                        raise
                    raise StoreUnavailableError(what, waited, failures, self.budget_s, _short_cause(e)) from None
                if failures == 1:
                    log.warning("raygpt: storage: %s: %s; retrying for up to %s", what, _short_cause(e),
                                _duration(self.budget_s))
                sleep(delay)
                delay = min(2 * delay, self.max_delay_s)


def _short_cause(exc: BaseException) -> str:
    """The part of pyarrow's message that says what went wrong, without ``AWS Error`` tokens."""
    text = str(exc)
    lowered = text.lower()
    for phrase in ("could not connect to server", "couldn't connect to server", "connection refused",
                   "connection reset", "timed out", "service unavailable", "slow down", "internal failure"):
        if phrase in lowered:
            return phrase
    return text.splitlines()[0].replace("AWS Error", "error")[:200] if text else type(exc).__name__


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
