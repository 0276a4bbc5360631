"""carrot_kombu: a supervised, thread-safe AMQP connection layer for kombu and Celery."""

from __future__ import annotations

import logging

from .exceptions import Blocked, CarrotKombuError, ConfigurationError, Disconnected, PoolTimeout
from .consumers import Consumer
from .manager import ConnectionManager
from .publisher import Nacked, PublishError, PublishTimeout, Unroutable
from .pool import Lease
from .retry import Backoff
from .status import ConnectionState, Status

__version__ = "0.1.0"

__all__ = (
    "Backoff",
    "Blocked",
    "CarrotKombuError",
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
    "Status",
    "Unroutable",
    "__version__",
)

logging.getLogger(__name__).addHandler(logging.NullHandler())
