"""The bounded channel pool and the leases it hands out.

A lease is one borrower's: nothing a borrower did may reach the next one.
So a channel goes back to the pool only if it is healthy (no error, no
request abandoned half-way, no consumer), and a channel that wrote something
the broker may still refuse later (a publish to a missing exchange, an ack
with a wrong tag) is verified first: on release the pool sends
``channel.flow(active=True)`` without waiting, and the channel becomes idle
when the broker answers (or is dropped if the late error comes instead).
"""

from __future__ import annotations

import logging
import socket
import threading
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any, Optional

from amqp.exceptions import ChannelError
from amqp.exceptions import ConnectionError as AMQPConnectionError

from ._deadline import Deadline
from ._metrics import Metrics, now
from ._sync import Monitor, owned, run_locked
from .exceptions import Blocked, CarrotKombuError, ChannelLimitReached, Disconnected, PoolTimeout, PublishTimeout
from .status import PoolStatus

if TYPE_CHECKING:
    from ._link import Link
    from ._live import LiveConnection

__all__ = ("ChannelPool", "Lease")

logger = logging.getLogger("carrot_kombu")

_COLLECTED = ("carrot_kombu: a lease was garbage-collected without release(); its channel went back "
              "to the pool (use `with manager.channel() as lease:`)")

#: Errors after which a channel is not handed out again.
_SPOILING = (ChannelError, AMQPConnectionError, OSError, CarrotKombuError)


class Lease:
    """A channel borrowed from a manager's pool.

    Use it wherever kombu takes a channel (``Producer(lease)``,
    ``Queue(...)(lease).declare()``) or call channel methods on it directly
    (``lease.basic_publish(...)``); :attr:`channel` is the raw channel.
    Give it back with :meth:`release` or by leaving its ``with`` block; a
    lease dropped without either is reclaimed when it is garbage collected
    (with a warning in the log).

    Every use checks that the connection the lease was taken on is still the
    live one: after a loss, and after a reconnect, it raises
    :class:`~carrot_kombu.Disconnected` instead of writing into a dead socket
    or into the new connection.  A lease is meant for one thread at a time.
    """

    __slots__ = ("_pool", "_channel", "generation", "_released", "_token", "__weakref__")

    def __init__(self, pool: "ChannelPool", channel: Any, generation: int, token: int) -> None:
        self._pool = pool
        self._channel = channel
        self.generation = generation
        self._token = token
        self._released = False

    @property
    def channel(self) -> Any:
        """The leased channel, after checking the lease is still valid."""
        if self._released:
            raise CarrotKombuError("this lease was released; take a new one")
        live = self._pool._live
        if not live.is_live(self.generation):
            raise live.stale_error()
        return self._channel

    @property
    def valid(self) -> bool:
        """True while the lease is held and its connection is the live one."""
        return not self._released and self._pool._live.is_live(self.generation)

    def __getattr__(self, name: str) -> Any:
        if name in Lease.__slots__:
            raise AttributeError(name)  # not set yet (an interrupted __init__): never the channel's
        return getattr(self.channel, name)

    def release(self, discard: bool = False) -> None:
        """Return the channel to the pool (idempotent).

        Args:
            discard: Close the channel instead of keeping it for reuse.
        """
        if self._released:
            return
        # Given back first: interrupted inside, the lease is still unreleased
        # (its __del__ or a second release() gives it back; that is idempotent).
        self._pool._give_back(self._token, discard)
        self._released = True

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A channel error, a lost connection, or an interruption (not an
        # Exception: KeyboardInterrupt, a signal handler's error) may have left
        # the channel mid-request: never hand it to someone else.
        self.release(discard=exc is not None and (isinstance(exc, _SPOILING) or not isinstance(exc, Exception)))

    def abandon(self) -> None:
        """Give the channel back later, from any thread, inside any lock (its owner is gone; never blocks).

        For owners that are themselves garbage (a kombu connection dropped
        without ``close()``): like :meth:`__del__`, without its warning.
        """
        if getattr(self, "_released", True):
            return
        self._released = True
        self._pool._quiet.add(self._token)
        self._pool._reclaimed.append(self._token)

    def __del__(self) -> None:
        if not getattr(self, "_released", True):  # an interrupted __init__ set nothing: nothing to give back
            # Only a queue put: this may run on any thread, inside any lock.
            self._pool._reclaimed.append(self._token)

    def __repr__(self) -> str:
        state = "released" if self._released else ("valid" if self.valid else "stale")
        chan_id = getattr(self._channel, "channel_id", None)
        return f"<Lease channel={chan_id} generation={self.generation} {state}>"


class ChannelPool:
    """At most ``limit`` channels open at the broker, leased one thread at a time.

    All state sits behind one condition; channel opening and closing (I/O)
    happen outside it.  The pool only lends: which link is live is
    :class:`~carrot_kombu._live.LiveConnection`'s to say.  The pool keeps its
    books for one link at a time and starts new ones when the live link
    changes; leases of an earlier link are stale from the moment it is no
    longer live.
    """

    def __init__(self, limit: int, live: "LiveConnection", metrics: Optional[Metrics] = None) -> None:
        self._metrics = metrics or Metrics()
        self._cond = Monitor()
        self._live = live
        self._configured_limit = limit
        self._limit = limit
        #: The link the books below are about (not necessarily live any more).
        self._books_for: Optional["Link"] = None
        self._idle: list[Any] = []
        self._leased: dict[int, Any] = {}
        self._verifying: set[Any] = set()
        self._opening: set[object] = set()  # one ticket per acquire() opening a channel now
        #: One ticket per acquire() waiting for a slot now, first come first
        #: served: while anyone waits, only the head may take a freed slot (a
        #: thread releasing and leasing again in a loop took every slot before
        #: a woken waiter could, which then timed out however many were freed).
        self._waiting: deque[object] = deque()
        self._tokens = 0
        self._at_channel_max = False
        #: Tokens of leases collected without release() (filled by Lease.__del__).
        self._reclaimed: deque[int] = deque()
        #: Tokens in _reclaimed whose owner was collected knowingly (Lease.abandon): no warning.
        self._quiet: set[int] = set()
        #: Each lease by token, weakly: one whose __del__ was interrupted (its
        #: token never reached _reclaimed) is still found by reap().
        self._refs: dict[int, "weakref.ref[Lease]"] = {}
        self._reaping = threading.RLock()  # for the hand-over in reap (see _sync)
        live.watch(self._live_changed)

    # -- the live link -------------------------------------------------------------------

    def _live_changed(self) -> None:
        with self._cond.lock:
            self._cond.notify_all()

    def _serving(self) -> Optional["Link"]:
        """Under the lock: the live link, with books started for it (None: no live link)."""
        link = self._books_for
        if link is not None and link is self._live.link and link.dead is None:
            return link  # the common case, first: this runs on every lease
        link = self._live.current()
        if link is not self._books_for:
            self._reset()
            self._books_for = link
            if link is not None:
                limit = self._configured_limit
                channel_max = link.negotiated().get("channel_max")
                if channel_max and channel_max < limit:
                    logger.warning("pool_limit %d exceeds the broker's channel_max %d; using %d",
                                   limit, channel_max, channel_max)
                    limit = channel_max
                self._limit = limit
                link.make_room = self.shed_idle
        return link

    def _live_link(self) -> Optional["Link"]:
        """Under the lock: the link of the books, if it is still the live one."""
        link = self._books_for
        return link if link is not None and link is self._live.link and link.dead is None else None

    def shed_idle(self) -> bool:
        """Close every idle channel now (their ids are needed elsewhere); True if there was one."""
        with self._cond.lock:
            idle, self._idle = self._idle, []
            link = self._books_for
        for chan in idle:
            if link is not None:
                link.close_channel(chan, wait=True)  # the id is free afterwards
        return bool(idle)

    def _reset(self) -> None:
        self._idle = []
        self._leased = {}
        self._refs = {}
        self._verifying = set()
        self._opening = set()
        self._at_channel_max = False

    def forget_after_fork(self) -> None:
        """In a forked child: no books, nothing touches the parent's socket.

        Runs while the child has a single thread; locks held by parent threads
        at fork time may be stuck, so none is taken.
        """
        self._books_for = None
        self._reset()
        self._cond = Monitor()
        self._reaping = threading.RLock()  # a parent's thread may have held it at fork

    def reap(self, wait: bool = False) -> None:
        """Take back the channels of leases collected without ``release()`` (any thread).

        Args:
            wait: If another thread is reaping, wait for it and reap after it
                (else return at once: that thread takes the tokens queued now).
        """
        # One reaper at a time: two would both peek the same token, and the
        # second popleft would drop the next one unseen (its channel leaked).
        lock = self._reaping
        if owned(lock):
            return  # reaping already, further up this thread's stack
        run_locked(lock, self._reap, blocking=wait)

    def _reap(self) -> None:
        reclaimed = self._reclaimed
        while reclaimed:
            # Looked at, given back (idempotent), then removed: an exception
            # raised into this thread never loses a token (see _sync).
            token = reclaimed[0]
            with self._cond.lock:
                known = token in self._leased
            if known and token in self._quiet:
                logger.debug("carrot_kombu took back the channel of a dropped kombu connection")
                self._give_back(token, discard=True)
            elif known:
                logger.warning(_COLLECTED)
                self._give_back(token, discard=False)
            self._quiet.discard(token)
            reclaimed.popleft()
        # A lease collected while its __del__ was interrupted never queued its token.
        with self._cond.lock:
            lost = [token for token, ref in self._refs.items() if ref() is None and token in self._leased]
        for token in lost:
            logger.warning(_COLLECTED)
            self._give_back(token, discard=False)

    # -- user side -------------------------------------------------------------------

    def acquire(self, timeout: Optional[float]) -> Lease:
        """A lease within ``timeout`` seconds (a checked value; None: no limit).

        The deadline is made only when this call has to wait or open a
        channel: a warm pool hands out an idle channel without one.
        """
        if self._reclaimed:
            self.reap()
        else:
            warm = self._lease_idle()
            if warm is not None:
                return warm
        due: list[Deadline] = []  # [the deadline], once one is needed
        first = True
        ticket: Optional[object] = None
        while True:
            spoiled: list[Any] = []
            spoiled_on: Optional["Link"] = None
            try:
                try:
                    with self._cond.lock:
                        spoiled_on = self._books_for
                        if first:
                            # Each call tries to open a channel at least once, even
                            # after another call found the broker's channel_max reached.
                            self._at_channel_max = first = False
                        link = self._wait_for_slot(timeout, due, spoiled)
                        if not isinstance(link, Lease):
                            ticket = ticket or object()  # made only when a channel is opened
                            self._opening.add(ticket)
                finally:
                    for chan in spoiled:
                        if spoiled_on is not None:
                            spoiled_on.close_channel(chan)
                if isinstance(link, Lease):
                    return link
                lease = self._open(link, ticket, due[0] if due else Deadline.after(timeout))
            except BaseException:
                # Whatever raised, from the moment the ticket was taken (also
                # an exception raised into this thread right after): given
                # back.  A ticket is a set member, not a count: taking it back
                # twice is harmless.
                with self._cond.lock:
                    if ticket is not None and ticket in self._opening:
                        self._opening.discard(ticket)
                        self._cond.notify_all()
                raise
            if lease is not None:
                return lease

    def _lease_idle(self) -> Optional[Lease]:
        """The common case of :meth:`acquire` on its own, or None: take the general path.

        Nobody waits, the live link has books, and its newest idle channel is
        reusable (measured: a third of a warm lease's cost was the general
        path's set-up).  Anything else, a spoiled idle channel too, is left
        to the general path.
        """
        with self._cond.lock:
            link = self._books_for
            idle = self._idle
            if (idle and not self._waiting and link is not None and link is self._live.link
                    and link.dead is None and link.reusable(idle[-1])):
                return self._lease(idle[-1], link.generation, from_idle=True)
        return None

    def _return_idle(self, token: int) -> bool:
        """The common case of a release on its own: lease ``token``'s reusable channel of the live link goes idle.

        Returns:
            False if it is not that case (nothing changed: the general path decides).
        """
        with self._cond.lock:
            books = self._books_for
            chan = self._leased.get(token)
            if (chan is None or books is None or books is not self._live.link or books.dead is not None
                    or not books.idle_ready(chan)):
                return False
            self._refs.pop(token, None)
            del self._leased[token]
            self._idle.append(chan)
            self._at_channel_max = False
            if self._waiting:
                self._cond.notify_all()
            return True

    def _wait_for_slot(self, timeout: Optional[float], due: list[Deadline], spoiled: list[Any]) -> Any:
        """Under the lock: an idle channel's lease, or the link to open a new channel on."""
        waited_from = 0.0  # when this call started waiting for a slot (0.0: it did not: not observed)
        ticket: Optional[object] = None  # this call's place in the queue of waiters, once it waits
        try:
            while True:
                link = self._books_for
                if link is None or link is not self._live.link or link.dead is not None:
                    link = self._serving()  # (its common case inline: this runs on every lease)
                    if link is None:
                        raise self._live.down_error()
                waiting = self._waiting
                if not waiting or waiting[0] is ticket:  # nobody waits, or this call is next
                    while self._idle:
                        chan = self._idle[-1]  # taken off only together with its lease's registration
                        if link.reusable(chan):
                            return self._lease(chan, link.generation, from_idle=True)
                        self._idle.pop()
                        spoiled.append(chan)
                    held = len(self._leased) + len(self._opening) + len(self._verifying)
                    if held < self._limit and not self._at_channel_max:
                        return link
                if not due:
                    due.append(Deadline.after(timeout))
                deadline = due[0]
                if deadline.expired():
                    raise PoolTimeout(self._timeout_message(link, deadline.timeout))
                waited_from = waited_from or now()
                if ticket is None:
                    ticket = object()
                    waiting.append(ticket)
                self._cond.wait(deadline.remaining())
        finally:
            if ticket is not None:
                # Served, timed out or interrupted anywhere: out of the queue,
                # and the next in line looks again (it may be its turn now).
                try:
                    self._waiting.remove(ticket)
                except ValueError:
                    pass
                self._cond.notify_all()
            if waited_from:
                self._metrics.pool_wait_seconds.observe(now() - waited_from)

    def _timeout_message(self, link: "Link", timeout: Optional[float]) -> str:
        if self._at_channel_max:
            text = (
                f"the broker's channel_max ({link.negotiated().get('channel_max')}) is reached: "
                f"{len(self._leased)} leased, {len(self._verifying)} being verified; the rest are used "
                "by the publisher and consumers"
            )
        else:
            # Says what holds the slots: a slot may be a channel being opened,
            # or one being verified (closed, on a connection that stopped answering).
            leased = len(self._leased)
            held = [f"{leased} leased"]
            if self._opening:
                held.append(f"{len(self._opening)} being opened")
            if self._verifying:
                held.append(f"{len(self._verifying)} being verified or closed")
            text = f"all {self._limit} channel slots stayed in use for {timeout}s ({', '.join(held)})"
            if leased * 2 >= self._limit:
                text += "; raise pool_limit or release leases sooner"
            else:
                text += "; the broker is slow to answer channel requests"
        silent = link.silent_for()
        hb = link.negotiated().get("heartbeat") or 0
        if hb and silent > hb:
            text += f"; the connection looks dead: no frame from the broker for {silent:.1f}s"
        return text

    def _open(self, link: "Link", ticket: object, deadline: Deadline) -> Optional[Lease]:
        """Open a channel for the ``ticket`` :meth:`acquire` holds; None to wait for a slot again.

        When this raises, :meth:`acquire` gives the ticket back.
        """
        try:
            timeout = deadline.timeout
            chan = link.open_channel(deadline.at)
        except (socket.timeout, PublishTimeout, Blocked) as exc:
            if isinstance(exc, Blocked):
                raise  # blocked_timeout passed first: the broker's block is the answer
            if isinstance(exc, PublishTimeout):
                # The connection is blocked (a resource alarm): say so, as a
                # Blocked (kombu and Celery count it as a connection error).
                raise Blocked(
                    f"the broker has blocked this connection; no channel could be opened within "
                    f"timeout={timeout}s"
                ) from None
            raise PoolTimeout(
                f"the broker did not answer channel.open within timeout={timeout}s "
                f"(last frame from the broker {link.silent_for():.1f}s ago)"
            ) from None
        except ChannelLimitReached:
            with self._cond.lock:
                if self._books_for is link:
                    self._opening.discard(ticket)
                    # Wait for one of ours to come back (or time out saying why).
                    self._at_channel_max = True
                    self._cond.notify_all()
            return None
        except BaseException as exc:
            if isinstance(exc, Disconnected) or not isinstance(exc, _SPOILING):
                raise
            # A refused channel.open (the broker closed the channel it was
            # opening) is one of ours too: reason keeps the broker's error.
            raise Disconnected(f"could not open a channel: {type(exc).__name__}: {exc}", exc) from exc
        with self._cond.lock:
            if self._books_for is link and self._live.is_live(link.generation):
                self._opening.discard(ticket)
                return self._lease(chan, link.generation)
        link.close_channel(chan)
        raise self._live.stale_error()

    def _lease(self, chan: Any, generation: int, from_idle: bool = False) -> Lease:
        """Register a lease of ``chan`` (under the lock).

        Made, then registered (and ``chan`` taken off the idle list) with no
        bytecode boundary in between (see :mod:`carrot_kombu._sync`): an
        exception raised into this thread leaves either no registration or a
        lease object whose ``__del__`` gives the channel back.
        """
        self._tokens += 1
        lease = Lease(self, chan, generation, self._tokens)
        self._leased[lease._token] = chan
        if from_idle:
            self._idle.pop()
        self._refs[lease._token] = weakref.ref(lease)
        return lease

    def _give_back(self, token: int, discard: bool) -> None:
        """Take back lease ``token``'s channel: idle, verified or closed (idempotent)."""
        if not discard and self._return_idle(token):
            return
        to_close = to_verify = None
        generation = 0
        started = False
        link: Optional["Link"] = None
        try:
            with self._cond.lock:
                chan = self._leased.get(token)
                self._refs.pop(token, None)
                link = self._books_for
                if link is not None and (link is not self._live.link or link.dead is not None):
                    link = None  # (_live_link, inline: this runs on every release)
                if chan is None:
                    return  # given back already, or stale: its connection is gone, and the channel with it
                if link is None:
                    del self._leased[token]
                    return
                # Decided first, then committed: each removal and the call that
                # files the channel elsewhere have no bytecode boundary between them.
                if discard or not link.reusable(chan):
                    to_close = chan
                    del self._leased[token]
                elif link.needs_verify(chan):
                    to_verify, generation = chan, link.generation
                    del self._leased[token]
                    self._verifying.add(chan)
                else:
                    del self._leased[token]
                    self._idle.append(chan)
                self._at_channel_max = False
                if self._waiting:
                    self._cond.notify_all()  # the head of the queue, whichever thread woke first
            if to_verify is not None:
                started = link.verify(to_verify, lambda ok: self._verified(to_verify, generation, ok))
                if not started:
                    self._verified(to_verify, generation, False)
                    started = True
        finally:
            # Interrupted between filing the channel as verifying and the
            # verification's start: nothing would ever file it back (its slot
            # stayed taken until the next reconnect).  Discarded instead; a
            # verification that did start and reports later finds it gone.
            if to_verify is not None and not started:
                self._verified(to_verify, generation, False)
            if to_close is not None and link is not None:
                link.close_channel(to_close)

    def _verified(self, chan: Any, generation: int, ok: bool) -> None:
        """On the reading thread: a released channel's verification came back."""
        to_close = None
        with self._cond.lock:
            if chan not in self._verifying:
                return
            self._verifying.discard(chan)
            link = self._live_link()
            if ok and link is not None and link.generation == generation and link.reusable(chan):
                self._idle.append(chan)
            else:
                if not ok:
                    error = None if link is None else link.channel_error(chan)
                    logger.warning("carrot_kombu discarded a channel after its borrower left: %s",
                                   error or "verification failed")
                to_close = chan
            self._cond.notify_all()
        if to_close is not None and link is not None:
            link.close_channel(to_close)

    # -- views ------------------------------------------------------------------------

    def counts(self) -> PoolStatus:
        with self._cond.lock:
            # Idle channels of a link that is no longer live are not there any
            # more (they go with it; the books are reset on the next link).
            idle = len(self._idle) if self._live_link() is not None else 0
            return PoolStatus(
                leased=len(self._leased), idle=idle, limit=self._limit, verifying=len(self._verifying),
                opening=len(self._opening), waiting=len(self._waiting),
            )
