"""The bounded channel pool and the leases it hands out."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

from amqp.exceptions import ChannelError
from amqp.exceptions import ConnectionError as AMQPConnectionError

from .exceptions import CarrotKombuError, Disconnected, PoolTimeout
from .status import PoolStatus

if TYPE_CHECKING:
    from ._link import Link

__all__ = ("ChannelPool", "Lease")

logger = logging.getLogger("carrot_kombu")

#: Errors after which a channel is not handed out again.
_SPOILING = (ChannelError, AMQPConnectionError, OSError, CarrotKombuError)


class Lease:
    """A channel borrowed from a manager's pool.

    Use it wherever kombu takes a channel (``Producer(lease)``,
    ``Queue(...)(lease).declare()``) or call channel methods on it directly
    (``lease.basic_publish(...)``); :attr:`channel` is the raw channel.
    Give it back with :meth:`release` or by leaving its ``with`` block.

    Every use checks that the connection the lease was taken on is still the
    live one: after a loss, and after a reconnect, it raises
    :class:`~carrot_kombu.Disconnected` instead of writing into a dead socket
    or into the new connection.  A lease is meant for one thread at a time.
    """

    __slots__ = ("_pool", "_channel", "generation", "_released", "__weakref__")

    def __init__(self, pool: "ChannelPool", channel: Any, generation: int) -> None:
        self._pool = pool
        self._channel = channel
        self.generation = generation
        self._released = False

    @property
    def channel(self) -> Any:
        """The leased channel, after checking the lease is still valid."""
        if self._released:
            raise CarrotKombuError("this lease was released; take a new one")
        pool = self._pool
        if pool._live_generation != self.generation:
            raise pool._stale_error()
        return self._channel

    @property
    def valid(self) -> bool:
        """True while the lease is held and its connection is the live one."""
        return not self._released and self._pool._live_generation == self.generation

    def __getattr__(self, name: str) -> Any:
        return getattr(self.channel, name)

    def release(self, discard: bool = False) -> None:
        """Return the channel to the pool (idempotent).

        Args:
            discard: Close the channel instead of keeping it for reuse.
        """
        if self._released:
            return
        self._released = True
        self._pool._give_back(self, discard)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.release(discard=isinstance(exc, _SPOILING))

    def __repr__(self) -> str:
        state = "released" if self._released else ("valid" if self.valid else "stale")
        chan_id = getattr(self._channel, "channel_id", None)
        return f"<Lease channel={chan_id} generation={self.generation} {state}>"


class ChannelPool:
    """At most ``limit`` channels open at the broker, leased one thread at a time.

    All state sits behind one condition; channel opening and closing (I/O)
    happen outside it.  The pool serves one connection (a link) at a time:
    :meth:`attach` on connect, :meth:`detach` on loss.  Leases of an earlier
    link are stale from the moment it is detached.
    """

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._configured_limit = limit
        self._limit = limit
        self._link: Optional["Link"] = None
        self._live_generation: Optional[int] = None
        self._idle: list[Any] = []
        self._leased: set[Lease] = set()
        self._opening = 0
        self._down: Optional[BaseException] = None
        self._down_message = "not connected yet"

    # -- supervisor side ----------------------------------------------------------

    def attach(self, link: "Link", channel_max: Optional[int]) -> None:
        limit = self._configured_limit
        if channel_max and channel_max < limit:
            logger.warning(
                "pool_limit %d exceeds the broker's channel_max %d; using %d",
                limit, channel_max, channel_max,
            )
            limit = channel_max
        with self._cond:
            self._link = link
            self._live_generation = link.generation
            self._limit = limit
            self._idle = []
            self._leased = set()
            self._opening = 0
            self._down = None
            self._cond.notify_all()

    def detach(self, message: str, reason: Optional[BaseException], generation: Optional[int] = None) -> None:
        """Stop serving the current link; every lease on it becomes stale.

        Args:
            generation: Only detach if this is the live link's generation
                (news about an older link changes nothing).
        """
        with self._cond:
            if generation is not None and generation != self._live_generation:
                return
            self._link = None
            self._live_generation = None
            self._idle = []
            self._leased = set()
            self._opening = 0
            self.set_down(message, reason)

    def set_down(self, message: str, reason: Optional[BaseException]) -> None:
        with self._cond:
            if self._link is None:
                self._down_message = message
                self._down = reason
                self._cond.notify_all()

    def forget_after_fork(self) -> Optional["Link"]:
        """In a forked child: every lease is stale, nothing touches the parent's socket.

        Runs while the child has a single thread; locks held by parent threads
        at fork time may be stuck, so none is taken.
        """
        link = self._link
        self._link = None
        self._live_generation = None
        self._idle = []
        self._leased = set()
        self._down_message = "the process forked; this connection belongs to the parent"
        return link

    # -- user side -------------------------------------------------------------------

    def acquire(self, timeout: Optional[float]) -> Lease:
        deadline = None if timeout is None else time.monotonic() + timeout
        spoiled: list[Any] = []
        try:
            with self._cond:
                while True:
                    link = self._link
                    if link is None:
                        raise self._down_error()
                    while self._idle:
                        chan = self._idle.pop()
                        if _usable(chan):
                            return self._lease(chan, link.generation)
                        spoiled.append(chan)
                    if len(self._leased) + self._opening < self._limit:
                        self._opening += 1
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise PoolTimeout(
                            f"all {self._limit} channels stayed leased for {timeout}s "
                            "(raise pool_limit or release leases sooner)"
                        )
                    self._cond.wait(remaining)
        finally:
            _close_quietly(spoiled)
        return self._open(link)

    def _open(self, link: "Link") -> Lease:
        try:
            chan = link.open_channel()
        except BaseException as exc:
            with self._cond:
                if self._link is link:
                    self._opening -= 1
                    self._cond.notify()
            if isinstance(exc, (Disconnected, ChannelError)) or not isinstance(exc, _SPOILING):
                raise
            raise Disconnected(f"could not open a channel: {type(exc).__name__}: {exc}", exc) from exc
        with self._cond:
            if self._link is link:
                self._opening -= 1
                return self._lease(chan, link.generation)
        raise self._stale_error()

    def _lease(self, chan: Any, generation: int) -> Lease:
        lease = Lease(self, chan, generation)
        self._leased.add(lease)
        return lease

    def _give_back(self, lease: Lease, discard: bool) -> None:
        to_close = None
        with self._cond:
            if lease not in self._leased:
                return  # stale: its connection is gone, and with it the channel
            self._leased.discard(lease)
            chan = lease._channel
            if not discard and _usable(chan):
                self._idle.append(chan)
            else:
                to_close = chan
            self._cond.notify()
        if to_close is not None:
            _close_quietly([to_close])

    # -- views ------------------------------------------------------------------------

    def current_link(self) -> Optional["Link"]:
        with self._cond:
            return self._link

    def counts(self) -> PoolStatus:
        with self._cond:
            return PoolStatus(leased=len(self._leased), idle=len(self._idle), limit=self._limit)

    def _down_error(self) -> Disconnected:
        reason = self._down
        text = self._down_message
        if reason is not None:
            text = f"{text}: {type(reason).__name__}: {reason}"
        return Disconnected(text, reason)

    def _stale_error(self) -> Disconnected:
        with self._cond:
            reason = self._down
        return Disconnected("the connection this lease was taken on is gone; take a new lease", reason)


def _usable(chan: Any) -> bool:
    """A channel may be handed out again: open, not closed by the broker, no consumers."""
    if getattr(chan, "_carrot_error", None) is not None:
        return False
    if getattr(chan, "connection", True) is None:
        return False
    if not getattr(chan, "is_open", True) or getattr(chan, "closed", False):
        return False
    # Consumers would keep delivering to whoever leases the channel next.
    return not getattr(chan, "callbacks", None)


def _close_quietly(channels: list[Any]) -> None:
    for chan in channels:
        try:
            chan.close()
        except Exception:
            logger.debug("ignored error while closing a discarded channel", exc_info=True)
