"""What a manager re-creates on every new connection, in order.

1. the declared entities, pipelined when there are many (one the broker
   refuses or cannot serve is *degraded*, not fatal: the supervisor retries it);
2. the setup functions (code: one that fails fails the attempt);
3. the consumers, pipelined on shared channels (a round trip per channel of
   consumers, see :meth:`Link.subscribe_batch <carrot_kombu._link.Link.subscribe_batch>`;
   one refused is degraded the same way);
4. the confirm channel of ``publish``, which publishes again what is unconfirmed.

All of it runs before the manager reports ``connected`` and before any lease
is handed out; what registers while that happens is caught up right after.
Every request is bounded by ``reply_timeout``, and heartbeats go on meanwhile
(the connection's own service thread sends them).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Optional

from amqp.exceptions import ChannelError

from ._sync import owned, run_locked
from .exceptions import Blocked, ReplyTimeout
from .publisher import Publisher
from .topology import EntityRefused, Topology, declare_all, describe, refused_declare

if TYPE_CHECKING:
    from ._link import Link
    from .consumers import Consumer, Consumers

__all__ = ("Recovery", "Degraded")

logger = logging.getLogger("carrot_kombu")


class Degraded:
    """Something registered that the broker cannot serve on this connection."""

    __slots__ = ("kind", "target", "what", "error")

    def __init__(self, kind: str, target: Any, what: str, error: BaseException) -> None:
        self.kind = kind  # "entity" or "consumer"
        self.target = target
        self.what = what
        self.error = error


class Recovery:
    def __init__(self, topology: Topology, publisher: Publisher, consumers: "Consumers") -> None:
        self.topology = topology
        self.publisher = publisher
        self.consumers = consumers
        # An RLock for the hand-over in ensure_publisher (see _sync).
        self._lock = threading.RLock()
        #: Declare many entities pipelined (False after a failed attempt: see restore()).
        self._pipeline_entities = True

    def restore(self, link: "Link") -> list[Degraded]:
        """On the supervisor, before leases; an exception fails the attempt.

        Returns:
            What could not be restored on this connection (retried later).
        """
        pipelined = self._pipeline_entities
        dropped: Optional[BaseException] = None
        try:
            refused = declare_all(link, self.topology.entities(), self.topology.server_named, pipelined=pipelined)
        except EntityRefused as exc:
            # It would close every new connection the same way: one caller's
            # entity must not keep everyone disconnected.  Dropped, loudly.
            self.topology.remove_entities([exc.entity])
            logger.error(
                "carrot_kombu dropped a registered entity: the broker closed the connection when it was "
                "declared (%s); it is no longer declared on reconnect (fix it and declare it again)", exc,
            )
            dropped = exc.error
        except BaseException:
            # Pipelined, a connection-level refusal names no entity: the next
            # attempt declares one by one, which does (and drops it, above).
            self._pipeline_entities = False
            raise
        if dropped is not None:
            # Raised outside the handler: EntityRefused's own chain leads to
            # this error, which would get it as __context__ (a loop in the chain).
            raise dropped
        self._pipeline_entities = True
        degraded = [Degraded("entity", entity, describe(entity), error) for entity, error in refused]
        setups = self.topology.setups()
        if setups:
            channel = link.open_channel()
            try:
                for fn in setups:
                    fn(channel)
            finally:
                link.close_channel(channel)
        degraded += self._consumers(link)
        self.ensure_publisher(link)
        return degraded

    def attached(self, link: "Link") -> list[Degraded]:
        """Catch up with consumers and publishes registered during :meth:`restore`."""
        try:
            degraded = self._consumers(link)
            self.ensure_publisher(link)
            return degraded
        except Exception:
            # The link is probably dying: the supervisor learns it from the link.
            logger.warning("carrot_kombu could not finish recovering a new connection", exc_info=True)
            return []

    def _consumers(self, link: "Link") -> list[Degraded]:
        return [Degraded("consumer", c, c.name, exc) for c, exc in self.consumers.restore(link)]

    def forget(self, link: "Link") -> None:
        self.publisher.detach(link.generation)
        self.consumers.forget(link)

    def ensure_publisher(self, link: "Link", wait: bool = True) -> None:
        """Attach a confirm channel to ``link`` if the publisher has none there.

        Args:
            link: The current connection.
            wait: False for a publishing caller: if another thread is already
                attaching (which may take a while when refused messages are
                published again one at a time), return at once; the caller's
                message waits for that channel within its own timeout.
        """
        lock = self._lock
        if owned(lock):
            return  # attaching already, further up this thread's stack
        run_locked(lock, lambda: self._attach(link), blocking=wait)

    def _attach(self, link: "Link") -> None:
        if self.publisher.needs(link.generation):
            try:
                self.publisher.attach(link)
            except Blocked as exc:
                self.publisher.no_channel(exc)  # waiting callers learn it now
                raise

    def retry(self, link: "Link", item: Degraded) -> Optional[BaseException]:
        """Try a degraded entity or consumer again; its error, or None once it works.

        Raises:
            Exception: A connection-level failure.
        """
        if item.kind == "entity":
            if not self.topology.declares(item.target):
                return None  # no longer registered
            failed = declare_all(link, [item.target], self.topology.server_named)
            return failed[0][1] if failed else None
        consumer: "Consumer" = item.target
        if not consumer.active:
            return None
        try:
            consumer.subscribe(link)
        except (ChannelError, ReplyTimeout) as exc:
            return exc
        except BaseException as exc:
            refused = refused_declare(exc)
            if refused is not None:
                self.consumers.drop(consumer, refused)  # it would close every connection the same way
            raise
        return None
