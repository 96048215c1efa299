"""The one exception type that reaches users as a message instead of a traceback."""


class RaygptError(Exception):
    """A problem the user can fix: bad input, missing credentials, an unreachable store.

    The CLI prints ``str(error)`` on one line and exits with status 2. The message
    names the thing at fault (file, key, URI, tensor) and, where it helps, what to do.
    """


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
