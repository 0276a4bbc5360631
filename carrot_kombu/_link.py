"""The one fence between the manager and the wire: a *link* is one established connection.

The supervisor makes a link per successful connection attempt (through
:func:`carrot_kombu._connect.open_link`) and throws it away when it dies;
nothing about a link is ever reused.  Everything above this module (pool,
publisher, consumers, recovery, the kombu transport) talks to a link only
through the methods defined here; two implementations exist:

* :class:`carrot_kombu._pyamqp.link.AmqpLink` over py-amqp (a service
  thread, heartbeats, callers that read for themselves, drop without
  handshake);
* :class:`carrot_kombu._memory.MemoryLink` over kombu's in-process
  ``memory://`` transport (and its subclasses, which is how unit tests inject
  faults).

A link reports to its owner through :class:`LinkHooks`; the publisher's
confirm channel reports through :class:`ConfirmHooks`; a consumer's
subscription through two callables.  Every hook runs on whichever thread
read the event (never user code, never blocking).
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

import kombu

from ._pyamqp.outbound import Outbound
from ._pyamqp import Waiter
from ._sync import raised_by_library
from .config import Endpoint
from .exceptions import Disconnected

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

__all__ = (
    "BatchItem",
    "ConfirmChannel",
    "Pipelined",
    "ConfirmHooks",
    "Link",
    "LinkHooks",
    "Outbound",
    "Subscription",
    "Waiter",
    "establish_once",
    "guarded",
    "quietly",
)

logger = logging.getLogger("carrot_kombu")

LostCallback = Callable[["Link", BaseException], None]
Delivery = Callable[[Any], None]


class LinkHooks:
    """What a link reports to its supervisor (from any thread; must not block)."""

    __slots__ = ("on_lost", "on_blocked", "on_unblocked")

    def __init__(
        self,
        on_lost: LostCallback,
        on_blocked: Callable[["Link", str], None],
        on_unblocked: Callable[["Link"], None],
    ) -> None:
        self.on_lost = on_lost
        self.on_blocked = on_blocked
        self.on_unblocked = on_unblocked


class ConfirmHooks:
    """What a confirm channel reports to the publisher (reading thread; must not block).

    Attributes:
        on_confirm: ``(delivery_tag, multiple, ack)``.
        on_return: ``(error, exchange, routing_key, message)`` for a returned
            mandatory message (the ack that follows settles it).
        on_closed: ``(error, about_publish)``: the broker closed the channel;
            ``about_publish`` is True when it names ``basic.publish``.
    """

    __slots__ = ("on_confirm", "on_return", "on_closed")

    def __init__(
        self,
        on_confirm: Callable[[int, bool, bool], None],
        on_return: Callable[[BaseException, str, str, Any], None],
        on_closed: Callable[[BaseException, bool], None],
    ) -> None:
        self.on_confirm = on_confirm
        self.on_return = on_return
        self.on_closed = on_closed


class ConfirmChannel:
    """A channel in confirm mode carrying :class:`Outbound` messages."""

    #: Most seconds one request waits for the broker (a careful republish, say).
    reply_timeout: float = 10.0

    def write(self, messages: list[Outbound], on_queued: Callable[[int, bool], None],
              deadline: Optional[float] = None, flush: bool = True) -> None:
        """Write ``messages`` with consecutive delivery tags, in one go.

        ``flush=False``: only queue them for the socket; :meth:`flush` soon.

        ``on_queued(first_tag, True)`` runs before any confirm of them can be
        read; ``on_queued(first_tag, False)`` undoes it if they could not be
        queued.

        Raises:
            Blocked: The broker blocked the connection (nothing was sent).
            PublishTimeout: Blocked past ``deadline`` (nothing was sent).
            Exception: The channel or the connection is going.
        """
        raise NotImplementedError

    def flush(self, wait: bool = False, loop: Optional[asyncio.AbstractEventLoop] = None) -> bool:
        """Send what ``write(flush=False)`` queued; False if the socket did not take it all now.

        Without ``wait`` it never waits (an event loop); with it, it sends
        until done (a helper thread), unless the connection fails.  ``loop``:
        the event loop flushing (on its thread), which awaits the confirms;
        it may read the connection itself meanwhile (``_pyamqp.loopturn``).
        """
        return True

    def wait(self, waiter: Waiter, deadline: Optional[float],
             interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Until ``waiter.ready()`` (True), ``deadline`` or ``interrupt()`` (False)."""
        raise NotImplementedError

    def wait_confirm(self, waiter: Waiter, deadline: Optional[float], what: Callable[[], str]) -> bool:
        """Wait for a message's confirm: True once ``waiter.ready()``, False at ``deadline``.

        Raises:
            Blocked: The broker blocked the connection longer than
                ``blocked_timeout`` (``what()`` completes the message).
            Disconnected: The connection was lost.
        """
        raise NotImplementedError

    def failure(self) -> Optional[BaseException]:
        """Why nothing more can be written here (None: it can)."""
        raise NotImplementedError


class Subscription:
    """One consumer's subscription on one link (made by :meth:`Link.subscription`).

    A subscription may share its channel with other consumers' (see
    :class:`carrot_kombu._pyamqp.link.ConsumerChannels`): nothing here
    closes a channel another subscription still uses.
    """

    def start(self, queue: kombu.Queue, prepare: Callable[[Any], None], no_ack: bool,
              arguments: Optional[dict[str, Any]], pipelined: Optional["Pipelined"] = None,
              isolated: bool = False) -> None:
        """Take a channel, run ``prepare(channel)`` (declare, qos), subscribe (I/O).

        ``isolated``: on a new channel, shared with nobody yet (a consumer
        the broker refused before: its next refusal closes no neighbour's).

        With ``pipelined``, a link that can writes its declare and qos
        without awaiting them, and awaits only the consume (one round trip;
        a refused declare fails the consume with the broker's error).

        Raises:
            Exception: What the broker answered; nothing stays subscribed then.
        """
        raise NotImplementedError

    def stop(self) -> None:
        """Ask the broker to stop delivering (``basic.cancel``; best effort, bounded)."""

    def cancel(self) -> None:
        """Cancel at the broker and give the channel up (best effort, bounded)."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the channel up without waiting (never blocks)."""
        raise NotImplementedError

    def alive(self, raw: Any = None) -> bool:
        """An ack of ``raw`` (or of any delivery, without it) can still reach the broker."""
        raise NotImplementedError

    def acting(self) -> "contextlib.AbstractContextManager[None]":
        """While a callback of this subscription runs: acks written are this subscription's."""
        return contextlib.nullcontext()

    def message(self, raw: Any) -> Any:
        """A delivery as a kombu message (``decode()``, ``ack()``...)."""
        raise NotImplementedError

    def reject(self, message: Any, raw: Any) -> None:
        """Reject a delivery without requeue (best effort)."""
        raise NotImplementedError

    def requeue(self, raw: Any) -> None:
        """Give back a delivery the callback never saw (best effort; dropped if its channel is gone)."""


class Pipelined:
    """A subscribe's declare and qos, for writing them without awaiting (see :meth:`Subscription.start`).

    Attributes:
        declare: ``declare(channel)`` awaiting nothing (``None``: nothing to declare).
        prefetch: The consumer's ``prefetch_count`` (0: no limit).
    """

    __slots__ = ("declare", "prefetch")

    def __init__(self, declare: Optional[Callable[[Any], None]], prefetch: int) -> None:
        self.declare = declare
        self.prefetch = prefetch


class BatchItem:
    """One consumer's subscribe in :meth:`Link.subscribe_batch`.

    Attributes:
        subscription: Made by :meth:`Link.subscription` (not started).
        queue: What to consume.
        prepare: ``prepare(channel)``: declare and qos, awaiting each reply.
        declare: ``declare(channel)``: only the declare, awaiting nothing
            (``None``: nothing to declare).
        prefetch: The consumer's ``prefetch_count`` (0: no limit).
    """

    __slots__ = ("subscription", "queue", "prepare", "declare", "prefetch", "no_ack", "arguments")

    def __init__(self, subscription: Subscription, queue: kombu.Queue, prepare: Callable[[Any], None],
                 declare: Optional[Callable[[Any], None]], prefetch: int, no_ack: bool,
                 arguments: Optional[dict[str, Any]]) -> None:
        self.subscription = subscription
        self.queue = queue
        self.prepare = prepare
        self.declare = declare
        self.prefetch = prefetch
        self.no_ack = no_ack
        self.arguments = arguments


class Link:
    """An established connection; subclasses implement the transport specifics."""

    #: Seconds between two supervisor checks while connected.
    tick_interval: float = 1.0

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection) -> None:
        self.generation = generation
        self.endpoint = endpoint
        self.kombu = kombu_connection
        #: Set by the pool: closes idle pooled channels to free channel ids.
        self.make_room: Optional[Callable[[], bool]] = None

    # -- life (the supervisor) -----------------------------------------------------------------

    def start(self, hooks: LinkHooks) -> None:
        """Begin servicing the connection."""

    def tick(self) -> None:
        """Liveness; raises when the connection is dead."""

    @property
    def dead(self) -> Optional[BaseException]:
        """Why the connection is dead (None while it lives)."""
        return None

    def abort(self, exc: BaseException) -> None:
        """From any thread: the connection is dead now; wakes every waiter, never blocks."""

    def kill(self, exc: BaseException) -> None:
        """Drop a dead connection without any handshake; never blocks."""

    def close(self, timeout: float) -> None:
        """Close politely (used by ``stop()``), falling back to :meth:`kill`."""

    def disown(self) -> None:
        """In a forked child: make every use fail, without any I/O on the shared socket."""

    # -- what it is --------------------------------------------------------------------------

    def negotiated(self) -> dict[str, Any]:
        return {"heartbeat": None, "frame_max": None, "channel_max": None}

    def server(self) -> dict[str, Optional[str]]:
        props = self.server_properties
        return {"product": _text(props.get("product")), "version": _text(props.get("version"))}

    @property
    def server_properties(self) -> dict[str, Any]:
        return {}

    def silent_for(self) -> float:
        """Seconds since the broker last sent anything (0 where unknown)."""
        return 0.0

    # -- channels -------------------------------------------------------------------------------

    def open_channel(self, deadline: Optional[float] = None) -> Any:
        """Open a new channel (I/O: call without locks), its reply awaited until ``deadline`` at most.

        Raises:
            socket.timeout: ``deadline`` passed first.
            ChannelLimitReached: Every channel id is taken.
            Disconnected: The connection is lost.
        """
        raise NotImplementedError

    def close_channel(self, chan: Any, wait: bool = False) -> None:
        """Close ``chan``; with ``wait``, until the broker answered (bounded). Never raises a library error."""
        raise NotImplementedError

    def preflight(self, check: Callable[[Any], None]) -> bool:
        """Run ``check(channel)`` on a channel of its own, closed after (I/O).

        Before a consumer joins a channel shared with others, what the broker
        may refuse (its queue's declare, or a passive one) is tried here, so
        that a 404/406 closes this channel alone and no neighbour's.

        Returns:
            False where nothing was run (consumers do not share channels here).

        Raises:
            Exception: What ``check`` raised (the broker's refusal).
        """
        return False

    def reusable(self, chan: Any) -> bool:
        """May ``chan`` go to another borrower as it is?"""
        return False

    def needs_verify(self, chan: Any) -> bool:
        """Could a late error of what ``chan`` wrote still arrive (see :meth:`verify`)?"""
        return False

    def idle_ready(self, chan: Any) -> bool:
        """May ``chan`` go back to the idle list as it is: reusable, and nothing to verify.

        One call for the pool's every release (a link may answer both
        questions at once, more cheaply).
        """
        return self.reusable(chan) and not self.needs_verify(chan)

    def verify(self, chan: Any, on_done: Callable[[bool], None]) -> bool:
        """Start checking ``chan`` without waiting; ``on_done(ok)`` follows from the reading thread."""
        return False

    def channel_error(self, chan: Any) -> Optional[BaseException]:
        """The error the broker closed ``chan`` with, if any (for logs)."""
        return None

    def open_confirm_channel(self, hooks: ConfirmHooks) -> ConfirmChannel:
        """A new channel in confirm mode reporting to ``hooks`` (I/O)."""
        raise NotImplementedError

    def subscription(self, on_delivery: Delivery, on_cancelled: Callable[[Optional[str]], None],
                     on_moved: Optional[Callable[[], None]] = None, on_close: Optional[Callable[[], None]] = None,
                     borrow: Optional[Callable[[], Any]] = None) -> Subscription:
        """A consumer's subscription (no I/O until :meth:`Subscription.start`).

        ``on_delivery(raw)``, ``on_cancelled(reason)`` (the broker cancelled
        it, or closed its channel because of it; ``reason`` says how, with
        the broker's reply text, or is None) and ``on_moved()`` (the broker
        closed a channel it shared, because of another consumer: it must
        subscribe again at once; ``on_cancelled`` when not given) run on the
        reading thread and must only queue.

        A link whose subscriptions share channels gives the consumer's
        messages a channel of their own to settle on: ``on_close()`` is its
        ``close()`` (the consumer's cancel, on the callback's thread), and
        ``borrow()`` (a context manager yielding a pool lease) runs its other
        requests, so that none reaches the shared channel.
        """
        raise NotImplementedError

    def declare_batch(self, declares: list[Callable[[Any], None]]) -> list[bool]:
        """Run many ``declare(channel)`` that await nothing, pipelined; for each, whether it was accepted.

        False ones are left to the caller's one-by-one path (which tells each
        error apart); the default pipelines nothing.

        Raises:
            Exception: A connection-level failure (which declare caused it is unknown).
        """
        return [False] * len(declares)

    def subscribe_batch(self, batch: list["BatchItem"]) -> list[bool]:
        """Subscribe many at once (recovery); for each, whether it is subscribed.

        A pipelining link writes many subscribes before it awaits anything;
        the default starts them one by one.  Those that could not be
        subscribed this way (False) are left to the caller's one-by-one
        path, which tells each error apart.

        Raises:
            Exception: A connection-level failure.
        """
        done = []
        for item in batch:
            try:
                item.subscription.start(item.queue, item.prepare, item.no_ack, item.arguments)
            except Disconnected:
                raise
            except Exception:  # noqa: BLE001 - told apart by the caller's one-by-one retry
                logger.debug("batched subscribe of %r failed", item.queue.name, exc_info=True)
                done.append(False)
            else:
                done.append(True)
        return done

    # -- user callbacks (the kombu transport) ------------------------------------------------

    def drain_events(self, timeout: Optional[float]) -> None:
        """Run queued kombu callbacks in this thread, waiting up to ``timeout`` for one."""
        raise NotImplementedError

    def callback_queue(self) -> Any:
        """A queue of kombu callbacks for one kombu connection (``drain``, ``fileno``, ``close``)."""
        raise Disconnected("this transport has no callback queues")

    def adopt(self, chan: Any, callbacks: Any, on_gone: Callable[[Any], None]) -> None:
        """Route ``chan``'s kombu callbacks to ``callbacks``; ``on_gone(chan)`` once it closes."""

    @property
    def socket_transport(self) -> Any:
        """py-amqp's transport object (``.sock``), where there is one."""
        return None


def quietly(action: Callable[[], Any], what: str) -> None:
    """Run a best-effort cleanup step (closing a channel...): a library error is logged, never raised.

    An exception a signal handler raised into this thread is the caller's:
    it goes through unchanged.
    """
    try:
        action()
    except Exception as exc:
        if not raised_by_library(exc):
            raise  # a signal handler's, for the caller
        logger.debug("ignored error while %s", what, exc_info=True)


def establish_once(conn: kombu.Connection) -> Any:
    """Exactly one connection attempt through kombu's public API (no retry, no sleep).

    A failed attempt leaves nothing open (``conn`` is collected).

    Raises:
        Exception: What the transport raised (kombu's wrapping undone).
    """
    try:
        failure: Optional[BaseException] = None
        try:
            conn.ensure_connection(max_retries=0)
        except kombu.exceptions.OperationalError as exc:
            failure = exc.__cause__ or exc
        if failure is not None:
            # Raised outside the handler: inside it, kombu's wrapper would
            # become the __context__ of its own __cause__, a loop in the chain
            # (code that walks causes without a seen-set never ends).
            raise failure
    except BaseException:
        quietly(conn.collect, "dropping a failed connection attempt")
        raise
    return conn.connection


_GUARD_ATTR = "_carrot_kombu_established"


def guarded(base: type) -> type:
    """``base`` with one ``establish_connection`` per transport instance.

    kombu's ``ensure()``/revive paths reconnect a lost connection on their
    own thread; that connection would belong to nobody.  Only the
    supervisor's single attempt is allowed.
    """

    def establish_connection(self: Any) -> Any:
        if getattr(self, _GUARD_ATTR, False):
            raise Disconnected("this connection is owned by a carrot_kombu manager; take a new lease")
        setattr(self, _GUARD_ATTR, True)
        return base.establish_connection(self)  # type: ignore[attr-defined]

    return type(f"Supervised{base.__name__}", (base,), {"establish_connection": establish_connection,
                                                        "__module__": __name__})


def _text(value: Any) -> Optional[str]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
