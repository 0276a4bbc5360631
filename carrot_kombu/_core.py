"""A manager's object graph, built in one place.

Construction, ``start()`` after ``stop()``, and the after-fork hook all go
through :meth:`Core.build`, so no piece (or lock) can be forgotten in one of
them.  Nothing here references the :class:`~carrot_kombu.ConnectionManager`
facade: a manager dropped without ``stop()`` can be garbage collected, and
its finalizer stops what this graph runs.
"""

from __future__ import annotations

import logging
from typing import Optional

from ._live import LiveConnection
from ._metrics import Metrics
from ._supervisor import Inbox, Supervisor
from .config import Settings
from .consumers import Consumers
from .events import EventBus
from .pool import ChannelPool
from .publisher import Publisher
from .recovery import Recovery
from .status import StateBoard
from .topology import Topology

__all__ = ("Core",)

logger = logging.getLogger("carrot_kombu")


class Core:
    """Everything a manager runs; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        bus: EventBus,
        topology: Topology,
        publisher: Publisher,
        consumers: Consumers,
        inbox: Inbox,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.topology = topology
        self.publisher = publisher
        self.consumers = consumers
        self.inbox = inbox
        #: The counters of carrot_kombu.metrics: the publisher's, kept across runs.
        self.metrics = publisher.metrics
        self.board = StateBoard(settings.endpoints[0].masked_url, self.metrics)
        self.live = LiveConnection()
        publisher.connected = lambda: self.live.current() is not None
        self.pool = ChannelPool(settings.pool_limit, self.live, self.metrics)
        # message.channel requests of consume() callbacks run on leases (see ConsumerChannel).
        consumers.lease_channel = lambda: self.pool.acquire(settings.reply_timeout)
        self.recovery = Recovery(topology, publisher, consumers)
        #: The running supervisor (None when stopped).
        self.supervisor: Optional[Supervisor] = None
        #: Taken by a stop() that has not finished (an exception raised into
        #: its thread, Ctrl-C): the next stop() or start() finishes it.
        self.stopping: Optional[Supervisor] = None

    @classmethod
    def build(cls, settings: Settings, max_pending: int, previous: Optional["Core"] = None,
              forked: bool = False) -> "Core":
        """A new graph.

        Args:
            previous: The graph of an earlier run: its registrations (topology,
                consumers, unconfirmed publishes, event subscribers) carry over;
                its live connection, pool and state board (which a supervisor
                that did not stop in time may still hold) do not.
            forked: ``previous`` belongs to the parent process: keep only what
                the user registered (topology, subscribers), with fresh locks;
                unconfirmed publishes and consumers belong to the parent's threads.
        """
        if previous is not None and not forked:
            previous.publisher.reopen()
            return cls(settings, bus=previous.bus, topology=previous.topology, publisher=previous.publisher,
                       consumers=previous.consumers, inbox=previous.inbox)
        inbox = Inbox()
        if previous is None:
            bus = EventBus()
            _subscribe_transport_callbacks(bus, settings)
            topology = Topology()
        else:
            bus = previous.bus.fork()
            topology = previous.topology
            topology.after_fork()
        metrics = Metrics()  # a forked child counts from zero, like any new process
        publisher = Publisher(max_pending, need_channel=inbox.replace_publisher_channel, metrics=metrics)
        consumers = Consumers(bus, resubscribe=inbox.resubscribe, metrics=metrics,
                              threads=settings.consumer_threads)
        return cls(settings, bus=bus, topology=topology, publisher=publisher, consumers=consumers, inbox=inbox)

    def start(self) -> None:
        self.bus.start()
        self.board.starting()
        supervisor = Supervisor(self.settings, self.live, self.pool, self.bus, self.board, self.recovery,
                                self.publisher, self.inbox)
        self.supervisor = supervisor
        supervisor.start()

    def take_supervisor(self) -> Optional[Supervisor]:
        """The supervisor to stop: the running one, or the one an unfinished stop() took."""
        supervisor, self.supervisor = self.supervisor, None
        if supervisor is None:
            return self.stopping
        self.stopping = supervisor
        return supervisor


def _subscribe_transport_callbacks(bus: EventBus, settings: Settings) -> None:
    """py-amqp's ``on_blocked``/``on_unblocked`` options, as events.

    py-amqp calls them on the thread that reads the socket; here they run on
    the event thread, where a publish waiting for the unblock cannot keep
    the unblock from being read.
    """
    options = settings.transport_options
    for option, event in (("on_blocked", "blocked"), ("on_unblocked", "unblocked")):
        callback = options.get(option)
        if callback is not None:
            bus.on(event, callback)


def abandon(core: Core) -> None:
    """Finalizer of a manager dropped without ``stop()``: stop what it runs, never block.

    May run on any thread (wherever the garbage collector ran), so it only
    flags and posts: the supervisor closes the connection on its own thread.
    """
    core.consumers.shutdown()  # also after stop(): their worker threads end with the manager
    supervisor = core.supervisor
    if supervisor is None:
        return
    logger.warning("carrot_kombu: a ConnectionManager was garbage-collected without stop(); stopping it")
    core.supervisor = None
    core.publisher.fail_waiting("the manager was garbage-collected", closed=True)
    supervisor.stop(timeout=0)
    core.bus.close(timeout=0)
