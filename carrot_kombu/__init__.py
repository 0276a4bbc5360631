"""carrot_kombu: a supervised, thread-safe AMQP connection layer for kombu and Celery."""

from __future__ import annotations

import logging

from .consumers import Consumer
from .exceptions import (
    Blocked,
    CarrotKombuError,
    ChannelLimitReached,
    ConfigurationError,
    Disconnected,
    Nacked,
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

__version__ = "0.2.0"

__all__ = (
    "Backoff",
    "Blocked",
    "CarrotKombuError",
    "ChannelLimitReached",
    "ConfigurationError",
    "ConnectionManager",
    "ConnectionState",
    "Consumer",
    "Disconnected",
    "Lease",
    "Nacked",
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
