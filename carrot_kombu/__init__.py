"""carrot_kombu: a supervised, thread-safe AMQP connection layer for kombu and Celery."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the public names, for type checkers; at run time each module loads when first asked for
    from ._version import __version__
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

#: Where each public name lives.  The package imports none of its modules
#: itself (PEP 562): two threads importing two of its modules for the first
#: time at once would otherwise deadlock on Python's module locks (each holds
#: its module's lock while it waits for the package, whose import waits for
#: that module), which Python reports as an ImportError in one of them.
_HOMES = {
    **dict.fromkeys(("AsyncConnectionManager", "AsyncConsumer", "AsyncMessage"), "aio"),
    "Consumer": "consumers",
    **dict.fromkeys((
        "Blocked", "BrokerUnavailable", "CarrotKombuError", "ChannelLimitReached", "ConfigurationError",
        "ConsumerChannelRefused", "Disconnected", "Nacked", "OutcomeUnknown", "PoolTimeout", "PublishError",
        "PublishTimeout", "Rejected", "ReplyTimeout", "SetupFailed", "Unroutable",
    ), "exceptions"),
    "ConnectionManager": "manager",
    "Lease": "pool",
    "Backoff": "retry",
    **dict.fromkeys(("ConnectionState", "Status"), "status"),
    "__version__": "_version",
    **dict.fromkeys(("CallbackQueue", "ConnectionView"), "view"),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
