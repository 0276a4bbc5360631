"""What an integration sees of a manager's live connection: :class:`ConnectionView`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional

from ._timeouts import check_timeout
from .exceptions import Disconnected

if TYPE_CHECKING:
    from ._link import Link

__all__ = ("CallbackQueue", "ConnectionView")


class CallbackQueue:
    """kombu callbacks of one integration connection, run by whoever drains it.

    The thread that reads the socket only queues (deliveries, ``on_return``);
    :meth:`drain` runs them on the calling thread, one at a time, in arrival
    order.  :meth:`fileno` is readable while something is queued (or the
    connection died), for event loops.  :meth:`close` frees the descriptor;
    so does the garbage collector for a queue dropped without it (a view of
    a connection is easy to drop: its descriptors must not stay for ever).
    """

    __slots__ = ("_queue", "_closed", "_release", "__weakref__")

    def __init__(self, queue: Any, drop: Callable[[Any], None]) -> None:
        self._queue = queue
        self._closed = False
        # Holds the raw queue and ``drop``, never this object: runs once, at
        # close() or when this object is collected (any thread, never blocks).
        self._release = weakref.finalize(self, drop, queue)
        self._release.atexit = False  # the process ends anyway; never run before the managers stop

    def drain(self, timeout: Optional[float]) -> None:
        """Run the next queued callback, waiting up to ``timeout`` for one.

        Raises:
            socket.timeout: Nothing arrived in time.
            Disconnected: The connection is lost.
            TypeError, ValueError: ``timeout`` is not a number of seconds >= 0 (or None).
        """
        self._queue.drain(check_timeout("timeout", timeout))

    def fileno(self) -> int:
        """Readable while callbacks are queued (or the connection died).

        Raises:
            ValueError: The queue was closed.
        """
        if self._closed:
            raise ValueError("this callback queue is closed")
        return int(self._queue.fileno())

    def close(self) -> None:
        """Stop queueing here and close the descriptor (idempotent, any thread, never blocks)."""
        self._closed = True
        self._release()

    @property
    def raw(self) -> Any:
        """What a channel adopted with :meth:`ConnectionView.adopt` queues into."""
        return self._queue


class ConnectionView:
    """One established connection of a manager, read-only; dead for good once lost.

    Made by :meth:`ConnectionManager.connection`.
    """

    __slots__ = ("_link",)

    def __init__(self, link: "Link") -> None:
        self._link = link

    @property
    def generation(self) -> int:
        """Unique per connection in the process (a lease's ``generation`` matches it)."""
        return self._link.generation

    @property
    def broker(self) -> str:
        """The broker's URL, password masked."""
        return self._link.endpoint.masked_url

    @property
    def host(self) -> str:
        return self._link.endpoint.host

    @property
    def port(self) -> int:
        return self._link.endpoint.port

    @property
    def alive(self) -> bool:
        return self._link.dead is None

    def check(self) -> None:
        """Raise :class:`~carrot_kombu.Disconnected` if the connection is lost."""
        dead = self._link.dead
        if dead is not None:
            raise Disconnected(f"connection lost: {type(dead).__name__}: {dead}", dead)

    @property
    def server_properties(self) -> dict[str, Any]:
        return self._link.server_properties

    @property
    def heartbeat(self) -> Any:
        return self._link.negotiated().get("heartbeat")

    @property
    def frame_max(self) -> Any:
        return self._link.negotiated().get("frame_max")

    @property
    def channel_max(self) -> Any:
        return self._link.negotiated().get("channel_max")

    @property
    def transport(self) -> Any:
        """py-amqp's transport object (``.sock``), or None on in-process transports."""
        return self._link.socket_transport

    def callback_queue(self) -> CallbackQueue:
        """A new queue for kombu callbacks of channels :meth:`adopt`-ed into it.

        Raises:
            Disconnected: The connection's transport runs callbacks itself (``memory://``).
        """
        link = self._link
        self.check()  # a dead connection hands out no queue (its descriptors would never be used)
        drop = getattr(link, "drop_callback_queue", None)
        if drop is None:
            raise Disconnected("this transport has no callback queues")
        return CallbackQueue(link.callback_queue(), drop)

    def adopt(self, chan: Any, callbacks: CallbackQueue, on_gone: Callable[[Any], None]) -> None:
        """Route the kombu callbacks of a leased channel to ``callbacks``; ``on_gone(chan)`` once it closes.

        ``on_gone`` runs on the thread that reads the connection, the moment
        the channel closes: it is for bookkeeping that never blocks and never
        calls the manager (the kombu transport gives the channel's lease back
        there).  Anything more (user code) belongs in a queued callback.

        Raises:
            TypeError: ``chan`` is not a channel of this connection's leases,
                or ``callbacks`` not a :class:`CallbackQueue`.
        """
        if not isinstance(callbacks, CallbackQueue):
            raise TypeError(f"callbacks must be a CallbackQueue, got {type(callbacks).__name__}")
        if not callable(on_gone):
            raise TypeError("on_gone must be callable")
        try:
            self._link.adopt(chan, callbacks.raw, on_gone)
        except AttributeError:
            raise TypeError(f"chan must be a channel leased from this manager, got {type(chan).__name__}") from None

    def __repr__(self) -> str:
        return f"<ConnectionView {self.broker} generation={self.generation} {'alive' if self.alive else 'dead'}>"
