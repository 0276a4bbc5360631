"""The reconnect policy: :class:`Backoff`, a value shared by any number of managers."""

from __future__ import annotations

import errno
import math
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import backoff as _backoff
from amqp.exceptions import AccessRefused, AMQPError, InternalError, NotAllowed, NotFound, ResourceLocked

from .exceptions import CarrotKombuError, ConfigurationError, ReplyTimeout, SetupFailed

__all__ = ("Backoff", "failed_before_tcp", "is_fatal", "is_starting", "is_unavailable")


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

    def nominal(self, attempt: int) -> float:
        """The schedule's delay after ``attempt`` earlier retries, without jitter: ``min * 2**attempt``, capped."""
        if attempt >= 64:
            return self.max
        return min(self.min * 2.0 ** max(0, attempt), self.max)

    def soon(self, attempt: int) -> float:
        """A short schedule for what the broker cannot serve *right now*: at most 0.5 s, doubling, capped at 1 s."""
        return Backoff(min=min(self.min, 0.5), max=max(min(self.min, 0.5), 1.0), jitter=False).nominal(attempt)

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


# -- classification: what a failure means for the next attempt -------------------------------

#: Refusals a retry will not fix by itself (someone must change the broker or
#: the configuration): retried only every ``Backoff.max`` seconds.
FATAL_ERRORS = (AccessRefused, NotAllowed, ssl.SSLCertVerificationError)

#: Reading a local file failed (``ssl`` options naming a missing certificate):
#: OSErrors, but no network condition, so waiting will not fix them.
_LOCAL_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

#: The errno values of a TCP connect that found nobody listening.
_UNREACHABLE = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.EADDRNOTAVAIL}

#: How RabbitMQ says a queue exists but cannot be reached right now (its
#: home node is down or restarting), as opposed to "no queue 'x'".
_UNAVAILABLE = ("down", "not available", "unavailable", "stopped", "inaccessible", "home node", "not running")


def is_fatal(exc: BaseException) -> bool:
    """A connection attempt refused for a reason retrying will not fix.

    Besides the broker's refusals, anything that is neither a network error
    nor an AMQP error (a ``ValueError`` from an ssl option, say) is a
    configuration problem: retried slowly, never in a tight loop.
    """
    if isinstance(exc, SetupFailed):
        # A broker answer or a lost connection may pass; a bug in a setup
        # function will not: retry that one slowly.
        return not isinstance(exc.reason, (OSError, AMQPError, CarrotKombuError))
    if isinstance(exc, _LOCAL_FILE_ERRORS):
        return True  # a certificate or key file that is not there or not readable: our side's setup
    return isinstance(exc, FATAL_ERRORS) or not isinstance(exc, (OSError, AMQPError, CarrotKombuError))


def failed_before_tcp(exc: Optional[BaseException]) -> bool:
    """The attempt never got a TCP connection (refused, unreachable, unknown host).

    Only then can a TCP probe tell that a retry may work now: when TCP was
    accepted and the handshake, TLS or setup failed after it, a port that
    accepts says nothing, and probing would turn the backoff into a retry
    every probe interval.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, socket.gaierror):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno in _UNREACHABLE:
            return True
        # ``reason`` is ours (CarrotKombuError) or a string (ssl.SSLError's, UnicodeError's).
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else exc.__cause__
        seen += 1
    return False


def is_starting(exc: Optional[BaseException]) -> bool:
    """The broker answered a connection attempt with 541 INTERNAL_ERROR: a node not ready yet.

    A RabbitMQ node that has just (re)started accepts connections before its
    virtual hosts run, and closes them with ``541 INTERNAL_ERROR - access to
    vhost '/' refused ...: vhost '/' is down``, at ``connection.open`` or at
    the first ``channel.open``.  Like a refused TCP connection, that node
    will serve again soon: another node is tried at once, and a backoff wait
    may end as soon as a TCP probe finds a node up.
    """
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, InternalError):
            return True
        reason = getattr(exc, "reason", None)
        exc = reason if isinstance(reason, BaseException) else exc.__cause__
        seen += 1
    return False


def is_unavailable(exc: BaseException) -> bool:
    """The broker cannot serve an entity right now (vs. refuses it for good)."""
    if isinstance(exc, (ReplyTimeout, ResourceLocked)):
        return True
    if isinstance(exc, NotFound):
        text = str(exc).lower()
        return any(word in text for word in _UNAVAILABLE)
    return False
