"""What carrot_kombu adds to a py-amqp connection, owned in one place: :class:`ConnState`.

A py-amqp ``Connection`` gets exactly one attribute of ours, ``carrot`` (a
:class:`ConnState`).  Nothing outside this package touches py-amqp objects'
private state; it asks this object.  Its reading (leader/follower, the
service thread, heartbeats) is :class:`~.reader.Reader`'s.
"""

from __future__ import annotations

import logging
import socket
import threading
from time import monotonic
from typing import Any, Optional

from .._sync import SLICE, Flag
from .._timeouts import check_timeout
from ..exceptions import Blocked, PublishTimeout, ReplyTimeout
from .callbacks import EventQueue
from .reader import Reader
from .replies import ConnHooks, Reply
from .wire import Wire

__all__ = ("ConnState",)

logger = logging.getLogger("carrot_kombu.amqp")


class ConnState(Reader):
    """The thread state of one supervised connection; the only owner of its socket after the handshake.

    Args:
        conn: The py-amqp connection.
        reply_timeout: Most seconds any request waits for the broker's reply.
        blocked_timeout: Most seconds a publish waits while the broker blocks us
            (``None``: as long as it takes).
    """

    def __init__(self, conn: Any, *, reply_timeout: float, blocked_timeout: Optional[float]) -> None:
        super().__init__(blocked_timeout)
        self.conn = conn
        self.reply_timeout = reply_timeout
        self.hooks: Optional[ConnHooks] = None
        #: Guards channel ids and ``conn.channels`` (py-amqp has no lock for them).
        self.id_lock = threading.Lock()
        self.events = EventQueue(self)
        self._fail_lock = threading.Lock()
        #: Set by close() before its connection.close is written: whatever ends
        #: the connection from then on (the broker's end of stream after its
        #: close-ok) is reported as this.
        self._closing: Optional[BaseException] = None
        self._event_queues: "list[EventQueue]" = [self.events]
        # blocked by the broker (resource alarm)
        self.blocked_at = 0.0
        self._unblocked = Flag()
        self._unblocked.set()
        #: channel_max and frame_max we asked for (0: no preference).
        self.requested = (0, 0)
        self.connected_once = False
        self.handshake_deadline = 0.0
        self._conn_replies: dict[Any, Reply] = {}

    # -- life ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.wire is not None

    def take_over(self, sock: Any, leftover: bytes, frame_max: int, heartbeat: float) -> None:
        """After the handshake: from now on only this object does I/O on ``sock``."""
        self.heartbeat = float(heartbeat or 0)
        self.wire = Wire(sock, initial=leftover, max_frame=frame_max, on_failed=self.fail)

    def start(self, hooks: ConnHooks, name: str) -> None:
        """Start the service thread (heartbeats, liveness, reading while no caller does)."""
        self.hooks = hooks
        self.start_service(name)

    def add_event_queue(self, queue: EventQueue) -> None:
        self._event_queues.append(queue)

    def remove_event_queue(self, queue: EventQueue) -> None:
        if queue in self._event_queues:
            self._event_queues.remove(queue)

    # -- failure ------------------------------------------------------------------------------

    def begin_close(self, reason: BaseException) -> None:
        """A polite close starts: from now on the connection ends as ``reason``, whatever ends it."""
        self._closing = reason

    def fail(self, exc: BaseException) -> None:
        """The connection is lost (from whichever thread saw it): wake everyone, tell the owner.

        Never blocks; only the first cause is kept and reported (the close's
        reason once :meth:`begin_close` was called).
        """
        with self._fail_lock:
            if self.dead is not None:
                return
            if self._closing is not None:
                exc = self._closing
            self.dead = exc
        wire = self.wire
        if wire is not None:
            wire.kill(exc)
        transport = getattr(self.conn, "_transport", None)
        if transport is not None:
            transport.connected = False  # kombu's verify_connection reads it
        self._unblocked.set()
        for reply in list(self._conn_replies.values()):
            reply.fail(self.disconnected())
        self.wake_all()
        hooks = self.hooks
        if hooks is not None:
            try:
                hooks.on_lost(exc)
            except Exception:  # pragma: no cover - a bug in our own hook
                logger.exception("carrot_kombu: error while reporting a lost connection")

    def disown(self, exc: BaseException) -> None:
        """In a forked child: dead without any I/O (the parent still uses the socket)."""
        self.dead = exc
        if self.wire is not None:
            self.wire.disown(exc)

    def wake_all(self) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wake()
        for queue in list(self._event_queues):
            queue.wake_all()

    # -- blocked by the broker ------------------------------------------------------------------

    def on_blocked(self, reason: str) -> None:
        """From the reading thread: flag first, so publishers stop before the event is out."""
        self.blocked_at = monotonic()
        self.blocked = reason
        self._unblocked.clear()
        self.wake_all()
        if self.hooks is not None:
            self.hooks.on_blocked(reason)

    def on_unblocked(self) -> None:
        self.blocked = None
        self._unblocked.set()
        if self.hooks is not None:
            self.hooks.on_unblocked()

    def wait_unblocked(self, deadline: Optional[float] = None) -> None:
        """Hold a publish while the broker blocks us, at most ``blocked_timeout``.

        Args:
            deadline: The caller's own limit (``time.monotonic()``), if sooner.

        Raises:
            Blocked: Still blocked after ``blocked_timeout`` (nothing was sent).
            PublishTimeout: Still blocked at ``deadline`` (``not_sent``).
            Disconnected: The connection was lost meanwhile.
        """
        if self.blocked is None:
            return
        limit = self.blocked_timeout
        mine = deadline is not None and (limit is None or deadline - monotonic() < limit)
        if mine:
            assert deadline is not None
            limit = max(0.0, deadline - monotonic())
        end = None if limit is None else monotonic() + limit
        # ``blocked`` is the truth; the flag only wakes us early.
        while self.blocked is not None and self.dead is None:
            remaining = None if end is None else end - monotonic()
            if remaining is not None and remaining <= 0:
                if mine:
                    raise PublishTimeout(
                        f"the broker has blocked this connection ({self.blocked}) past the publish timeout; "
                        "the message was not sent",
                        outcome="not_sent",
                    )
                raise self.blocked_error("nothing was sent")
            self._unblocked.wait(SLICE if remaining is None else min(remaining, SLICE))
        self.check_alive()

    def _is_blocked(self) -> bool:
        return self.blocked is not None and self.blocked_timeout is not None

    def is_blocked(self) -> bool:
        """Blocked by the broker, with a ``blocked_timeout`` to bound waits by."""
        return self._is_blocked()

    def blocked_until(self) -> Optional[float]:
        """When the current block exceeds ``blocked_timeout`` (``time.monotonic()``); None if not blocked."""
        if self.blocked is None or self.blocked_timeout is None:
            return None
        return self.blocked_at + self.blocked_timeout

    def blocked_error(self, outcome: str) -> Blocked:
        return Blocked(
            f"the broker has blocked this connection ({self.blocked}) for longer than "
            f"blocked_timeout={self.blocked_timeout}s; {outcome}"
        )

    # -- requests --------------------------------------------------------------------------------

    def expect_conn_reply(self, sig: Any) -> Reply:
        """Register a reply on channel 0 (connection.close-ok)."""
        reply = Reply([sig])
        self._conn_replies[sig] = reply
        return reply

    def conn_reply(self, sig: Any) -> None:
        reply = self._conn_replies.pop(sig, None)
        if reply is not None:
            reply.resolve((sig,))

    def await_reply(self, reply: Reply, timeout: Optional[float], what: str,
                    deadline: Optional[float] = None) -> tuple[Any, ...]:
        """Wait for ``reply`` at most ``min(timeout, reply_timeout)`` (and ``blocked_timeout`` while blocked).

        Args:
            reply: The registered reply.
            timeout: The caller's own seconds.
            what: The request, for the error messages.
            deadline: The caller's own limit (``time.monotonic()``, a lease's
                timeout): it bounds the wait too, like ``timeout``.

        Raises:
            socket.timeout: The caller's own ``timeout`` (or ``deadline``) passed first.
            ReplyTimeout: ``reply_timeout`` passed.
            Blocked: The broker blocked the connection for ``blocked_timeout``.
            Disconnected: The connection was lost.
            Exception: The channel error the broker answered with.
            TypeError, ValueError: ``timeout`` is not a number of seconds >= 0.
        """
        timeout = check_timeout("timeout", timeout)
        start = monotonic()
        if deadline is not None:
            left = max(0.0, deadline - start)
            timeout = left if timeout is None else min(timeout, left)
        limit = self.reply_timeout if timeout is None else min(timeout, self.reply_timeout)
        until = start + limit
        while not self._wait_reply(reply, until, what):
            if monotonic() >= until:
                if timeout is not None and timeout < self.reply_timeout:
                    raise socket.timeout()
                raise ReplyTimeout(
                    f"no reply to {what} within reply_timeout={self.reply_timeout:g}s "
                    f"(last frame from the broker {self.silent_for():.1f}s ago)"
                )
        if reply.error is not None:
            raise reply.error
        assert reply.args is not None
        return reply.args

    def _wait_reply(self, reply: Reply, until: float, what: str) -> bool:
        """One wait for ``reply`` until ``until``, cut short by a block (whose own limit it enforces)."""
        if self.blocked is not None and self.blocked_timeout is not None:
            blocked_deadline = self.blocked_at + self.blocked_timeout
            if monotonic() >= blocked_deadline:
                written = "; the message was sent and may have been stored" if "confirm" in what else ""
                raise self.blocked_error(f"no reply to {what}{written}")
            return self.wait_for(reply, min(until, blocked_deadline))
        # A block arriving meanwhile shortens the wait: look again then.
        return self.wait_for(reply, until, self._is_blocked)
