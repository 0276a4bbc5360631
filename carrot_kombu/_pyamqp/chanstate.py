"""What carrot_kombu adds to a py-amqp channel, owned in one place: :class:`ChanState`.

Each channel gets one attribute of ours, ``carrot`` (a :class:`ChanState`):
its phase (:class:`ChannelPhase`), the replies and confirms awaited on it,
and what a borrower changed that the next one must not inherit.
"""

from __future__ import annotations

import enum
import logging
import threading
from time import monotonic
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Union

from amqp import spec
from amqp.exceptions import RecoverableConnectionError

from ..exceptions import CarrotKombuError, ReplyTimeout
from .callbacks import EventQueue
from .replies import Reply, copy_error

if TYPE_CHECKING:
    from .connstate import ConnState

__all__ = ("ChanState", "ChannelPhase", "NotOutstanding", "acting_for")

logger = logging.getLogger("carrot_kombu.amqp")

#: Who the current thread settles deliveries for (a consumer tag: the
#: consumer whose callback runs, or whose message is being acked): a channel
#: shared by several consumers that the broker closes for a bad ack (406)
#: knows whose ack it was.
_acting = threading.local()


def acting_for(token: Any) -> Any:
    """Make ``token`` the current thread's settler; returns the previous one (to restore)."""
    previous = getattr(_acting, "token", None)
    _acting.token = token
    return previous


class ChannelPhase(enum.Enum):
    """Where a channel is in its life; it only moves forward."""

    #: Usable.
    OPEN = "open"
    #: channel.close written (by us, or received from the broker): nothing but
    #: the close's answer is written or dispatched on it any more.
    CLOSING = "closing"
    #: Its id is free (close-ok seen, or collected with the connection).
    CLOSED = "closed"


#: (A module constant: ``reusable`` runs twice per lease.)
_OPEN = ChannelPhase.OPEN

#: Settling methods: whether they take a ``multiple`` flag (basic.reject does not).
_SETTLING: dict[Any, bool] = {spec.Basic.Ack: True, (60, 120): True, spec.Basic.Reject: False}

#: What a method changes that the next borrower would inherit: a reason, or
#: a function of the method's arguments giving one (or None: nothing).
_INHERITED: dict[Any, Union[str, Callable[[tuple[Any, ...]], Optional[str]]]] = {
    spec.Channel.Flow: lambda args: "channel.flow(active=False)" if args and not args[0] else None,
    spec.Tx.Select: "tx_select (transaction mode)",
    # The next borrower's tx_select would fail (406), its publishes be numbered.
    spec.Confirm.Select: "confirm_select (confirm mode)",
    spec.Basic.Qos: "basic_qos (prefetch)",
}


class ChanState:
    """What carrot_kombu tracks about one channel; its writes are atomic with its state.

    ``lock`` is held only for bookkeeping and a non-blocking enqueue, never
    while waiting, so the reading thread may take it too.
    """

    def __init__(self, chan: Any, conn: "ConnState") -> None:
        self.chan = chan
        self.conn = conn
        self.lock = threading.Lock()
        self.replies: dict[Any, Reply] = {}
        #: The broker closed the channel with this error.
        self.error: Optional[BaseException] = None
        #: Changed only by begin_close() and mark_closed().
        self.phase = ChannelPhase.OPEN
        #: We wrote channel.close: its close-ok frees the id, even if the
        #: broker's own close crossed ours.
        self.close_sent = False
        #: Why the channel must not be reused (an abandoned request...).
        self.spoiled: Optional[str] = None
        #: channel.open was interrupted before we knew whether it was sent: a
        #: late open-ok closes the channel (see SupervisedConnection.channel).
        self.abandoned_open = False
        #: What a borrower changed that the next one would inherit (tx mode,
        #: prefetch, flow): the channel is closed on release, not pooled.
        self.changed: Optional[str] = None
        #: Delivery tags received and not yet settled, each with the consumer
        #: tag it came for (None: a basic_get): closing the channel is what
        #: hands them back to the broker (pooled, they stay unacked).  On a
        #: channel shared by consumers it tells whose a delivery is.
        self.unacked: dict[int, Optional[str]] = {}
        #: The highest delivery tag recorded in ``unacked`` (tags grow per channel):
        #: a tag at or below it that is no longer there was settled already.
        self.last_delivered = 0
        #: The settler (see :func:`acting_for`) that wrote an ack/reject of a
        #: tag not outstanding here: the broker closes the channel for it (406).
        self.offender: Any = None
        #: Written without a reply since the last sync point: a late channel
        #: error may still come (a publish to a missing exchange, an ack with a
        #: bad tag), so the channel is verified before another borrower gets it.
        self.unverified = False
        self.confirm_mode = False
        #: A pipelined batch is being written: requests without a reply are
        #: only queued; the batch's closing request sends everything at once.
        self.defer_flush = False
        self.next_tag = 1
        self.confirm_waiters: dict[int, Reply] = {}
        # -- internal hooks (our code; run on the reading thread; must not block) --
        self.on_confirm: Optional[Callable[[int, bool, bool], None]] = None
        self.on_return: Optional[Callable[[BaseException, str, str, Any], None]] = None
        self.on_closed: Optional[Callable[[BaseException, Any], None]] = None
        self.sinks: dict[str, Callable[[Any], None]] = {}
        self.cancel_sinks: dict[str, Callable[[str], None]] = {}
        self.events: EventQueue = conn.events
        #: Called once when the channel closes or is collected (the transport
        #: gives its lease back); must not block.
        self.on_gone: list[Callable[[Any], None]] = []
        self._gone = False

    def gone(self) -> None:
        """The channel is closing or closed: tell whoever holds it (once)."""
        if self._gone:
            return
        self._gone = True
        for hook in self.on_gone:
            try:
                hook(self.chan)
            except Exception:  # pragma: no cover - our own hooks
                logger.exception("carrot_kombu: error in a channel-gone hook")

    # -- phase ----------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        """A close has begun (ours or the broker's): CLOSING or CLOSED."""
        return self.phase is not ChannelPhase.OPEN

    @property
    def closed(self) -> bool:
        """Gone for good: its id is free (or freed with the connection)."""
        return self.phase is ChannelPhase.CLOSED

    def begin_close(self) -> bool:
        """OPEN -> CLOSING (under ``lock``); False if a close had already begun."""
        if self.phase is not ChannelPhase.OPEN:
            return False
        self.phase = ChannelPhase.CLOSING
        return True

    def mark_closed(self) -> None:
        """-> CLOSED (the id is freed, or the connection is gone)."""
        self.phase = ChannelPhase.CLOSED

    def writes_dropped(self) -> bool:
        """Settlements (acks, rejects) are dropped, not errors: the channel is closing or failed."""
        return self.phase is not ChannelPhase.OPEN or self.error is not None

    # -- questions ------------------------------------------------------------------------

    def reusable(self) -> bool:
        """May be handed to another borrower: open, healthy, no consumers, nothing in flight."""
        chan = self.chan
        return not (
            self.error or self.spoiled or self.phase is not _OPEN or self.conn.dead
            or chan.callbacks or self.replies or self.confirm_waiters or self.changed or self.unacked
        ) and chan.is_open

    def clear_to_write(self, high_water: int) -> bool:
        """Nothing to wait for or raise before queueing a write: open, healthy, not blocked, room in the buffer.

        One call on the hot path (a publish) instead of :meth:`failure`, the
        block check and the buffer's room (measured: ~2k instructions per
        publish); any False is looked at in full by the writer.
        """
        conn = self.conn
        wire = conn.wire
        return (self.phase is ChannelPhase.OPEN and self.error is None and self.spoiled is None
                and conn.dead is None and conn.blocked is None and wire is not None
                and wire.pending_bytes <= high_water)

    def failure(self) -> Optional[BaseException]:
        """Why a request on this channel cannot proceed (None: it can)."""
        if self.conn.dead is not None:
            return self.conn.disconnected()
        if self.error is not None:
            return copy_error(self.error)
        if self.spoiled is not None:
            return CarrotKombuError(f"this channel can no longer be used: {self.spoiled}; take a new lease")
        if self.phase is not ChannelPhase.OPEN:
            closed: BaseException = RecoverableConnectionError("channel is closed")
            return closed
        return None

    # -- requests -------------------------------------------------------------------------

    def expect(self, methods: Iterable[Any], on_arrival: Optional[Callable[[Reply], None]] = None) -> Reply:
        """Register the reply to a request about to be written.

        Two threads on one channel (kombu's and Celery's code shares channels
        between a worker's threads) are served in turn: a request whose reply
        another request on this channel already waits for is written after
        that reply came (the broker answers a channel's requests in order),
        within ``reply_timeout``.

        Raises:
            ReplyTimeout: The earlier request's reply did not come within
                ``reply_timeout``.
            Exception: The channel failed meanwhile (see :meth:`failure`).
        """
        reply = Reply(methods, on_arrival)
        deadline: Optional[float] = None
        while True:
            with self.lock:
                ahead = next((self.replies[sig] for sig in reply.methods if sig in self.replies), None)
                if ahead is None:
                    for sig in reply.methods:
                        self.replies[sig] = reply
                    return reply
            if deadline is None:
                deadline = monotonic() + self.conn.reply_timeout
            elif monotonic() >= deadline:
                raise ReplyTimeout(
                    f"another request on this channel waited for its reply longer than "
                    f"reply_timeout={self.conn.reply_timeout:g}s"
                )
            # Until the one ahead is answered, failed or given up (forgotten).
            self.conn.wait_for(ahead, deadline, lambda: ahead not in self.replies.values())  # noqa: B023 - called within this iteration
            failure = self.failure()
            if failure is not None:
                raise failure

    def forget(self, reply: Reply) -> None:
        with self.lock:
            for sig in reply.methods:
                if self.replies.get(sig) is reply:
                    del self.replies[sig]

    def delivered(self, tag: int, consumer_tag: Optional[str] = None) -> None:
        """A delivery that must be settled arrived (reading thread, or basic_get's caller)."""
        with self.lock:
            self.unacked[tag] = consumer_tag
            if tag > self.last_delivered:
                self.last_delivered = tag

    def forget_delivery(self, tag: int) -> None:
        """A delivery settled by our own code without ``send_method`` (the reading thread's reject)."""
        with self.lock:
            self.unacked.pop(tag, None)

    def owes(self, tag: int, consumer_tag: Optional[str]) -> bool:
        """``tag`` is an unsettled delivery of consumer ``consumer_tag`` on this channel."""
        return consumer_tag is not None and self.unacked.get(tag) == consumer_tag

    def owed_to(self, consumer_tag: str) -> list[int]:
        """The unsettled delivery tags of consumer ``consumer_tag``, oldest first."""
        with self.lock:
            return [tag for tag, owner in self.unacked.items() if owner == consumer_tag]

    def borrower_changed(self, sig: Any, args: tuple[Any, ...]) -> Optional[Callable[[], None]]:
        """The borrower is about to send ``sig``: note what the next borrower must not inherit.

        Returns:
            For a settlement, what undoes its booking should it not be
            written after all (an event loop's ack that would wait: retried
            on another thread, it must still find its delivery unsettled).
        """
        multiple_allowed = _SETTLING.get(sig)
        if multiple_allowed is not None:
            settled = self._settling(args, multiple_allowed)
            tag = int(args[0]) if args else 0
            if not settled and 0 < tag <= self.last_delivered and getattr(self.chan, "shared_by_consumers", False):
                # Settled already (a cancel's give-back, another thread's ack):
                # written, the broker would close the channel of every
                # consumer on it (406 unknown delivery tag).  Checked and
                # booked under the lock: of two racing settlements one goes
                # out.  A tag never delivered here is written (the broker's
                # 406 then names its consumer, see acting_for).
                raise NotOutstanding(tag)
            return lambda: self._unsettle(settled)
        rule = _INHERITED.get(sig, "basic_recover")  # basic.recover: redelivers on this channel
        change = rule(args) if callable(rule) else rule
        if change:
            self.changed = self.changed or change
        return None

    def _settling(self, args: tuple[Any, ...], multiple_allowed: bool) -> dict[int, Optional[str]]:
        """Book a settlement; returns the deliveries it settles (tag: consumer tag)."""
        tag = int(args[0]) if args else 0
        multiple = multiple_allowed and len(args) > 1 and bool(args[1])
        with self.lock:
            if tag and tag not in self.unacked and self.offender is None:
                self.offender = getattr(_acting, "token", None)
            if multiple or tag == 0:
                # tag 0 with multiple: everything outstanding.
                settled = {t: owner for t, owner in self.unacked.items() if not tag or t <= tag}
                self.unacked = {t: owner for t, owner in self.unacked.items() if tag and t > tag}
                return settled
            if tag in self.unacked:
                return {tag: self.unacked.pop(tag)}
            return {}

    def _unsettle(self, settled: dict[int, Optional[str]]) -> None:
        with self.lock:
            self.unacked.update(settled)

    def spoil(self, why: str) -> None:
        self.spoiled = self.spoiled or why

    def resolve(self, sig: Any, args: tuple[Any, ...]) -> bool:
        """On the reading thread: hand a reply to its waiter; False if nobody waits."""
        with self.lock:
            reply = self.replies.get(sig)
            if reply is None:
                return False
            for m in reply.methods:
                self.replies.pop(m, None)
        reply.resolve((sig, *args))
        return True

    def fail_all(self, error: BaseException, keep: tuple[Any, ...] = ()) -> None:
        """The channel is gone: every waiter on it gets ``error`` (but those for ``keep``)."""
        with self.lock:
            kept = {sig: r for sig, r in self.replies.items() if sig in keep}
            replies = {r for sig, r in self.replies.items() if sig not in keep} | set(self.confirm_waiters.values())
            self.replies = kept
            self.confirm_waiters.clear()
        for reply in replies:
            reply.fail(copy_error(error))

    # -- confirms (reading thread) -------------------------------------------------------------

    def confirmed(self, tag: int, multiple: bool, ack: bool) -> None:
        # Under the writers' lock: a confirm is never handled between a
        # writer's booking of its tags and the end of its write.
        with self.lock:
            hook = self.on_confirm
            if hook is not None:
                hook(tag, multiple, ack)
            if not self.confirm_waiters:
                return
            if multiple:
                done = [t for t in self.confirm_waiters if t <= tag]
            else:
                done = [tag] if tag in self.confirm_waiters else []
            replies = [self.confirm_waiters.pop(t) for t in done]
        for reply in replies:
            reply.resolve(("ack" if ack else "nack",))


class NotOutstanding(Exception):
    """A settlement of a delivery no longer outstanding on a channel shared by consumers: not written."""

    carrot_not_written = True

    def __init__(self, tag: int) -> None:
        super().__init__(f"delivery {tag} is settled already")
        self.tag = tag
