"""Exceptions raised by carrot_kombu.

All of them derive from :class:`CarrotKombuError`.  Some also derive from the
exception a kombu or Celery user already catches, so adopting carrot_kombu does
not break existing ``except`` clauses:

* :class:`Disconnected` and :class:`Blocked` are
  :class:`kombu.exceptions.OperationalError`.
* :class:`ConfigurationError` is a :class:`ValueError`.

Every error keeps what caused it (``raise ... from``, and the picklable
:attr:`CarrotKombuError.reason`) and never contains a password: messages are
built from masked URLs only.
"""

from __future__ import annotations

from typing import Any, Optional

from kombu.exceptions import OperationalError

__all__ = (
    "Blocked",
    "CarrotKombuError",
    "ConfigurationError",
    "Disconnected",
    "PoolTimeout",
)


class CarrotKombuError(Exception):
    """Root of every error raised by carrot_kombu.

    Args:
        message: Human readable description, free of secrets.
        reason: The underlying exception, if any.  Unlike ``__cause__`` it
            survives pickling (for instance into a Celery result backend).
    """

    def __init__(self, message: str, reason: Optional[BaseException] = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        if reason is not None and self.__cause__ is None:
            self.__cause__ = reason

    def __reduce__(self) -> Any:
        return (type(self), (self.message, _picklable(self.reason)))

    def __str__(self) -> str:
        return self.message


class Disconnected(CarrotKombuError, OperationalError):  # type: ignore[misc]
    """The manager has no usable connection right now.

    Raised at once by :meth:`~carrot_kombu.ConnectionManager.open_channel`
    while the manager is connecting, waiting for its next attempt, failed or
    stopped, and by any use of a lease whose connection was lost.
    :attr:`reason` (and ``__cause__``) is the last connection error.
    """


class Blocked(CarrotKombuError, OperationalError):  # type: ignore[misc]
    """The broker blocked the connection (resource alarm) for longer than ``blocked_timeout``.

    Raised by a publish that waited ``blocked_timeout`` seconds for the broker
    to unblock the connection; the message was not sent.  If a write was
    already stuck half-way when the broker blocked, the connection is dropped
    and the writer gets :class:`Disconnected` whose ``reason`` is this error.
    """


class PoolTimeout(CarrotKombuError):
    """Every channel of the bounded pool stayed leased for the whole timeout."""


class ConfigurationError(CarrotKombuError, ValueError):
    """An option or URL is invalid; the message names the option."""


def _picklable(exc: Optional[BaseException]) -> Optional[BaseException]:
    """Return ``exc`` if it pickles, else a plain stand-in with its text.

    A reason that cannot be pickled (a socket error holding a live object, a
    third-party class with a strict ``__init__``) must not make our own error
    unpicklable.
    """
    import pickle

    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return CarrotKombuError(f"{type(exc).__name__}: {exc}")
    return exc
