"""What carrot_kombu adds to a py-amqp connection and its channels, owned in one place.

A py-amqp ``Connection`` gets exactly one attribute of ours, ``carrot`` (a
:class:`ConnState`); each channel one, ``carrot`` (a :class:`ChanState`).
Nothing outside this package touches py-amqp objects' private state; it asks
these objects.

Reading: at any moment exactly one thread reads the socket and dispatches
what arrives (it holds ``_read_lock``).  A thread that waits for a reply
reads *itself* when nobody else does (leader/follower): its own reply then
reaches it without a thread hand-off.  When no caller is waiting, the
connection's *service thread* reads, sends heartbeats and checks liveness.
The reading thread only dispatches: it completes replies, settles confirms
and queues deliveries; it never runs user code (kombu callbacks go to an
:class:`EventQueue` that ``drain_events`` callers run in their own thread).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections import deque
from contextlib import contextmanager
from time import monotonic
from typing import Any, Callable, Iterable, Iterator, Optional

from amqp import spec
from amqp.exceptions import ConnectionForced, FrameError, FrameSyntaxError, RecoverableConnectionError, UnexpectedFrame

from .._sync import SLICE, Flag, Worker
from .._timeouts import check_timeout
from ..exceptions import Blocked, CarrotKombuError, Disconnected, PublishTimeout, ReplyTimeout
from .frames import HEARTBEAT
from .green import read_fd, write_fd
from .wire import Wire

__all__ = ("ConnState", "ChanState", "EventQueue", "Reply", "ConnHooks")

logger = logging.getLogger("carrot_kombu.amqp")

#: Frame errors after which the stream cannot be trusted (raised by py-amqp's frame handler).
_FATAL_FRAME_ERRORS: tuple[type[BaseException], ...] = (OSError, UnexpectedFrame, FrameError, FrameSyntaxError)

#: After a caller stopped reading, the service thread waits this long before
#: it reads again: a caller that comes straight back keeps reading itself.
GRACE = 0.005


class Waiter:
    """Something a thread waits for; :meth:`wake` may be called from any thread.

    The event is made only when a thread actually sleeps on it: a caller that
    reads the socket itself (the common case) never needs one.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: Optional[Flag] = None

    @property
    def event(self) -> Flag:
        event = self._event
        if event is None:
            # Made before the caller re-checks ready(): a wake() from now on sets it.
            event = self._event = Flag()
        return event

    def ready(self) -> bool:
        raise NotImplementedError

    def wake(self) -> None:
        event = self._event
        if event is not None:
            event.set()


class Reply(Waiter):
    """One expected reply: registered before its request is written."""

    __slots__ = ("methods", "args", "error", "on_arrival")

    def __init__(self, methods: Iterable[Any], on_arrival: Optional[Callable[["Reply"], None]] = None) -> None:
        super().__init__()
        self.methods = tuple(methods)
        self.args: Optional[tuple[Any, ...]] = None
        self.error: Optional[BaseException] = None
        #: Internal continuation run by the reading thread (never user code).
        self.on_arrival = on_arrival

    def ready(self) -> bool:
        return self.args is not None or self.error is not None

    def resolve(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.wake()
        if self.on_arrival is not None:
            self.on_arrival(self)

    def fail(self, error: BaseException) -> None:
        if self.ready():
            return
        self.error = error
        self.wake()
        if self.on_arrival is not None:
            self.on_arrival(self)


class ConnHooks:
    """What a connection reports to its owner (the link); called from any thread, must not block."""

    def __init__(
        self,
        on_lost: Callable[[BaseException], None],
        on_blocked: Callable[[str], None],
        on_unblocked: Callable[[], None],
    ) -> None:
        self.on_lost = on_lost
        self.on_blocked = on_blocked
        self.on_unblocked = on_unblocked


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
        with self._lock:
            pipe, self._pipe = self._pipe, None
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
        if lock._is_owned():  # type: ignore[attr-defined]
            # A callback draining again: the outer call's ``with`` holds the lock.
            with lock:
                return self._drain_one(deadline, timeout)
        try:
            if not lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
                raise socket.timeout()
            # The ``with`` takes a second level and the first is given back at
            # once: from then on its C-level exit releases the lock, however
            # this thread is interrupted (see _sync).
            with lock:
                lock.release()
                return self._drain_one(deadline, timeout)
        finally:
            if lock._is_owned():  # type: ignore[attr-defined]  # interrupted before the hand-over
                lock.release()

    def _drain_one(self, deadline: Optional[float], timeout: Optional[float]) -> int:
        # After a loss kombu must see the loss (Celery then forgets what it
        # reserved); deliveries still queued come again from the broker.
        self._conn.check_alive()
        if not self._items:
            if timeout is not None and timeout <= 0:
                with self._lock:
                    self._disarm()
                raise socket.timeout()
            self._wait(deadline)
        with self._lock:
            if not self._items:  # taken by a consumer's cancel meanwhile
                self._disarm()
                raise socket.timeout()
            fn, args = self._items.popleft()
            self._disarm()
        fn(*args)
        return 1

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


class _QueueWaiter(Waiter):
    __slots__ = ("queue",)

    def __init__(self, queue: EventQueue) -> None:
        super().__init__()
        self.queue = queue

    def ready(self) -> bool:
        return bool(self.queue._items)


class ConnState:
    """The thread state of one supervised connection; the only owner of its socket after the handshake.

    Args:
        conn: The py-amqp connection.
        reply_timeout: Most seconds any request waits for the broker's reply.
        blocked_timeout: Most seconds a publish waits while the broker blocks us
            (``None``: as long as it takes).
    """

    def __init__(self, conn: Any, *, reply_timeout: float, blocked_timeout: Optional[float]) -> None:
        self.conn = conn
        self.reply_timeout = reply_timeout
        self.blocked_timeout = blocked_timeout
        self.wire: Optional[Wire] = None
        self.dead: Optional[BaseException] = None
        self.hooks: Optional[ConnHooks] = None
        #: Guards channel ids and ``conn.channels`` (py-amqp has no lock for them).
        self.id_lock = threading.Lock()
        self.events = EventQueue(self)
        self._fail_lock = threading.Lock()
        #: Held by the thread reading the socket.  An RLock for ``_is_owned``:
        #: a leader interrupted right after acquiring it still releases it.
        self._read_lock = threading.RLock()
        #: Whether a thread holds ``_read_lock`` (a hint; waits re-check every SLICE).
        self._leading = False
        self._waiters_lock = threading.Lock()
        self._waiters: dict[Waiter, None] = {}
        self._service: Optional[Worker] = None
        #: Per thread: the deadline of the call in progress (see caller_deadline).
        self._caller_deadline = threading.local()
        self._service_reading = False
        self._last_caller = 0.0
        self._event_queues: "list[EventQueue]" = [self.events]
        # blocked by the broker (resource alarm)
        self.blocked: Optional[str] = None
        self.blocked_at = 0.0
        self._unblocked = Flag()
        self._unblocked.set()
        self.heartbeat = 0.0
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
        self._service = Worker(self._service_loop, f"carrot-kombu-io-{name}")
        self._service.start()

    @contextmanager
    def caller_deadline(self, deadline: Optional[float]) -> Iterator[None]:
        """Within the block, this thread's replies are awaited until ``deadline`` at most."""
        local = self._caller_deadline
        previous = getattr(local, "at", None)
        local.at = previous if deadline is None else deadline if previous is None else min(previous, deadline)
        try:
            yield
        finally:
            local.at = previous

    def join(self, timeout: float) -> None:
        service = self._service
        if service is not None:
            service.wait(timeout)

    def add_event_queue(self, queue: EventQueue) -> None:
        self._event_queues.append(queue)

    def remove_event_queue(self, queue: EventQueue) -> None:
        if queue in self._event_queues:
            self._event_queues.remove(queue)

    # -- failure ------------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        """The connection is lost (from whichever thread saw it): wake everyone, tell the owner.

        Never blocks; only the first cause is kept and reported.
        """
        with self._fail_lock:
            if self.dead is not None:
                return
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

    def disconnected(self) -> Disconnected:
        """The error every user of a lost connection gets (a fresh instance per raise)."""
        dead = self.dead
        return Disconnected(f"connection lost: {type(dead).__name__}: {dead}", dead)

    def wire_failure(self, exc: OSError) -> BaseException:
        """What a user gets for an ``OSError`` out of the wire: ``Disconnected`` if the socket failed.

        The wire marks itself dead before it tells us; a thread that saw it
        first must not show users a raw socket error (``fail`` keeps the first
        cause).  An ``OSError`` that is not the socket's (a signal handler's
        ``TimeoutError``) is returned as it is.
        """
        wire = self.wire
        if self.dead is None and (wire is None or wire.dead is None):
            return exc
        if wire is not None and wire.dead is not None:
            self.fail(wire.dead)
        return self.disconnected()

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.disconnected()

    # -- waiting: leader / follower ------------------------------------------------------------

    def wait_for(self, waiter: Waiter, deadline: Optional[float],
                 interrupt: Optional[Callable[[], bool]] = None) -> bool:
        """Block until ``waiter.ready()`` (True), ``deadline`` or ``interrupt()`` (False).

        Reads the socket in this thread whenever nobody else does.

        Raises:
            Disconnected: The connection was lost meanwhile.
        """
        if waiter.ready():
            return True
        with self._waiters_lock:
            self._waiters[waiter] = None
        try:
            while True:
                if waiter.ready():
                    return True
                if self.dead is not None:
                    raise self.disconnected()
                remaining = None if deadline is None else deadline - monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if interrupt is not None and interrupt():
                    return False
                led = False
                lock = self._read_lock
                try:
                    led = lock.acquire(False)
                    if led:
                        # The ``with`` takes a second level and the first is
                        # given back at once: from then on only the ``with``
                        # holds the lock, and its C-level exit releases it
                        # whatever interrupts this thread.  (A release in a
                        # finally is Python code an interrupt can skip: the
                        # lock then stayed held, and nobody read any more.)
                        with lock:
                            lock.release()
                            self._leading = True
                            self._lead(waiter, deadline, interrupt)
                except OSError as exc:
                    failure = self.wire_failure(exc)
                    if failure is exc:
                        raise
                    raise failure from exc
                finally:
                    # Still owned only if interrupted between the acquire and
                    # the inner release: needs a second interrupt to leak.
                    if lock._is_owned():  # type: ignore[attr-defined]
                        lock.release()
                    if led:
                        self._last_caller = monotonic()
                        self._leading = False
                        self._promote()
                if led:
                    continue
                if self._service_reading and self.wire is not None:
                    self.wire.wake_reader()  # the service thread yields to callers
                waiter.event.clear()
                # Checked again after clear(): a wake-up from now on stays set.
                if waiter.ready() or self.dead is not None or not self._leading:
                    continue
                # Sliced: a promotion lost to an interrupted leader costs SLICE at most.
                waiter.event.wait(SLICE if remaining is None else min(remaining, SLICE))
        finally:
            with self._waiters_lock:
                self._waiters.pop(waiter, None)
            self._last_caller = monotonic()
            if not self._leading:
                # We may have been promoted just as our own reply arrived: pass it on.
                self._promote()

    def _lead(self, waiter: Waiter, deadline: Optional[float],
              interrupt: Optional[Callable[[], bool]] = None) -> None:
        wire = self.wire
        assert wire is not None
        self._last_caller = monotonic()
        # An exception raised into this thread while it waits (Ctrl-C, a
        # signal handler) just propagates: the connection is not harmed.
        while not waiter.ready() and self.dead is None:
            if interrupt is not None and interrupt():
                return
            remaining = 1.0 if deadline is None else min(1.0, deadline - monotonic())
            if remaining <= 0:
                return
            wire.read(remaining, self._dispatch)

    def _release_lead(self) -> None:
        self._last_caller = monotonic()
        self._leading = False
        self._read_lock.release()
        self._promote()

    def _promote(self) -> None:
        """Wake one waiter that still needs a reader (leader/follower)."""
        with self._waiters_lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            if not waiter.ready():
                waiter.wake()
                return

    def _dispatch(self, todo: "deque[tuple[int, int, bytes]]") -> None:
        """Hand frames to py-amqp's frame handler (our dispatch code only; no user code).

        Each frame leaves ``todo`` once handled, so an exception raised into
        this thread between two frames leaves the rest to the next reader.
        One escaping a frame's handling leaves that frame half handled: the
        wire then drops the connection and the exception goes on to the
        reading thread's caller (it may be a signal handler's, e.g. Celery's
        soft time limit, which belongs to that caller).
        """
        handle = self.conn.on_inbound_frame
        wire = self.wire
        assert wire is not None
        while todo:
            wire.in_frame = True
            try:
                handle(todo[0])
            except _FATAL_FRAME_ERRORS:
                raise
            except Exception:
                logger.exception("carrot_kombu: error while dispatching a frame; dropping the connection")
                raise
            # Cleared, then removed: no bytecode boundary in between (see _sync).
            wire.in_frame = False
            todo.popleft()

    # -- the service thread ----------------------------------------------------------------------

    def _service_loop(self) -> None:
        wire = self.wire
        assert wire is not None
        while self.dead is None:
            try:
                interval = self.housekeeping()
            except Exception as exc:
                self.fail(exc)
                return
            idle = monotonic() - self._last_caller
            if idle < GRACE:
                # Callers are reading for themselves: stay out of their way.
                self._sleep(min(interval, GRACE - idle))
                continue
            if not self._read_lock.acquire(False):
                self._sleep(min(interval, GRACE))
                continue
            self._leading = True
            self._service_reading = True
            try:
                wire.read(interval, self._dispatch)
            except Exception as exc:
                self.fail(exc)
            finally:
                self._service_reading = False
                last = self._last_caller
                self._release_lead()
                # _release_lead marks caller activity, but the service thread is
                # no caller; a caller that asked us to yield is (it waits).
                self._last_caller = monotonic() if self._waiters else last

    def _sleep(self, seconds: float) -> None:
        # Only time passes here; kill() ends the loop through self.dead.
        threading.Event().wait(seconds)

    def housekeeping(self) -> float:
        """Heartbeat, liveness, leftover output; returns seconds until it is due again.

        Raises:
            ConnectionForced: No frame from the broker for two heartbeat intervals.
            Blocked: A write stayed stuck longer than ``blocked_timeout`` while blocked.
        """
        self.check_liveness()
        wire = self.wire
        assert wire is not None
        hb = self.heartbeat
        if hb and monotonic() - wire.last_tx >= hb / 2 and not wire.pending_output:
            wire.send_nowait([HEARTBEAT])
        wire.flush_pending()
        return min(1.0, max(0.05, hb / 4)) if hb else 1.0

    def check_liveness(self) -> None:
        """Raise if the connection must be considered dead (lock-free: safe from any thread)."""
        if self.dead is not None:
            raise self.disconnected()
        wire = self.wire
        if wire is None:
            return
        now = monotonic()
        stalled = wire.stalled_since
        limit = self.blocked_timeout
        if self.blocked is not None and stalled is not None and limit is not None and now - stalled > limit:
            # A frame half-written to a broker that stopped reading: the stream
            # cannot be resumed cleanly, the connection has to go.
            raise Blocked(
                f"a write stayed stuck for {now - stalled:.1f}s on a connection blocked by "
                f"the broker ({self.blocked}); blocked_timeout is {limit}s"
            )
        hb = self.heartbeat
        # RabbitMQ sends no heartbeats to a connection it blocks (it reads
        # nothing from it either): silence is expected then.
        if hb and self.blocked is None and now - wire.last_rx > 2 * hb:
            raise ConnectionForced(
                f"Too many heartbeats missed: no frame from the broker for {now - wire.last_rx:.1f}s "
                f"(heartbeat {hb:g}s)"
            )

    def silent_for(self) -> float:
        """Seconds since the last byte from the broker."""
        wire = self.wire
        return 0.0 if wire is None else monotonic() - wire.last_rx

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
        if deadline is None:
            deadline = getattr(self._caller_deadline, "at", None)  # a lease's timeout (caller_deadline)
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

    def await_reply(self, reply: Reply, timeout: Optional[float], what: str) -> tuple[Any, ...]:
        """Wait for ``reply`` at most ``min(timeout, reply_timeout)`` (and ``blocked_timeout`` while blocked).

        Raises:
            socket.timeout: The caller's own ``timeout`` passed first.
            ReplyTimeout: ``reply_timeout`` passed.
            Blocked: The broker blocked the connection for ``blocked_timeout``.
            Disconnected: The connection was lost.
            Exception: The channel error the broker answered with.
            TypeError, ValueError: ``timeout`` is not a number of seconds >= 0.
        """
        timeout = check_timeout("timeout", timeout)
        start = monotonic()
        bound = getattr(self._caller_deadline, "at", None)
        if bound is not None:
            # The calling thread's own deadline (a lease's timeout) bounds this wait too.
            left = max(0.0, bound - start)
            timeout = left if timeout is None else min(timeout, left)
        limit = self.reply_timeout if timeout is None else min(timeout, self.reply_timeout)
        deadline = start + limit
        while True:
            if self.blocked is not None and self.blocked_timeout is not None:
                blocked_deadline = self.blocked_at + self.blocked_timeout
                if monotonic() >= blocked_deadline:
                    written = "; the message was sent and may have been stored" if "confirm" in what else ""
                    raise self.blocked_error(f"no reply to {what}{written}")
                ready = self.wait_for(reply, min(deadline, blocked_deadline))
            else:
                # A block arriving meanwhile shortens the wait: look again then.
                ready = self.wait_for(reply, deadline, self._is_blocked)
            if ready:
                break
            if monotonic() >= deadline:
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


class ChanState:
    """What carrot_kombu tracks about one channel; its writes are atomic with its state.

    ``lock`` is held only for bookkeeping and a non-blocking enqueue, never
    while waiting, so the reading thread may take it too.
    """

    def __init__(self, chan: Any, conn: ConnState) -> None:
        self.chan = chan
        self.conn = conn
        self.lock = threading.Lock()
        self.replies: dict[Any, Reply] = {}
        #: The broker closed the channel with this error.
        self.error: Optional[BaseException] = None
        self.closing = False
        self.closed = False
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
        #: Delivery tags received and not yet settled: closing the channel
        #: is what hands them back to the broker (pooled, they stay unacked).
        self.unacked: set[int] = set()
        #: Written without a reply since the last sync point: a late channel
        #: error may still come (a publish to a missing exchange, an ack with a
        #: bad tag), so the channel is verified before another borrower gets it.
        self.unverified = False
        self.confirm_mode = False
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

    # -- questions ------------------------------------------------------------------------

    def reusable(self) -> bool:
        """May be handed to another borrower: open, healthy, no consumers, nothing in flight."""
        chan = self.chan
        return not (
            self.error or self.spoiled or self.closing or self.closed or self.conn.dead
            or chan.callbacks or self.replies or self.confirm_waiters or self.changed or self.unacked
        ) and chan.is_open

    def failure(self) -> Optional[BaseException]:
        """Why a request on this channel cannot proceed (None: it can)."""
        if self.conn.dead is not None:
            return self.conn.disconnected()
        if self.error is not None:
            return _copy_error(self.error)
        if self.spoiled is not None:
            return CarrotKombuError(f"this channel can no longer be used: {self.spoiled}; take a new lease")
        if self.closed or self.closing:
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

    def delivered(self, tag: int) -> None:
        """A delivery that must be settled arrived (reading thread, or basic_get's caller)."""
        with self.lock:
            self.unacked.add(tag)

    def borrower_changed(self, sig: Any, args: tuple[Any, ...]) -> None:
        """The borrower is about to send ``sig``: note what the next borrower must not inherit."""
        if sig == spec.Basic.Ack or sig == (60, 120) or sig == spec.Basic.Reject:
            tag = int(args[0]) if args else 0
            multiple = sig != spec.Basic.Reject and len(args) > 1 and bool(args[1])
            with self.lock:
                if multiple or tag == 0:
                    # tag 0 with multiple: everything outstanding.
                    self.unacked = {t for t in self.unacked if tag and t > tag}
                else:
                    self.unacked.discard(tag)
        elif sig == spec.Channel.Flow:
            if args and not args[0]:
                self.changed = self.changed or "channel.flow(active=False)"
        elif sig == spec.Tx.Select:
            self.changed = self.changed or "tx_select (transaction mode)"
        elif sig == spec.Confirm.Select:
            # The next borrower's tx_select would fail (406), its publishes be numbered.
            self.changed = self.changed or "confirm_select (confirm mode)"
        elif sig == spec.Basic.Qos:
            self.changed = self.changed or "basic_qos (prefetch)"
        else:  # basic.recover: redelivers on this channel
            self.changed = self.changed or "basic_recover"

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
            reply.fail(_copy_error(error))

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


def _copy_error(error: BaseException) -> BaseException:
    """A fresh instance of a stored error, so that each raise has its own traceback."""
    try:
        args = getattr(error, "args", ())
        copy: BaseException = type(error)(*args)
        for attr in ("reply_code", "reply_text", "method_sig", "method_name"):
            if hasattr(error, attr):
                setattr(copy, attr, getattr(error, attr))
        return copy
    except Exception:
        return error
