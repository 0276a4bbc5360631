"""One established connection (a *link*) of a manager, whatever the transport.

The supervisor makes a link per successful connection attempt and throws it
away when it dies; nothing about a link is ever reused.  Two kinds:

* :class:`AmqpLink` over :class:`~carrot_kombu._pyamqp.SupervisedConnection`
  (a service thread, heartbeats, callers that read for themselves, drop
  without handshake);
* :class:`VirtualLink` over kombu's in-process ``memory://`` transport (and
  its subclasses, which is how unit tests inject faults).

The rest of the library asks a link about its channels (:meth:`Link.reusable`,
:meth:`Link.verify`) instead of looking into them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from typing import Any, Callable, Optional

import kombu
from kombu.transport import resolve_transport

from ._pyamqp import ConnHooks, LinkOptions, SupervisedConnection, SupervisedTransport
from .config import Endpoint, Settings
from .exceptions import ChannelLimitReached, Disconnected

__all__ = ("Link", "AmqpLink", "VirtualLink", "LinkHooks", "open_link")

logger = logging.getLogger("carrot_kombu")

LostCallback = Callable[["Link", BaseException], None]


class LinkHooks:
    """What a link reports to its supervisor (from any thread; must not block)."""

    def __init__(
        self,
        on_lost: LostCallback,
        on_blocked: Callable[["Link", str], None],
        on_unblocked: Callable[["Link"], None],
    ) -> None:
        self.on_lost = on_lost
        self.on_blocked = on_blocked
        self.on_unblocked = on_unblocked


class Link:
    """An established connection; subclasses implement the transport specifics."""

    #: Seconds between two supervisor checks while connected.
    tick_interval: float = 1.0

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection, raw: Any) -> None:
        self.generation = generation
        self.endpoint = endpoint
        self.kombu = kombu_connection
        self.raw = raw
        #: Set by the pool: closes idle pooled channels to free channel ids.
        self.make_room: Optional[Callable[[], bool]] = None

    def start(self, hooks: LinkHooks) -> None:
        """Begin servicing the connection."""

    def open_channel(self, deadline: Optional[float] = None) -> Any:
        """Open a new channel on this connection (I/O: call without locks).

        ``deadline`` (``time.monotonic()``) is ignored here: kombu's
        in-process transports answer at once.
        """
        return self.kombu.transport.create_channel(self.raw)

    def tick(self) -> None:
        """Liveness; raises when the connection is dead."""
        self.kombu.transport.heartbeat_check(self.raw)

    @property
    def dead(self) -> Optional[BaseException]:
        return None

    def abort(self, exc: BaseException) -> None:
        """From any thread: the connection is dead now; wakes every waiter, never blocks."""

    def kill(self, exc: BaseException) -> None:
        """Drop a dead connection without any handshake; never blocks."""
        try:
            self.kombu.collect()
        except Exception:
            logger.debug("ignored error while dropping a connection", exc_info=True)

    def close(self, timeout: float) -> None:
        """Close politely (used by ``stop()``), falling back to :meth:`kill`."""
        try:
            self.kombu.release()
        except Exception as exc:
            self.kill(exc)

    def drain_events(self, timeout: Optional[float]) -> None:
        """Run queued kombu callbacks in this thread, waiting up to ``timeout`` for one."""
        self.kombu.drain_events(timeout=timeout)

    def disown(self) -> None:
        """In a forked child: make every use fail, without any I/O on the shared socket."""

    def negotiated(self) -> dict[str, Any]:
        return {"heartbeat": None, "frame_max": None, "channel_max": None}

    def server(self) -> dict[str, Optional[str]]:
        return {"product": None, "version": None}

    def silent_for(self) -> float:
        """Seconds since the broker last sent anything (0 where unknown)."""
        return 0.0

    # -- questions about channels of this link -------------------------------------------

    def reusable(self, chan: Any) -> bool:
        """May ``chan`` go to another borrower as it is?"""
        if getattr(chan, "closed", False) or not getattr(chan, "is_open", True):
            return False
        # Consumers would keep delivering to whoever leases the channel next.
        return not getattr(chan, "callbacks", None)

    def needs_verify(self, chan: Any) -> bool:
        """Could a late error of what ``chan`` wrote still arrive (see :meth:`verify`)?"""
        return False

    def verify(self, chan: Any, on_done: Callable[[bool], None]) -> bool:
        """Start checking ``chan`` without waiting; ``on_done(ok)`` follows from the reading thread."""
        return False


class AmqpLink(Link):
    """A py-amqp connection run by its :class:`~carrot_kombu._pyamqp.ConnState`."""

    raw: SupervisedConnection

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection, raw: Any) -> None:
        super().__init__(generation, endpoint, kombu_connection, raw)
        hb = raw.heartbeat or 0
        # A backstop to the service thread's own check: notice 2 missed
        # heartbeats within ~2*hb + 0.5s even if that thread were stuck.
        self.tick_interval = min(1.0, max(0.05, hb / 4)) if hb else 1.0

    def start(self, hooks: LinkHooks) -> None:
        self.raw.carrot.start(
            ConnHooks(
                on_lost=lambda exc: hooks.on_lost(self, exc),
                on_blocked=lambda reason: hooks.on_blocked(self, str(reason)),
                on_unblocked=lambda: hooks.on_unblocked(self),
            ),
            name=f"{self.endpoint.host}:{self.endpoint.port}",
        )

    def open_channel(self, deadline: Optional[float] = None) -> Any:
        """Open a channel; its ``channel.open-ok`` is awaited until ``deadline`` at most.

        Raises:
            socket.timeout: ``deadline`` passed first (the channel is spoiled).
        """
        with self.raw.carrot.caller_deadline(deadline):
            try:
                return self.raw.channel()
            except ChannelLimitReached:
                # Idle pooled channels hold ids a consumer or the publisher needs more.
                if self.make_room is not None and self.make_room():
                    return self.raw.channel()
                raise

    @property
    def dead(self) -> Optional[BaseException]:
        return self.raw.carrot.dead

    def drain_events(self, timeout: Optional[float]) -> None:
        self.raw.carrot.events.drain(timeout)

    def disown(self) -> None:
        # A close or shutdown here would also end the parent's connection
        # (same socket); only mark it dead so that nothing writes to it.
        self.raw.carrot.disown(Disconnected("the process forked; this connection belongs to the parent"))

    def tick(self) -> None:
        self.raw.carrot.check_liveness()

    def abort(self, exc: BaseException) -> None:
        self.raw.carrot.fail(exc)

    def kill(self, exc: BaseException) -> None:
        state = self.raw.carrot
        state.fail(exc)
        state.join(1.0)
        if state.wire is not None:
            state.wire.close()

    def close(self, timeout: float) -> None:
        try:
            self.raw.close(timeout=timeout)
        except Exception as exc:  # never let a polite close keep us
            logger.debug("ignored error while closing: %r", exc)
        self.kill(Disconnected("manager stopped"))

    def negotiated(self) -> dict[str, Any]:
        return {
            "heartbeat": self.raw.heartbeat,
            "frame_max": self.raw.frame_max,
            "channel_max": self.raw.channel_max,
        }

    def server(self) -> dict[str, Optional[str]]:
        props = self.raw.server_properties or {}
        return {"product": _text(props.get("product")), "version": _text(props.get("version"))}

    def silent_for(self) -> float:
        return self.raw.carrot.silent_for()

    def reusable(self, chan: Any) -> bool:
        return chan.carrot.reusable()  # type: ignore[no-any-return]

    def needs_verify(self, chan: Any) -> bool:
        return chan.carrot.unverified  # type: ignore[no-any-return]

    def verify(self, chan: Any, on_done: Callable[[bool], None]) -> bool:
        return bool(chan.begin_sync(on_done))


class VirtualLink(Link):
    """kombu's in-process transport: no socket, liveness by ``heartbeat_check``."""

    tick_interval = 0.05

    def private_connection(self) -> kombu.Connection:
        """A connection of the same in-process broker, for one consumer's own thread."""
        conn = kombu.Connection(transport=type(self.kombu.transport), hostname=self.endpoint.host)
        conn.connect()
        return conn


def open_link(
    generation: int,
    endpoint: Endpoint,
    settings: Settings,
    connect_timeout: Optional[float] = None,
    on_created: Optional[Callable[[Any], None]] = None,
) -> Link:
    """Connect once to ``endpoint`` (blocking, bounded by ``connect_timeout``).

    Raises:
        Exception: Whatever the transport raised; the caller classifies it.
    """
    transport_cls = _transport_for(endpoint)
    options: dict[str, Any] = dict(settings.transport_options)
    if endpoint.is_amqp:
        props = {"connection_name": f"carrot_kombu pid={os.getpid()}"}
        props.update(options.pop("client_properties", None) or {})
        props.update(settings.client_properties)
        options["client_properties"] = props
        if endpoint.channel_max:
            options["channel_max"] = endpoint.channel_max
        if endpoint.frame_max:
            options["frame_max"] = endpoint.frame_max
        options["socket_settings"] = _socket_settings(endpoint, settings)
        options["carrot_options"] = LinkOptions(
            reply_timeout=settings.reply_timeout, blocked_timeout=settings.blocked_timeout, on_created=on_created
        )
        # User callbacks never run on the reading thread: the manager
        # delivers blocked/unblocked as events instead.
        options.pop("on_blocked", None)
        options.pop("on_unblocked", None)
    conn = kombu.Connection(
        hostname=endpoint.host,
        port=endpoint.port,
        userid=endpoint.userid,
        password=endpoint.password,
        virtual_host=endpoint.virtual_host,
        ssl=endpoint.ssl_for_connection(),
        heartbeat=endpoint.heartbeat,
        connect_timeout=connect_timeout or endpoint.connect_timeout,
        transport=transport_cls,
        transport_options=options,
    )
    try:
        # kombu's own connect() retries and sleeps; we want exactly one attempt.
        raw = conn._connection_factory()
        conn._connection = raw
    except BaseException:
        try:
            conn.collect()
        except Exception:
            pass
        raise
    if endpoint.is_amqp:
        return AmqpLink(generation, endpoint, conn, raw)
    return VirtualLink(generation, endpoint, conn, raw)


_GUARDED: dict[type, type] = {}
_GUARD_LOCK = threading.Lock()


def _transport_for(endpoint: Endpoint) -> type:
    base: Any = SupervisedTransport if endpoint.is_amqp else resolve_transport(endpoint.scheme)
    with _GUARD_LOCK:
        guarded = _GUARDED.get(base)
        if guarded is None:
            guarded = _GUARDED[base] = _guard(base)
    return guarded


def _guard(base: Any) -> type:
    def establish_connection(self: Any) -> Any:
        # kombu's ensure()/revive paths reconnect a lost connection on their own
        # thread; that connection would belong to nobody.  Only the supervisor's
        # single attempt is allowed.
        client = self.client
        if getattr(client, "_carrot_established", False):
            raise Disconnected("this connection is owned by a carrot_kombu manager; take a new lease")
        client._carrot_established = True
        return base.establish_connection(self)

    return type(f"Supervised{base.__name__}", (base,), {"establish_connection": establish_connection, "__module__": __name__})


def _socket_settings(endpoint: Endpoint, settings: Settings) -> dict[int, Any]:
    """py-amqp's socket options, with a TCP_USER_TIMEOUT that fits our timeouts.

    py-amqp sets TCP_USER_TIMEOUT to 1 s: any write unacknowledged for a second
    (a broker that blocks us under a resource alarm, a short network stall)
    kills the socket.  Dead peers are our heartbeat's job; the kernel limit is
    raised to outlast both ``2 * heartbeat`` and ``blocked_timeout``.
    """
    opts: dict[int, Any] = {}
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if user_timeout is not None and sys.platform.startswith("linux"):
        seconds = max(2 * endpoint.heartbeat, settings.blocked_timeout or 0.0)
        opts[user_timeout] = int((seconds + 1) * 1000) if seconds else 0
    opts.update(settings.socket_options or {})
    return opts


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
