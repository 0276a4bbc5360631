"""The AMQP link: :class:`~carrot_kombu._link.Link` over the fenced py-amqp layer.

Everything the rest of the library needs from a py-amqp connection and its
channels is answered here, by asking the connection's and channels' state
objects (``.carrot``); nothing outside this package reads them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import kombu
from amqp import spec
from amqp.exceptions import AMQPError, RecoverableConnectionError

from .._link import (
    BatchItem,
    Pipelined,
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
from .messages import new_consumer_tag
from .chanstate import acting_for
from .consumer_channel import ConsumerChannel
from .replies import ConnHooks, Waiter

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

__all__ = ("AmqpLink", "AmqpConfirmChannel", "AmqpSubscription", "ConsumerChannels", "SharedChannel", "connect")

logger = logging.getLogger("carrot_kombu")


class AmqpLink(Link):
    """A py-amqp connection run by its :class:`~carrot_kombu._pyamqp.ConnState`."""

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection,
                 raw: SupervisedConnection) -> None:
        super().__init__(generation, endpoint, kombu_connection)
        self._raw = raw
        self._state = raw.carrot
        self.consumer_channels = ConsumerChannels(self)
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

    def preflight(self, check: Callable[[Any], None]) -> bool:
        chan = self.open_channel()
        try:
            check(chan)
        finally:
            # Awaited: its id is free at close-ok, for the shared channel that
            # may need it next (at channel_max the consume would fail otherwise).
            self.close_channel(chan, wait=True)
        return True

    def reusable(self, chan: Any) -> bool:
        return chan.carrot.reusable()  # type: ignore[no-any-return]

    def idle_ready(self, chan: Any) -> bool:
        state = chan.carrot
        return not state.unverified and state.reusable()

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

    def subscription(self, on_delivery: Callable[[Any], None], on_cancelled: Callable[[Optional[str]], None],
                     on_moved: Optional[Callable[[], None]] = None, on_close: Optional[Callable[[], None]] = None,
                     borrow: Optional[Callable[[], Any]] = None) -> "AmqpSubscription":
        return AmqpSubscription(self, on_delivery, on_cancelled, on_moved, on_close, borrow)

    def declare_batch(self, declares: list[Callable[[Any], None]]) -> list[bool]:
        """Chunks of ``_DECLARE_CHUNK`` declares written back to back, one ``channel.flow`` round trip each.

        A chunk whose channel the broker closes (one entity refused) is
        reported not done, whole, and the next chunk takes a new channel.
        """
        from amqp.exceptions import ChannelError

        from ..exceptions import ReplyTimeout

        done = [False] * len(declares)
        chan: Any = None
        try:
            for first in range(0, len(declares), _DECLARE_CHUNK):
                if chan is None:
                    chan = self.open_channel()
                chan.carrot.defer_flush = True
                try:
                    try:
                        for declare in declares[first:first + _DECLARE_CHUNK]:
                            declare(chan)
                    finally:
                        chan.carrot.defer_flush = False
                    chan.sync()
                except (ChannelError, ReplyTimeout):
                    logger.debug("a pipelined declare chunk failed; declaring it one by one", exc_info=True)
                    self.close_channel(chan)
                    chan = None
                    continue
                done[first:first + _DECLARE_CHUNK] = [True] * len(declares[first:first + _DECLARE_CHUNK])
        finally:
            if chan is not None:
                self.close_channel(chan)
        return done

    def subscribe_batch(self, batch: list[BatchItem]) -> list[bool]:
        """Pipelined: per channel of ``per_channel`` consumers, one write and one sync, none awaited in turn.

        Each consumer's declare (``nowait``), qos (its qos-ok not awaited)
        and consume (``nowait``) are queued back to back and sent together,
        followed by a ``channel.flow`` whose answer proves the broker took
        them all (it answers a channel's requests in order).  The next chunk
        is written without waiting for that answer; all answers are awaited
        at the end (``reply_timeout``).  A chunk whose channel the broker
        closes (one queue refused) goes the one-by-one way, which tells the
        culprit apart.
        """
        channels = self.consumer_channels
        size = channels.per_channel
        chunks: list[tuple[int, SharedChannel, list[AmqpSubscription]]] = []
        results: dict[int, bool] = {}
        waiter = _AllSynced(results, chunks)

        def synced(first: int, ok: bool) -> None:  # the reading thread
            results[first] = ok  # one statement: atomic; ready() reads it
            waiter.wake()

        # All the channels in one round trip; with fewer (channel_max), the rest go one by one.
        starts = range(0, len(batch), size)
        opened = self._raw.open_channels(len(starts))
        for first, chan in zip(starts, opened):
            chunk = batch[first:first + size]
            shared = channels.adopt(chan, len(chunk))
            subs: list[AmqpSubscription] = [item.subscription for item in chunk]  # type: ignore[misc]
            chunks.append((first, shared, subs))
            try:
                with shared.subscribing:
                    chan.carrot.defer_flush = True
                    try:
                        for item, sub in zip(chunk, subs):
                            if item.declare is not None:
                                item.declare(chan)
                            shared.qos(item.prefetch)
                            sub.begin(chan, item.queue, item.no_ack, item.arguments)
                    finally:
                        chan.carrot.defer_flush = False
                    if not chan.begin_sync(lambda ok, first=first: synced(first, ok)):
                        synced(first, False)
            except Disconnected:
                raise
            except Exception:  # noqa: BLE001 - a refusal: the chunk goes one by one
                logger.debug("a pipelined subscribe chunk failed; subscribing it one by one", exc_info=True)
                synced(first, False)
        # Read here too while waiting (as any request does); False at the deadline: the rest failed.
        self._state.wait_for(waiter, time.monotonic() + self._state.reply_timeout)
        done = [False] * len(batch)
        for first, shared, subs in chunks:
            ok = results.get(first, False)
            if not ok:
                for sub in subs:
                    sub.forget()
                channels.discard(shared)  # closed by the broker already, or in doubt (no answer)
                continue
            for offset, sub in enumerate(subs):
                done[first + offset] = sub.joined(shared)
        return done

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
        # Read once: py-amqp's collect() sets it to None when the broker's
        # close of this channel is handled (another thread, any moment);
        # framing None would raise struct.error to this caller.
        channel_id = chan.channel_id
        if channel_id is None:
            failure = self._state.failure()
            if isinstance(failure, (AMQPError, Disconnected)):
                raise failure
            raise RecoverableConnectionError(f"the confirm channel is closed ({failure})")
        frames: list[Any] = []
        for message in messages:
            frames += message.frames(channel_id, frame_max)
        chan.write_publishes(frames, len(messages), on_queued=on_queued, deadline=deadline, flush=flush)

    def flush(self, wait: bool = False, loop: Optional[asyncio.AbstractEventLoop] = None) -> bool:
        conn = self._conn
        wire = conn.wire
        if wire is None:
            return True
        if loop is not None:
            # Before the write: the confirm must find the loop reading.
            conn.read_on(loop)
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


#: Consumers sharing one channel at most.  One channel per consumer hits
#: ``channel_max`` (2047 on RabbitMQ) and costs a round trip per consumer to
#: open; too many per channel and a channel error (a 406 bad ack, a 404 on a
#: consume) re-subscribes many innocent neighbours.  Chosen by measurement
#: (``python -m benchmarks consumers``).
CONSUMERS_PER_CHANNEL = 32

#: Entities declared per round trip in a pipelined restore (a refusal sends
#: the whole chunk the one-by-one way).
_DECLARE_CHUNK = 64

#: A channel closed by the broker while answering one of these was closed by
#: a consumer being subscribed (its queue missing, declared differently...):
#: that subscriber gets the error, the consumers already on it are innocent.
_SUBSCRIBING = frozenset({
    spec.Basic.Consume, spec.Basic.Qos, spec.Queue.Declare, spec.Queue.Bind, spec.Exchange.Declare,
    spec.Exchange.Bind,
})


class SharedChannel:
    """One channel carrying up to ``CONSUMERS_PER_CHANNEL`` subscriptions of one link.

    Its membership is guarded by its :class:`ConsumerChannels`' lock; one
    subscriber at a time sends its qos and consume on it (``subscribing``),
    so each consumer's prefetch applies to its own consume (``basic.qos``
    with ``global=False`` is per consumer on RabbitMQ).
    """

    __slots__ = ("chan", "members", "reserved", "broken", "subscribing", "prefetch")

    def __init__(self, chan: Any) -> None:
        self.chan = chan
        chan.shared_by_consumers = True
        #: The last prefetch sent (under ``subscribing``): the broker applies it
        #: to every later consume on the channel, so an equal one is not sent again.
        self.prefetch: Optional[int] = None
        self.members: set["AmqpSubscription"] = set()
        self.reserved = 0  # subscribers on their way in
        self.broken = False  # closed, or closing: no newcomer
        self.subscribing = threading.Lock()

    def qos(self, prefetch: int) -> None:
        """Under ``subscribing``: the next consume's prefetch (0 too: the previous one must not apply), unawaited."""
        if prefetch != self.prefetch:
            self.chan.qos_nowait(prefetch)
            self.prefetch = prefetch

    def __repr__(self) -> str:
        return (f"<SharedChannel {self.chan.channel_id} members={len(self.members)} "
                f"reserved={self.reserved}{' broken' if self.broken else ''}>")


class ConsumerChannels:
    """The channels a link's consumers share, filled up to ``per_channel`` each.

    Acks are per channel: a delivery is settled on the channel it came on
    (``message.channel``), never another.  When the broker closes a shared
    channel, the consumer that caused it (the one whose ack had an unknown
    tag, see :func:`~carrot_kombu._pyamqp.chanstate.acting_for`) is told
    ``on_cancelled`` as before; the others ``on_moved`` and subscribe again
    at once on another channel.  Their unacknowledged deliveries went back to
    their queues with the channel (dropped from the mailboxes: never run twice).
    """

    def __init__(self, link: "AmqpLink", per_channel: int = CONSUMERS_PER_CHANNEL) -> None:
        self._link = link
        self.per_channel = per_channel
        self._lock = threading.Lock()  # membership only: never held during I/O
        self._opening = threading.Lock()  # one channel opened at a time (no burst of half-full ones)
        self._channels: list[SharedChannel] = []

    def __repr__(self) -> str:
        with self._lock:
            members = sum(len(c.members) for c in self._channels)
            return f"<ConsumerChannels channels={len(self._channels)} consumers={members}>"

    def count(self) -> int:
        """Shared channels in use."""
        return len(self._channels)

    def _room(self) -> Optional[SharedChannel]:
        for shared in reversed(self._channels):  # the newest has room, usually
            if not shared.broken and len(shared.members) + shared.reserved < self.per_channel:
                shared.reserved += 1
                return shared
        return None

    def reserve(self) -> SharedChannel:
        """A place on a channel with room, opening one if needed (I/O, without the lock).

        Raises:
            Exception: Opening a channel failed.
        """
        with self._lock:
            shared = self._room()
        if shared is not None:
            return shared
        with self._opening:
            with self._lock:
                shared = self._room()
            if shared is not None:
                return shared
            chan = self._link.open_channel()
            shared = SharedChannel(chan)
            shared.reserved = 1
            chan.carrot.on_closed = lambda error, method: self._closed_by_broker(shared, error, method)
            with self._lock:
                self._channels.append(shared)
            return shared

    def adopt(self, chan: Any, places: int) -> SharedChannel:
        """A new open channel with ``places`` reserved (a pipelined chunk fills it)."""
        shared = SharedChannel(chan)
        shared.reserved = places
        chan.carrot.on_closed = lambda error, method: self._closed_by_broker(shared, error, method)
        with self._lock:
            self._channels.append(shared)
        return shared

    def join(self, shared: SharedChannel, member: "AmqpSubscription") -> bool:
        """The reserved place is taken; False if the channel broke meanwhile."""
        with self._lock:
            if shared.broken:
                shared.reserved -= 1
                return False
            # One statement each, no call between: the place is the member's
            # (leave(shared, member) undoes it) before the reservation goes.
            shared.members.add(member)
            member._joined = True
            shared.reserved -= 1
            return True

    def leave(self, shared: SharedChannel, member: Optional["AmqpSubscription"], wait: bool = False) -> None:
        """Give a place (or a reservation: ``member`` None, or not joined yet) up; the last one closes the channel."""
        with self._lock:
            if member is None or not member._joined:
                shared.reserved -= 1
            else:
                shared.members.discard(member)
                member._joined = False
            last = not shared.members and not shared.reserved
            if last:
                shared.broken = True
                if shared in self._channels:
                    self._channels.remove(shared)
        if last:
            self._link.close_channel(shared.chan, wait=wait)

    def discard(self, shared: SharedChannel) -> None:
        """Give a channel up whatever its members (a subscribe on it failed half-way): they move."""
        with self._lock:
            members = self._break(shared)
        self._link.close_channel(shared.chan)
        for member in members:
            member.moved()

    def _break(self, shared: SharedChannel) -> list["AmqpSubscription"]:
        shared.broken = True
        if shared in self._channels:
            self._channels.remove(shared)
        members = list(shared.members)
        shared.members.clear()
        return members

    def _closed_by_broker(self, shared: SharedChannel, error: BaseException, method: Any) -> None:
        """On the reading thread: tell each member, the culprit as cancelled (with the broker's text), the others as moved.

        With no known culprit (``offender``, see acting_for) every member is
        innocent: a callback cannot write on the channel but through its
        :class:`ConsumerChannel`, which settles only its own deliveries.
        """
        with self._lock:
            members = self._break(shared)
        offender = shared.chan.carrot.offender  # a consumer tag (see acting_for)
        innocent_all = offender is None or tuple(method) in _SUBSCRIBING
        reason = f"its channel was closed by the broker: {type(error).__name__}: {error}"
        for member in members:
            if innocent_all or member._tag != offender:
                member.moved()
            else:
                member.cancelled(reason)


#: Why a consumer the broker sent basic.cancel to is degraded.
_BROKER_CANCEL = "cancelled by the broker (basic.cancel: its queue was deleted, or its node is down)"


class _AllSynced(Waiter):
    """Every chunk of a pipelined subscribe has its answer."""

    __slots__ = ("_results", "_chunks")

    def __init__(self, results: dict[int, bool], chunks: list[Any]) -> None:
        super().__init__()
        self._results = results
        self._chunks = chunks

    def ready(self) -> bool:
        return len(self._results) >= len(self._chunks)


class AmqpSubscription(Subscription):
    """A consumer's place on a shared channel; deliveries reach ``on_delivery`` on the reading thread."""

    def __init__(self, link: AmqpLink, on_delivery: Callable[[Any], None],
                 on_cancelled: Callable[[Optional[str]], None], on_moved: Optional[Callable[[], None]] = None,
                 on_close: Optional[Callable[[], None]] = None, borrow: Optional[Callable[[], Any]] = None) -> None:
        self._link = link
        self._on_delivery = on_delivery
        self._on_cancelled = on_cancelled
        self._on_moved = on_moved or (lambda: on_cancelled(None))
        #: ``message.channel.close()``: cancels the consumer (see ConsumerChannel).
        self._on_close = on_close
        #: A context manager yielding a pool lease, for ConsumerChannel's other requests.
        self.borrow = borrow
        #: What this subscription's messages carry as ``message.channel`` (made at the first delivery).
        self._facade: Optional[ConsumerChannel] = None
        self._shared: Optional[SharedChannel] = None
        #: A member of ``_shared`` (else it holds a reservation there); under its channels' lock.
        self._joined = False
        self._tag: Optional[str] = None
        self._stopped = False
        #: Cancelled by its consumer: what it had not settled went back to the queue.
        self.finished = False
        self._told = False  # on_cancelled/on_moved at most once

    @property
    def tag(self) -> Optional[str]:
        """The consumer tag (None before the consume is written)."""
        return self._tag

    def holds(self, chan: Any) -> bool:
        """Subscribed on ``chan`` and not cancelled."""
        shared = self._shared
        return shared is not None and shared.chan is chan and not self._stopped

    def cancel_by_user(self) -> None:
        """``message.channel.close()``: cancel the consumer (its owner's cancel, else this subscription's)."""
        if self._on_close is not None:
            self._on_close()
        else:
            self.cancel()

    def start(self, queue: kombu.Queue, prepare: Callable[[Any], None], no_ack: bool,
              arguments: Optional[dict[str, Any]], pipelined: Optional[Pipelined] = None,
              isolated: bool = False) -> None:
        channels = self._link.consumer_channels
        for _ in range(3):  # a channel another consumer broke just now: take the next
            shared = channels.adopt(self._link.open_channel(), 1) if isolated else channels.reserve()
            try:
                with shared.subscribing:
                    if shared.broken:
                        channels.leave(shared, None)
                        continue
                    # Known before the consume is written: an exception raised
                    # into this thread from here on leaves something close() undoes.
                    self._shared, self._joined = shared, False
                    chan = shared.chan
                    if pipelined is None:
                        shared.prefetch = None  # prepare() sets its own qos
                        prepare(chan)
                    else:
                        # One round trip: the broker answers in order, so the
                        # consume-ok (or the declare's error) proves the rest.
                        chan.carrot.defer_flush = True
                        try:
                            if pipelined.declare is not None:
                                pipelined.declare(chan)
                            shared.qos(pipelined.prefetch)
                        finally:
                            chan.carrot.defer_flush = False
                    # Known before the consume is written: its first deliveries
                    # may reach the callback (and its acks the ConsumerChannel,
                    # which settles only this tag's) before consume-ok is read.
                    self._tag = new_consumer_tag()
                    chan.consume_internal(queue.name, self._on_delivery, lambda tag: self.cancelled(_BROKER_CANCEL),
                                          no_ack=no_ack, arguments=arguments, tag=self._tag)
            except BaseException:
                # The channel is closed (a 404...) or in doubt (a timeout): its
                # other consumers move to another one.
                self._shared, self._tag = None, None
                channels.leave(shared, None)
                if not shared.broken:
                    channels.discard(shared)
                raise
            if channels.join(shared, self):
                return
            # Closed between consume-ok and now: its deliveries were requeued
            # (their acks are dropped with the channel); subscribe elsewhere.
            self._shared = None
        raise Disconnected("no consumer channel could be kept (each closed while subscribing)")

    def begin(self, chan: Any, queue: kombu.Queue, no_ack: bool, arguments: Optional[dict[str, Any]]) -> None:
        """Write the consume (``nowait``) in a pipelined chunk (see :meth:`AmqpLink.subscribe_batch`)."""
        self._tag = new_consumer_tag()
        chan.consume_internal(queue.name, self._on_delivery, lambda tag: self.cancelled(_BROKER_CANCEL),
                              no_ack=no_ack, arguments=arguments, nowait=True, tag=self._tag)

    def joined(self, shared: SharedChannel) -> bool:
        """The chunk was accepted: take the reserved place (False: the channel broke meanwhile)."""
        self._shared = shared
        if self._link.consumer_channels.join(shared, self):
            return True
        self._shared = None
        self.forget()
        return False

    def forget(self) -> None:
        """A pipelined subscribe that did not hold: nothing of it stays (its channel is closed)."""
        self._tag = None

    def stop(self) -> None:
        shared, tag = self._shared, self._tag
        if shared is None or tag is None or self._stopped:
            return
        quietly(lambda: shared.chan.basic_cancel(tag), "cancelling a consumer")
        self._stopped = True

    def cancel(self) -> None:
        # The place is given up last: a cancel interrupted anywhere (an
        # exception raised into this thread) is done again by the next one.
        shared = self._shared
        if shared is None:
            return
        self.stop()
        self._give_back(shared)
        self._link.consumer_channels.leave(shared, self, wait=True)
        self._shared = None

    def _give_back(self, shared: SharedChannel) -> None:
        """After the cancel-ok: requeue what this consumer left unsettled, as closing its own channel would.

        The channel stays open for the others: unsettled, its deliveries
        would stay with it (and count against the queue) until it closes.
        """
        chan, tag = shared.chan, self._tag
        self.finished = True  # from here on, a late ack of one of them is dropped (see ConsumerChannel)
        if tag is None or chan.carrot.writes_dropped():
            return  # the close gives them back
        def requeue_all() -> None:
            for delivery_tag in chan.carrot.owed_to(tag):
                chan.basic_reject(delivery_tag, True)

        quietly(requeue_all, "requeueing a cancelled consumer's deliveries")

    def close(self) -> None:
        shared = self._shared
        if shared is not None:
            self._shared = None
            if (self._link.dead is None and not self._stopped
                    and shared.chan.carrot.sinks.get(self._tag or "") is not None):
                # Others go on on this channel: this consumer's deliveries must stop.
                chan, tag = shared.chan, self._tag or ""
                quietly(lambda: chan.basic_cancel(tag, nowait=True), "cancelling a consumer")
                # No cancel-ok will come: deliveries still on their way are
                # requeued as for an unknown consumer.
                for table in (chan.carrot.sinks, chan.carrot.cancel_sinks, chan.callbacks):
                    table.pop(tag, None)
            self._link.consumer_channels.leave(shared, self)

    # -- the reading thread ------------------------------------------------------------------------

    def cancelled(self, reason: Optional[str] = None) -> None:
        if not self._told:
            self._told = True
            self._on_cancelled(reason)

    def moved(self) -> None:
        if not self._told:
            self._told = True
            self._on_moved()

    # -- deliveries ------------------------------------------------------------------------------

    def alive(self, raw: Any = None) -> bool:
        if self._link.dead is not None:
            return False
        return raw is None or not raw.channel.carrot.writes_dropped()

    @contextlib.contextmanager
    def acting(self) -> Iterator[None]:
        previous = acting_for(self._tag)
        try:
            yield
        finally:
            acting_for(previous)

    def message(self, raw: Any) -> Any:
        chan = raw.channel
        facade = self._facade
        if facade is None or not facade.bound_to(chan):
            # Acks are per channel: bound to the one this delivery came on.
            facade = self._facade = ConsumerChannel(chan, self)
        return chan.Message(raw, channel=facade)

    def reject(self, message: Any, raw: Any) -> None:
        try:
            if message is not None:
                message.reject(requeue=False)
            else:
                raw.channel.basic_reject(raw.delivery_tag, requeue=False)
        except Exception:  # noqa: BLE001 - the channel may be gone: the broker redelivers then
            logger.debug("carrot_kombu could not reject an undecodable delivery", exc_info=True)

    def requeue(self, raw: Any) -> None:
        chan = raw.channel
        if chan.carrot.writes_dropped():
            return  # the channel's close gave it back already
        quietly(lambda: chan.basic_reject(raw.delivery_tag, requeue=True), "requeueing a delivery")


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
