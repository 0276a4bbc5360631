"""User callbacks of a supervised connection, queued by its reading thread and run by ``drain`` callers.

The reading thread never runs user code (kombu consumers, ``on_return``...):
it appends to an :class:`EventQueue`, and whoever calls ``drain_events``
runs the callbacks in its own thread, in arrival order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from time import monotonic
from typing import Any, Callable, Optional, Protocol

from .._sync import NOT_ACQUIRED, owned, run_locked
from ..exceptions import Disconnected
from .green import read_fd, write_fd
from .replies import Waiter

from .wire import Wire


class ConnState(Protocol):
    """What an :class:`EventQueue` needs of its connection (``connstate.ConnState``)."""

    @property
    def wire(self) -> Optional[Wire]: ...

    def check_alive(self) -> None: ...

    def wait_for(self, waiter: Waiter, deadline: Optional[float], interrupt: Any = None) -> bool: ...

__all__ = ("EventQueue", "cannot_settle")

logger = logging.getLogger("carrot_kombu")


class EventQueue:
    """Callbacks of user code (kombu consumers, on_return...), run by ``drain()`` callers.

    The reading thread only appends; :meth:`drain` runs the callbacks in the
    calling thread, one at a time, in arrival order (kombu's contract for
    ``Connection.drain_events``).
    """

    def __init__(self, conn: "ConnState", notify: bool = False) -> None:
        self._conn = conn
        self._items: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._waiters: list[Waiter] = []
        # One drainer at a time keeps callbacks in order; reentrant for a
        # callback that drains again (py-amqp allows it).
        self._drain_lock = threading.RLock()
        # For event loops (Celery's hub): a pipe readable while callbacks are
        # queued or the connection died.
        self._pipe: Optional[tuple[int, int]] = None
        self._armed = False
        #: Closed by its owner (a kombu connection's close() on another thread):
        #: a drainer waiting here is woken and raises at once.
        self._closed = False
        if notify:
            r, w = os.pipe()
            os.set_blocking(r, False)
            os.set_blocking(w, False)
            self._pipe = (r, w)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(*args)`` (from the reading thread)."""
        with self._lock:
            self._items.append((fn, args))
            waiters = list(self._waiters)
            self._arm()
        for waiter in waiters:
            waiter.wake()

    def __len__(self) -> int:
        return len(self._items)

    def wake_all(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
            self._arm()
        for waiter in waiters:
            waiter.wake()

    def fileno(self) -> int:
        """The read end of the notification pipe (``notify=True`` only)."""
        if self._pipe is None:
            raise ValueError("this event queue has no file descriptor (notify=False)")
        return self._pipe[0]

    def _arm(self) -> None:
        """Under ``_lock``: make the pipe readable (once until disarmed)."""
        if self._pipe is not None and not self._armed:
            self._armed = True
            try:
                write_fd(self._pipe[1], b"\0")  # never a green hub wait (see .green)
            except OSError:
                pass

    def _disarm(self) -> None:
        """Under ``_lock``, with nothing queued: the pipe stops being readable."""
        if self._pipe is not None and self._armed and not self._items:
            self._armed = False
            try:
                while read_fd(self._pipe[0], 4096):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        """Close the pipe; a drainer waiting (on any thread) wakes and raises ``Disconnected``."""
        with self._lock:
            pipe, self._pipe = self._pipe, None
            self._closed = True
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wake()
        wire = self._conn.wire
        if waiters and wire is not None:
            wire.wake_reader()  # a drainer may be the thread reading the socket (up to 1 s per read)
        if pipe is not None:
            for fd in pipe:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def take(self, match: Callable[[Callable[..., Any], tuple[Any, ...]], bool]) -> list[tuple[Callable[..., Any], tuple[Any, ...]]]:
        """Remove and return the queued callbacks ``match`` selects (in order)."""
        with self._lock:
            taken = [item for item in self._items if match(*item)]
            if taken:
                self._items = deque(item for item in self._items if not match(*item))
                self._disarm()
        return taken

    def drain(self, timeout: Optional[float]) -> int:
        """Run the next queued callback, waiting up to ``timeout`` for one.

        One per call, like py-amqp's ``drain_events`` (one method per call).

        Returns:
            1.

        Raises:
            socket.timeout: Nothing arrived within ``timeout``.
            Disconnected: The connection is lost.
            Exception: Whatever a callback raised (the rest stay queued).
        """
        deadline = None if timeout is None else monotonic() + timeout
        lock = self._drain_lock
        if owned(lock):
            # A callback draining again: the outer call's ``with`` holds the lock.
            with lock:
                return self._drain_one(deadline, timeout)
        ran = run_locked(lock, lambda: self._drain_one(deadline, timeout),
                         timeout=-1 if timeout is None else max(0.0, timeout))
        if ran is NOT_ACQUIRED:
            raise socket.timeout()
        return ran

    def _drain_one(self, deadline: Optional[float], timeout: Optional[float]) -> int:
        # After a loss kombu must see the loss (Celery then forgets what it
        # reserved); deliveries still queued come again from the broker.
        self._conn.check_alive()
        self._check_open()
        while True:
            if not self._items:
                if timeout is not None and timeout <= 0:
                    with self._lock:
                        self._disarm()
                    raise socket.timeout()
                self._wait(deadline)
                self._check_open()
            with self._lock:
                if not self._items:  # taken by a consumer's cancel meanwhile
                    self._disarm()
                    raise socket.timeout()
                fn, args = self._items.popleft()
                self._disarm()
            if cannot_settle(args):
                # Its channel was closed (by the broker, say) after it was
                # queued: its ack cannot be written and the broker requeued
                # it; run now, it would run twice (Celery runs a task whose
                # ack failed).  The next one is looked at instead.
                logger.debug("dropped a delivery of closed channel %s: the broker requeued it",
                             getattr(getattr(args[0], "channel", None), "channel_id", None))
                continue
            fn(*args)
            return 1

    def _check_open(self) -> None:
        if self._closed:
            raise Disconnected("this connection's callback queue was closed (the connection was closed)")

    def _wait(self, deadline: Optional[float]) -> None:
        waiter = _QueueWaiter(self)
        with self._lock:
            self._waiters.append(waiter)
        try:
            if not self._conn.wait_for(waiter, deadline):
                raise socket.timeout()
        finally:
            with self._lock:
                self._waiters.remove(waiter)


def cannot_settle(args: tuple[Any, ...]) -> bool:
    """A delivery awaiting an ack on a channel that can no longer send one (``no_ack`` ones never are)."""
    message = args[0] if args else None
    info = getattr(message, "delivery_info", None)
    state = getattr(getattr(message, "channel", None), "carrot", None)
    if not isinstance(info, dict) or state is None:
        return False
    return info.get("delivery_tag") in state.unacked and state.failure() is not None


class _QueueWaiter(Waiter):
    __slots__ = ("queue",)

    def __init__(self, queue: EventQueue) -> None:
        super().__init__()
        self.queue = queue

    def ready(self) -> bool:
        return bool(self.queue._items) or self.queue._closed
