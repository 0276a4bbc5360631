"""carrot_kombu: a supervised, thread-safe AMQP connection layer for kombu and Celery."""

from __future__ import annotations

import logging

from .aio import AsyncConnectionManager, AsyncConsumer, AsyncMessage
from .consumers import Consumer
from .exceptions import (
    Blocked,
    BrokerUnavailable,
    CarrotKombuError,
    ChannelLimitReached,
    ConfigurationError,
    ConsumerChannelRefused,
    Disconnected,
    Nacked,
    OutcomeUnknown,
    PoolTimeout,
    PublishError,
    PublishTimeout,
    Rejected,
    ReplyTimeout,
    SetupFailed,
    Unroutable,
)
from .manager import ConnectionManager
from .pool import Lease
from .retry import Backoff
from .status import ConnectionState, Status
from ._version import __version__
from .view import CallbackQueue, ConnectionView

__all__ = (
    "AsyncConnectionManager",
    "AsyncConsumer",
    "AsyncMessage",
    "Backoff",
    "Blocked",
    "BrokerUnavailable",
    "CallbackQueue",
    "CarrotKombuError",
    "ChannelLimitReached",
    "ConfigurationError",
    "ConnectionManager",
    "ConnectionState",
    "ConnectionView",
    "Consumer",
    "ConsumerChannelRefused",
    "Disconnected",
    "Lease",
    "Nacked",
    "OutcomeUnknown",
    "PoolTimeout",
    "PublishError",
    "PublishTimeout",
    "Rejected",
    "ReplyTimeout",
    "SetupFailed",
    "Status",
    "Unroutable",
    "__version__",
)

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _register_transport_alias() -> None:
    """``carrot+amqp://`` URLs in kombu and Celery (kombu's transport alias ``carrot``)."""
    from kombu.transport import TRANSPORT_ALIASES

    for alias in ("carrot", "carrot+amqp", "carrot+amqps"):
        # kombu's failover re-parses "carrot+amqp://..." alternates by their whole scheme.
        TRANSPORT_ALIASES.setdefault(alias, "carrot_kombu.transport:Transport")
    # ... and parse such URLs into the connection's fields, as kombu does for pyamqp://.
    from .urls import adopt_kombu_urls

    adopt_kombu_urls()


_register_transport_alias()
