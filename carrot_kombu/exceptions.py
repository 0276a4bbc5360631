"""Every exception carrot_kombu raises, in one place.

All of them derive from :class:`CarrotKombuError`.  Some also derive from the
exception a kombu or Celery user already catches, so adopting carrot_kombu does
not break existing ``except`` clauses:

* :class:`Disconnected`, :class:`Blocked` and :class:`ReplyTimeout` are
  :class:`kombu.exceptions.OperationalError` (kombu's connection error, so
  kombu's and Celery's retry logic handles them);
* :class:`ReplyTimeout` and :class:`PublishTimeout` are also ``TimeoutError``;
* :class:`ConfigurationError` and :class:`ConsumerChannelRefused` are ``ValueError``.

Every error keeps what caused it (``raise ... from``, and the picklable
:attr:`CarrotKombuError.reason`) and never contains a password: messages are
built from masked URLs only.
"""

from __future__ import annotations

import pickle
from typing import Any, Optional

from kombu.exceptions import OperationalError

__all__ = (
    "Blocked",
    "BrokerUnavailable",
    "CarrotKombuError",
    "ChannelLimitReached",
    "ConfigurationError",
    "ConsumerChannelRefused",
    "Disconnected",
    "Nacked",
    "OutcomeUnknown",
    "PoolTimeout",
    "PublishError",
    "PublishTimeout",
    "Rejected",
    "ReplyTimeout",
    "SetupFailed",
    "Unroutable",
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


# -- connection ----------------------------------------------------------------------


class Disconnected(CarrotKombuError, OperationalError):  # type: ignore[misc]
    """The manager has no usable connection right now.

    Raised at once by :meth:`~carrot_kombu.ConnectionManager.open_channel`
    (and by ``publish`` when waiting cannot help) while the manager is
    connecting, waiting for its next attempt, failed or stopped, and by any
    use of a lease whose connection was lost.  :attr:`reason` (and
    ``__cause__``) is the last connection error, or a
    :class:`CarrotKombuError` saying why there is none yet; it is never
    ``None``.
    """

    def __init__(self, message: str, reason: Optional[BaseException] = None) -> None:
        super().__init__(message, reason if reason is not None else CarrotKombuError(message))


class Blocked(CarrotKombuError, OperationalError):  # type: ignore[misc]
    """The broker blocked the connection (resource alarm) for longer than ``blocked_timeout``.

    Raised by a publish that waited ``blocked_timeout`` seconds for the broker
    to unblock the connection; the message was not sent.  If a write was
    already stuck half-way when the broker blocked, the connection is dropped
    and the writer gets :class:`Disconnected` whose ``reason`` is this error.
    """


class ReplyTimeout(CarrotKombuError, OperationalError, TimeoutError):  # type: ignore[misc]
    """The broker did not answer a request within ``reply_timeout``.

    The channel the request was made on is discarded (its reply may still
    come); the connection is kept: a dead peer is the heartbeat's to detect.
    """


class BrokerUnavailable(CarrotKombuError, ConnectionError):
    """The kombu transport could not hand out a connection: the manager is not connected.

    An ``OSError`` like py-amqp's "connection refused", so that kombu's and
    Celery's retry policies count it exactly as they count plain py-amqp's.
    ``reason`` is the manager's :class:`Disconnected`.
    """


class SetupFailed(CarrotKombuError):
    """Declaring the topology or a setup function failed on a new connection."""


class ConfigurationError(CarrotKombuError, ValueError):
    """An option or URL is invalid; the message names the option."""


# -- channels -----------------------------------------------------------------------------


class PoolTimeout(CarrotKombuError):
    """No channel could be leased within the timeout.

    Either every slot of the bounded pool stayed in use (leased, or held by
    a channel being opened or verified), or the broker's ``channel_max`` was
    reached; the message says which (with the count of each), and whether
    the connection looked dead meanwhile.
    """


class ChannelLimitReached(CarrotKombuError):
    """The connection has no free channel id (the negotiated ``channel_max``).

    Raised while connected: the connection is fine, but every channel the
    broker allows is in use (leases, the publisher, consumers).
    """


class ConsumerChannelRefused(CarrotKombuError, ValueError):
    """A request on a ``consume()`` delivery's ``message.channel`` that would reach its neighbours.

    Up to ``CONSUMERS_PER_CHANNEL`` consumers share one channel: a
    ``consume()`` callback's ``message.channel`` settles only that consumer's
    own deliveries (and ``close()`` cancels only that consumer).  Requests
    that would change the channel for the others (``basic_qos``,
    ``basic_consume``, ``basic_get``, ``basic_recover``, a ``basic_cancel``
    of another consumer's tag, transactions, ``ack(multiple=True)``) or
    settle a delivery that is not the consumer's own are refused with this
    error, naming the call; nothing is sent.  A ``ValueError``, as
    ``ack(multiple=True)`` raised before.
    """


# -- confirmed publishing -------------------------------------------------------------------


class PublishError(CarrotKombuError):
    """A ``manager.publish`` did not end with the broker's confirm."""


class OutcomeUnknown(PublishError, Disconnected):
    """A ``republish=False`` message was written, then its connection (or channel) was lost before its confirm.

    The broker may or may not have stored it; it is *not* published again
    (at most once, as asked).  Publish it again yourself only if a duplicate
    is acceptable.  Also a :class:`Disconnected` (the cause was a loss), so
    ``except Disconnected`` handlers see it; :attr:`outcome` is always
    ``"unknown"``, as on a :class:`PublishTimeout` of a written message.
    """

    outcome = "unknown"


class Nacked(PublishError):
    """The broker refused the message (``basic.nack``): it was not stored."""


class Unroutable(PublishError):
    """A ``mandatory`` message matched no queue; the broker returned it."""


class Rejected(PublishError):
    """The broker closed the confirm channel because of this message.

    Typically 404 (the exchange does not exist), 403 (no write permission)
    or 406 (the message exceeds the broker's maximum size).  The message was
    not stored.  ``reply_code`` and ``reply_text`` are the broker's.
    """

    def __init__(
        self, message: str, reason: Optional[BaseException] = None, reply_code: int = 0, reply_text: str = ""
    ) -> None:
        super().__init__(message, reason)
        self.reply_code = reply_code
        self.reply_text = reply_text

    def __reduce__(self) -> Any:
        return (type(self), (self.message, _picklable(self.reason), self.reply_code, self.reply_text))


class PublishTimeout(PublishError, TimeoutError):
    """No confirm within the timeout.

    ``outcome`` tells what is known: ``"unknown"`` when the message was
    written and may have been stored (publish it again only if duplicates are
    acceptable), ``"not_sent"`` when it never left this process.
    """

    def __init__(self, message: str, reason: Optional[BaseException] = None, outcome: str = "unknown") -> None:
        super().__init__(message, reason)
        self.outcome = outcome

    def __reduce__(self) -> Any:
        return (type(self), (self.message, _picklable(self.reason), self.outcome))


def _picklable(exc: Optional[BaseException]) -> Optional[BaseException]:
    """Return ``exc`` if it pickles, else a plain stand-in with its text.

    A reason that cannot be pickled (a socket error holding a live object, a
    third-party class with a strict ``__init__``) must not make our own error
    unpicklable.
    """
    if exc is None:
        return None
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return CarrotKombuError(f"{type(exc).__name__}: {exc}")
    return exc
