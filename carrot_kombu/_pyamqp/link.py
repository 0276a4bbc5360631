"""The AMQP link: :class:`~carrot_kombu._link.Link` over the fenced py-amqp layer.

Everything the rest of the library needs from a py-amqp connection and its
channels is answered here, by asking the connection's and channels' state
objects (``.carrot``); nothing outside this package reads them.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any, Callable, Optional

import kombu
from amqp import spec

from .._link import (
    ConfirmChannel,
    ConfirmHooks,
    Link,
    LinkHooks,
    Outbound,
    Subscription,
    establish_once,
    guarded,
    quietly,
)
from ..config import Endpoint, Settings
from ..exceptions import ChannelLimitReached, Disconnected
from .connection import LinkOptions, SupervisedConnection, SupervisedTransport
from .callbacks import EventQueue
from .replies import ConnHooks, Waiter

__all__ = ("AmqpLink", "AmqpConfirmChannel", "AmqpSubscription", "connect")

logger = logging.getLogger("carrot_kombu")


class AmqpLink(Link):
    """A py-amqp connection run by its :class:`~carrot_kombu._pyamqp.ConnState`."""

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection,
                 raw: SupervisedConnection) -> None:
        super().__init__(generation, endpoint, kombu_connection)
        self._raw = raw
        self._state = raw.carrot
        hb = raw.heartbeat or 0
        # A backstop to the service thread's own check: notice 2 missed
        # heartbeats within ~2*hb + 0.5s even if that thread were stuck.
        self.tick_interval = min(1.0, max(0.05, hb / 4)) if hb else 1.0

    # -- life ----------------------------------------------------------------------------------

    def start(self, hooks: LinkHooks) -> None:
        self._state.start(
            ConnHooks(
                on_lost=lambda exc: hooks.on_lost(self, exc),
                on_blocked=lambda reason: hooks.on_blocked(self, str(reason)),
                on_unblocked=lambda: hooks.on_unblocked(self),
            ),
            name=f"{self.endpoint.host}:{self.endpoint.port}",
        )

    def tick(self) -> None:
        self._state.check_liveness()

    @property
    def dead(self) -> Optional[BaseException]:
        return self._state.dead

    def abort(self, exc: BaseException) -> None:
        self._state.fail(exc)

    def kill(self, exc: BaseException) -> None:
        state = self._state
        state.fail(exc)
        state.join(1.0)
        if state.wire is not None:
            state.wire.close()

    def close(self, timeout: float) -> None:
        try:
            self._raw.close(timeout=timeout)
        except Exception as exc:  # never let a polite close keep us
            logger.debug("ignored error while closing: %r", exc)
        self.kill(Disconnected("manager stopped"))

    def disown(self) -> None:
        # A close or shutdown here would also end the parent's connection
        # (same socket); only mark it dead so that nothing writes to it.
        self._state.disown(Disconnected("the process forked; this connection belongs to the parent"))
        # Our copy of the descriptor goes (a prefork child must not hold the
        # parent's socket); closing a descriptor sends nothing while the parent has it.
        sock = getattr(self._raw._transport, "sock", None)
        if sock is not None:
            try:
                fd = sock.detach()  # the object forgets it: no later close hits a reused number
                if fd >= 0:
                    os.close(fd)
            except OSError:
                pass

    # -- what it is ------------------------------------------------------------------------------

    def negotiated(self) -> dict[str, Any]:
        raw = self._raw
        return {"heartbeat": raw.heartbeat, "frame_max": raw.frame_max, "channel_max": raw.channel_max}

    @property
    def server_properties(self) -> dict[str, Any]:
        return dict(self._raw.server_properties or {})

    def silent_for(self) -> float:
        return self._state.silent_for()

    # -- channels --------------------------------------------------------------------------------

    def open_channel(self, deadline: Optional[float] = None) -> Any:
        try:
            return self._raw.channel(deadline=deadline)
        except ChannelLimitReached:
            # Idle pooled channels hold ids a consumer or the publisher needs more.
            if self.make_room is not None and self.make_room():
                return self._raw.channel(deadline=deadline)
            raise

    def close_channel(self, chan: Any, wait: bool = False) -> None:
        # chan.close waits for close-ok (bounded): the id is free afterwards.
        quietly(chan.close if wait else chan.close_nowait, "closing a channel")

    def reusable(self, chan: Any) -> bool:
        return chan.carrot.reusable()  # type: ignore[no-any-return]

    def needs_verify(self, chan: Any) -> bool:
        return chan.carrot.unverified  # type: ignore[no-any-return]

    def verify(self, chan: Any, on_done: Callable[[bool], None]) -> bool:
        return bool(chan.begin_sync(on_done))

    def channel_error(self, chan: Any) -> Optional[BaseException]:
        state = getattr(chan, "carrot", None)
        return None if state is None else state.error

    def open_confirm_channel(self, hooks: ConfirmHooks) -> "AmqpConfirmChannel":
        chan = self.open_channel()
        try:
            return AmqpConfirmChannel(chan, hooks)
        except BaseException:
            self.close_channel(chan)
            raise

    def subscription(self, on_delivery: Callable[[Any], None], on_cancelled: Callable[[], None]) -> "AmqpSubscription":
        return AmqpSubscription(self, on_delivery, on_cancelled)

    # -- user callbacks (the kombu transport) ----------------------------------------------------

    def drain_events(self, timeout: Optional[float]) -> None:
        self._state.events.drain(timeout)

    def callback_queue(self) -> EventQueue:
        queue = EventQueue(self._state, notify=True)
        self._state.add_event_queue(queue)
        return queue

    def drop_callback_queue(self, queue: EventQueue) -> None:
        """Forget ``queue`` (any thread, never blocks) and close its pipe."""
        self._state.remove_event_queue(queue)
        queue.close()

    def adopt(self, chan: Any, callbacks: Any, on_gone: Callable[[Any], None]) -> None:
        chan.carrot.events = callbacks
        chan.carrot.on_gone.append(on_gone)

    @property
    def socket_transport(self) -> Any:
        return self._raw._transport


class AmqpConfirmChannel(ConfirmChannel):
    """The publisher's channel: confirm mode, pipelined writes, hooks on the reading thread."""

    def __init__(self, chan: Any, hooks: ConfirmHooks) -> None:
        self._chan = chan
        state = chan.carrot
        self._state = state
        self._conn = state.conn
        self.reply_timeout = state.conn.reply_timeout
        state.on_confirm = hooks.on_confirm
        state.on_return = hooks.on_return
        on_closed = hooks.on_closed
        state.on_closed = lambda error, method: on_closed(error, tuple(method) == spec.Basic.Publish)
        chan.confirm_select()

    def write(self, messages: list[Outbound], on_queued: Callable[[int, bool], None],
              deadline: Optional[float] = None, flush: bool = True) -> None:
        chan = self._chan
        frame_max = self._conn.conn.frame_max
        frames: list[Any] = []
        for message in messages:
            frames += message.frames(chan.channel_id, frame_max)
        chan.write_publishes(frames, len(messages), on_queued=on_queued, deadline=deadline, flush=flush)

    def flush(self, wait: bool = False) -> bool:
        wire = self._conn.wire
        if wire is None:
            return True
        try:
            wire.flush(block=wait)
        except OSError:
            return True  # the connection failed: the wire reported it; the next channel publishes them again
        return wait or not wire.pending_output

    def wait(self, waiter: Waiter, deadline: Optional[float],
             interrupt: Optional[Callable[[], bool]] = None) -> bool:
        return self._conn.wait_for(waiter, deadline, interrupt)  # type: ignore[no-any-return]

    def wait_confirm(self, waiter: Waiter, deadline: Optional[float], what: Callable[[], str]) -> bool:
        conn = self._conn
        # A block (often caused by this very publish) bounds the wait by
        # blocked_timeout: the confirm cannot come while it lasts.
        until = conn.blocked_until()
        if until is None:
            return conn.wait_for(waiter, deadline, conn.is_blocked)  # type: ignore[no-any-return]
        if time.monotonic() >= until:
            raise conn.blocked_error("no confirm" + what())
        return conn.wait_for(waiter, until if deadline is None else min(deadline, until))  # type: ignore[no-any-return]

    def failure(self) -> Optional[BaseException]:
        return self._state.failure()  # type: ignore[no-any-return]


class AmqpSubscription(Subscription):
    """A consumer's own channel; deliveries reach ``on_delivery`` on the reading thread."""

    def __init__(self, link: AmqpLink, on_delivery: Callable[[Any], None], on_cancelled: Callable[[], None]) -> None:
        self._link = link
        self._on_delivery = on_delivery
        self._on_cancelled = on_cancelled
        self._chan: Any = None
        self._tag: Optional[str] = None

    def start(self, queue: kombu.Queue, prepare: Callable[[Any], None], no_ack: bool,
              arguments: Optional[dict[str, Any]]) -> None:
        chan = self._link.open_channel()
        try:
            prepare(chan)
            self._tag = chan.consume_internal(queue.name, self._on_delivery, lambda tag: self._on_cancelled(),
                                              no_ack=no_ack, arguments=arguments)
        except BaseException:
            self._link.close_channel(chan)
            raise
        self._chan = chan

    def cancel(self) -> None:
        # The channel is forgotten last: a cancel interrupted anywhere (an
        # exception raised into this thread) is done again by the next one.
        chan = self._chan
        if chan is None:
            return
        quietly(lambda: chan.basic_cancel(self._tag), "cancelling a consumer")
        self._link.close_channel(chan)  # nothing is written after this; unacked deliveries go back
        self._chan = None

    def close(self) -> None:
        chan = self._chan
        if chan is not None:
            self._link.close_channel(chan)
            self._chan = None

    def alive(self) -> bool:
        return self._link.dead is None

    def message(self, raw: Any) -> Any:
        return raw.channel.message_to_python(raw)

    def reject(self, message: Any, raw: Any) -> None:
        try:
            if message is not None:
                message.reject(requeue=False)
            else:
                raw.channel.basic_reject(raw.delivery_tag, requeue=False)
        except Exception:  # noqa: BLE001 - the channel may be gone: the broker redelivers then
            logger.debug("carrot_kombu could not reject an undecodable delivery", exc_info=True)


def connect(generation: int, endpoint: Endpoint, settings: Settings, connect_timeout: Optional[float] = None,
            on_created: Optional[Callable[[Any], None]] = None) -> AmqpLink:
    """One AMQP connection attempt to ``endpoint`` (blocking, bounded by ``connect_timeout``).

    Raises:
        Exception: Whatever the attempt raised; the caller classifies it.
    """
    options: dict[str, Any] = dict(settings.transport_options)
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
    # User callbacks never run on the reading thread: the manager delivers
    # blocked/unblocked as events instead.
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
        transport=_TRANSPORT,
        transport_options=options,
    )
    return AmqpLink(generation, endpoint, conn, establish_once(conn))


_TRANSPORT = guarded(SupervisedTransport)


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
