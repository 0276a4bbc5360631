"""What a manager re-creates on every new connection, in order.

1. the topology (declared entities, then setup functions) on one channel;
2. the consumers, each on its own channel;
3. the confirm channel of ``publish``, which publishes again what is unconfirmed.

All of it runs before the manager reports ``connected`` and before any lease
is handed out; what registers while that happens is caught up right after.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from .publisher import Publisher
from .topology import Topology

if TYPE_CHECKING:
    from ._link import Link
    from .consumers import Consumers

__all__ = ("Recovery",)

logger = logging.getLogger("carrot_kombu")


class Recovery:
    def __init__(self, topology: Topology, publisher: Publisher, consumers: "Consumers") -> None:
        self.topology = topology
        self.publisher = publisher
        self.consumers = consumers
        self._lock = threading.Lock()

    def restore(self, link: "Link") -> None:
        """On the supervisor, before leases; an exception fails the attempt."""
        if self.topology:
            channel = link.open_channel()
            try:
                self.topology.apply(channel)
            finally:
                _close(channel)
        self.consumers.restore(link)
        self.ensure_publisher(link)

    def attached(self, link: "Link") -> None:
        """Catch up with consumers and publishes registered during :meth:`restore`."""
        try:
            self.consumers.restore(link)
            self.ensure_publisher(link)
        except Exception:
            # The link is probably dying: the supervisor learns it from the reader.
            logger.warning("carrot_kombu could not finish recovering a new connection", exc_info=True)

    def forget(self, link: "Link") -> None:
        self.publisher.detach(link.generation)
        self.consumers.forget(link)

    def ensure_publisher(self, link: "Link") -> None:
        with self._lock:
            if self.publisher.needs(link.generation):
                self.publisher.attach(link.open_channel(), link.generation)


def _close(channel: Any) -> None:
    try:
        channel.close()
    except Exception:
        logger.debug("ignored error while closing a setup channel", exc_info=True)
