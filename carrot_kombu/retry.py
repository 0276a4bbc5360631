"""The reconnect policy: :class:`Backoff`, a value shared by any number of managers."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import backoff as _backoff

from .exceptions import ConfigurationError

__all__ = ("Backoff",)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff between connection attempts, in seconds.

    Carrot's ``backoff: [min: 1000, max: 30000]`` (milliseconds) is
    ``Backoff(min=1.0, max=30.0)``.

    The nominal schedule is ``backoff.expo`` with ``factor=min`` capped at
    ``max``: ``min, 2*min, 4*min, ..., max, max, ...``.  With ``jitter`` each
    delay is drawn with ``backoff.full_jitter`` inside ``[min, nominal]``, so a
    herd of clients spreads out but nobody retries faster than ``min``.

    Args:
        min: First delay, > 0.
        max: Largest delay, >= ``min``.
        jitter: Randomise each delay within ``[min, nominal]``.
        max_tries: Give up after this many consecutive failed attempts
            (``None``: never, Carrot's behaviour).
        max_time: Give up once this many seconds have passed since the first
            failed attempt of a streak (``None``: never).

    Raises:
        ConfigurationError: If a value is out of range.
    """

    min: float = 1.0
    max: float = 30.0
    jitter: bool = True
    max_tries: Optional[int] = None
    max_time: Optional[float] = None

    def __post_init__(self) -> None:
        _check_seconds("Backoff.min", self.min, allow_zero=False)
        _check_seconds("Backoff.max", self.max, allow_zero=False)
        if self.max < self.min:
            raise ConfigurationError(
                f"Backoff.max must be >= Backoff.min (got min={self.min!r}, max={self.max!r})"
            )
        if not isinstance(self.jitter, bool):
            raise ConfigurationError(f"Backoff.jitter must be a bool, got {self.jitter!r}")
        if self.max_tries is not None and (
            isinstance(self.max_tries, bool)
            or not isinstance(self.max_tries, int)
            or self.max_tries < 1
        ):
            raise ConfigurationError(
                f"Backoff.max_tries must be None or an int >= 1, got {self.max_tries!r}"
            )
        if self.max_time is not None:
            _check_seconds("Backoff.max_time", self.max_time, allow_zero=False)

    @classmethod
    def coerce(cls, value: Union["Backoff", Mapping[str, Any], None]) -> "Backoff":
        """Build a policy from ``None`` (defaults), a ``Backoff`` or a mapping.

        Raises:
            ConfigurationError: For an unknown key or a bad value.
        """
        if value is None:
            return cls()
        if isinstance(value, Backoff):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"min", "max", "jitter", "max_tries", "max_time"}
            if unknown:
                raise ConfigurationError(f"backoff: unknown key(s) {sorted(unknown)}")
            return cls(**value)
        raise ConfigurationError(
            f"backoff must be a Backoff or a mapping, got {type(value).__name__}"
        )

    def delays(self) -> Iterator[float]:
        """Yield the delay before each retry; stop when the policy gives up.

        A fresh iterator starts a fresh schedule (the manager takes one per
        failure streak, so the schedule restarts after a successful
        connection).  ``max_tries`` bounds the number of delays to
        ``max_tries - 1`` (one per retry); ``max_time`` is measured from the
        first ``next()`` and truncates the last delay, as the ``backoff``
        library's own decorators do.
        """
        return self._delays(time.monotonic)

    def _delays(self, clock: Callable[[], float]) -> Iterator[float]:
        nominal = _backoff.expo(base=2, factor=self.min, max_value=self.max)
        next(nominal)  # backoff's wait generators must be primed
        start = clock()
        retries = 0
        while self.max_tries is None or retries < self.max_tries - 1:
            delay = float(next(nominal))
            if self.jitter:
                delay = self.min + _backoff.full_jitter(delay - self.min)
            if self.max_time is not None:
                remaining = self.max_time - (clock() - start)
                if remaining <= 0:
                    return
                delay = min(delay, remaining)
            retries += 1
            yield delay

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view of the policy."""
        return {
            "min": self.min,
            "max": self.max,
            "jitter": self.jitter,
            "max_tries": self.max_tries,
            "max_time": self.max_time,
        }


def _check_seconds(name: str, value: object, *, allow_zero: bool) -> None:
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value >= 0 if allow_zero else value > 0)
    )
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
