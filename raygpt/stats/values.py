"""Numbers as the JSON summaries hold them: an undefined result is ``None``, never nan or a made-up value."""

from __future__ import annotations

import math


def finite(value) -> float | None:
    """A float for JSON, ``None`` where the value is undefined (nan, inf or None)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def interval(low, high) -> list[float | None]:
    """``[low, high]`` for JSON, each ``None`` where undefined."""
    return [finite(low), finite(high)]


def rounded(value: float | None, digits: int = 4) -> float | None:
    """``value`` as a JSON-ready float rounded to ``digits``; None for None, nan and inf (no score, no mean)."""
    value = finite(value)
    return None if value is None else round(value, digits)
