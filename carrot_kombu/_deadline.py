"""A caller's time limit as a value: :class:`Deadline` (no imports from the package but ``_timeouts``).

A public call turns its ``timeout`` argument into a ``Deadline`` once
(:meth:`Deadline.of`, which also validates it) and passes that value down;
nothing below converts seconds to a point in time again.  The clock is
``time.monotonic``, read through :data:`clock` so that a test may replace it.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from ._timeouts import check_timeout

__all__ = ("Deadline", "NEVER", "clock", "check_timeout")

#: The clock every deadline is on (``time.monotonic``).
clock: Callable[[], float] = time.monotonic

_MAX = threading.TIMEOUT_MAX


class Deadline:
    """When a wait must end (``at``, on :data:`clock`; None: never) and the timeout it came from.

    A value: never changed after it is made (a plain slotted class, not a
    frozen dataclass: one is made on every lease and publish).
    """

    __slots__ = ("at", "timeout")

    def __init__(self, at: Optional[float] = None, timeout: Optional[float] = None) -> None:
        self.at = at
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Deadline(at={self.at!r}, timeout={self.timeout!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Deadline) and (self.at, self.timeout) == (other.at, other.timeout)

    def __hash__(self) -> int:
        return hash((self.at, self.timeout))

    @classmethod
    def after(cls, timeout: Optional[float]) -> "Deadline":
        """``timeout`` seconds from now (None: never); ``timeout`` must already be valid."""
        return NEVER if timeout is None else cls(clock() + timeout, timeout)

    @classmethod
    def of(cls, name: str, timeout: object) -> "Deadline":
        """A caller's ``timeout`` argument, checked (the error names ``name``).

        Raises:
            TypeError, ValueError: Not a number of seconds >= 0 (or None).
        """
        kind = type(timeout)
        if (kind is float or kind is int) and 0 <= timeout <= _MAX:  # type: ignore[operator]
            return cls(clock() + timeout, timeout)  # type: ignore[operator,arg-type]  # the common case
        return cls.after(check_timeout(name, timeout))

    def remaining(self) -> Optional[float]:
        """Seconds left (never negative); None without a limit."""
        return None if self.at is None else max(0.0, self.at - clock())

    def expired(self) -> bool:
        return self.at is not None and clock() >= self.at

    def within(self, most: Optional[float]) -> Optional[float]:
        """Seconds to wait now: what is left, but at most ``most`` (either may be None: no limit)."""
        left = self.remaining()
        if most is None:
            return left
        return most if left is None else min(left, most)


NEVER = Deadline()
