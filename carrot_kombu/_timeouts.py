"""One rule for every ``timeout`` a caller passes (no imports from the package: the fenced layer uses it too)."""

from __future__ import annotations

import math
import threading
from typing import Optional

__all__ = ("check_timeout",)


_MAX = threading.TIMEOUT_MAX


def check_timeout(name: str, value: object) -> Optional[float]:
    """A caller's ``timeout``-like argument as seconds; ``None`` (or infinity) waits without limit.

    Raises:
        TypeError: Not a number (a ``str``, a ``bool``...).
        ValueError: NaN or negative.
    """
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value <= _MAX:  # type: ignore[operator]
        return value  # type: ignore[return-value]  # the common case, first: this runs on every lease
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:  # an int beyond any float
        seconds = math.inf if value > 0 else -math.inf
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"{name} must be >= 0 seconds or None, got {value!r}"[:200])
    # Longer than any wait the platform can express (about 292 years): no limit.
    return None if seconds > threading.TIMEOUT_MAX else seconds
