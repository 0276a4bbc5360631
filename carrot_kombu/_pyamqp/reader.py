"""Reading a supervised connection's socket: leader/follower, the service thread, liveness.

At any moment exactly one thread reads the socket and dispatches what
arrives (it holds ``_read_lock``).  A thread that waits for a reply reads
*itself* when nobody else does (leader/follower): its own reply then
reaches it without a thread hand-off.  When no caller is waiting, the
connection's *service thread* reads, sends heartbeats and checks liveness;
while an event loop keeps publishing, the loop reads instead and the service
thread only watches over it (:mod:`.loopturn`).
The reading thread only dispatches: it completes replies, settles confirms
and queues deliveries; it never runs user code (kombu callbacks go to an
:class:`~.callbacks.EventQueue` that ``drain_events`` callers run in their
own thread).

Whatever the reading thread gets from the stream that is not AMQP (a frame
over ``frame_max``, a bad frame end, a socket error) fails the connection,
and every thread, the reading one included, gets :class:`Disconnected`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from time import monotonic
from typing import Any, Callable, Optional

from amqp.exceptions import ConnectionForced, FrameError, FrameSyntaxError, UnexpectedFrame

from .._sync import SLICE, Worker, run_locked
from ..exceptions import Blocked, Disconnected
from .frames import HEARTBEAT
from .loopturn import LOOP_CHECK, LoopTurn
from .replies import Waiter
from .wire import Wire

__all__ = ("GRACE", "Reader")

logger = logging.getLogger("carrot_kombu.amqp")

#: Errors after which the stream cannot be trusted (the socket's, or raised by the frame parser/handler).
FATAL_FRAME_ERRORS: tuple[type[BaseException], ...] = (OSError, UnexpectedFrame, FrameError, FrameSyntaxError)

#: After a caller stopped reading, the service thread waits this long before
#: it reads again: a caller that comes straight back keeps reading itself.
GRACE = 0.005

Interrupt = Optional[Callable[[], bool]]


class Reader:
    """The reading side of one connection (a base of :class:`~.connstate.ConnState`).

    The subclass provides :meth:`fail` (the connection is lost) and keeps
    :attr:`blocked` / :attr:`blocked_timeout` (the broker's resource alarm,
    which silences heartbeats and stalls writes).
    """

    def __init__(self, blocked_timeout: Optional[float]) -> None:
        self.conn: Any = None
        self.wire: Optional[Wire] = None
        self.dead: Optional[BaseException] = None
        self.heartbeat = 0.0
        self.blocked: Optional[str] = None
        self.blocked_timeout = blocked_timeout
        #: Held by the thread reading the socket.  An RLock for the hand-over
        #: idiom (_sync.run_locked): a leader interrupted right after
        #: acquiring it still releases it.
        self._read_lock = threading.RLock()
        #: Whether a thread holds ``_read_lock`` (a hint; waits re-check every SLICE).
        self._leading = False
        self._waiters_lock = threading.Lock()
        self._waiters: dict[Waiter, None] = {}
        self._service: Optional[Worker] = None
        self._service_reading = False
        self._last_caller = 0.0
        #: The event loop reading instead of the service thread (see .loopturn), and
        #: that loop while it waits for the read lock to be released.
        self._loop_turn: Optional[LoopTurn] = None
        self._loop_parked: Optional[LoopTurn] = None
        self._turn_lock = threading.Lock()
        self._no_turn_until = 0.0

    def fail(self, exc: BaseException) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    # -- errors ----------------------------------------------------------------------------------

    def disconnected(self) -> Disconnected:
        """The error every user of a lost connection gets (a fresh instance per raise)."""
        dead = self.dead
        return Disconnected(f"connection lost: {type(dead).__name__}: {dead}", dead)

    def wire_failure(self, exc: BaseException) -> BaseException:
        """What a user gets for an error out of the wire: ``Disconnected`` if the connection failed.

        The wire marks itself dead before it tells us; a thread that saw it
        first must not show users a raw socket or frame error (``fail`` keeps
        the first cause).  An ``OSError`` that is not the socket's (a signal
        handler's ``TimeoutError``) is returned as it is.
        """
        wire = self.wire
        if self.dead is None and (wire is None or wire.dead is None):
            if isinstance(exc, OSError):
                return exc
            self.fail(exc)  # a frame error the wire did not see: the stream is not AMQP
        if wire is not None and wire.dead is not None:
            self.fail(wire.dead)
        return self.disconnected()

    def check_alive(self) -> None:
        if self.dead is not None:
            raise self.disconnected()

    # -- waiting: leader / follower ------------------------------------------------------------

    def wait_for(self, waiter: Waiter, deadline: Optional[float], interrupt: Interrupt = None) -> bool:
        """Block until ``waiter.ready()`` (True), ``deadline`` or ``interrupt()`` (False).

        Reads the socket in this thread whenever nobody else does.

        Raises:
            Disconnected: The connection was lost meanwhile (also when this
                thread, reading, found the stream broken).
        """
        if waiter.ready():
            return True
        with self._waiters_lock:
            self._waiters[waiter] = None
        try:
            while True:
                remaining = self._still_waiting(waiter, deadline, interrupt)
                if remaining is True:
                    return True
                if remaining is False:
                    return False
                if not self._take_turn(waiter, deadline, interrupt):
                    self._follow(waiter, remaining)
        finally:
            with self._waiters_lock:
                self._waiters.pop(waiter, None)
            self._last_caller = monotonic()
            if not self._leading:
                # We may have been promoted just as our own reply arrived: pass it on.
                self._promote()

    def _still_waiting(self, waiter: Waiter, deadline: Optional[float], interrupt: Interrupt) -> "bool | float | None":
        """True: ready; False: give up; else the seconds left (None: no deadline)."""
        if waiter.ready():
            return True
        if self.dead is not None:
            raise self.disconnected()
        remaining = None if deadline is None else deadline - monotonic()
        if remaining is not None and remaining <= 0:
            return False
        if interrupt is not None and interrupt():
            return False
        return remaining

    def _take_turn(self, waiter: Waiter, deadline: Optional[float], interrupt: Interrupt) -> bool:
        """Read as the leader if nobody else reads; False if another thread does."""
        led = False

        def lead() -> None:
            nonlocal led
            led = True
            self._leading = True
            self._lead(waiter, deadline, interrupt)

        try:
            run_locked(self._read_lock, lead, blocking=False)
        except FATAL_FRAME_ERRORS as exc:
            failure = self.wire_failure(exc)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            if led:
                self._last_caller = monotonic()
                self._leading = False
                self._promote()
        return led

    def _follow(self, waiter: Waiter, remaining: Optional[float]) -> None:
        """Sleep until woken (our reply, a promotion, a loss) or for one slice."""
        if self._service_reading and self.wire is not None:
            self.wire.wake_reader()  # the service thread yields to callers
        waiter.event.clear()
        # Checked again after clear(): a wake-up from now on stays set.
        if waiter.ready() or self.dead is not None or not self._leading:
            return
        # Sliced: a promotion lost to an interrupted leader costs SLICE at most.
        waiter.event.wait(SLICE if remaining is None else min(remaining, SLICE))

    def _lead(self, waiter: Waiter, deadline: Optional[float], interrupt: Interrupt = None) -> None:
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
        """Wake one waiter that still needs a reader (leader/follower); re-arm a loop that waited for the lock."""
        parked = self._loop_parked
        if parked is not None:
            self._loop_parked = None
            parked.rearm()
        if not self._waiters:
            # Nobody to wake (the common case: it runs twice per reply).  A
            # waiter registering from now on tries to lead itself next, and the
            # lock is free by then.
            return
        with self._waiters_lock:
            waiters = list(self._waiters)
        for waiter in waiters:
            if not waiter.ready():
                waiter.wake()
                return

    def _dispatch(self, todo: "deque[tuple[int, int, bytes]]", limit: int = -1) -> None:
        """Hand frames to py-amqp's frame handler (our dispatch code only; no user code).

        At most ``limit`` frames if it is positive (an event loop's turn): the
        rest stay in ``todo`` for the next read.

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
        while todo and limit:
            limit -= 1
            wire.in_frame = True
            try:
                handle(todo[0])
            except FATAL_FRAME_ERRORS:
                raise
            except Exception:
                logger.exception("carrot_kombu: error while dispatching a frame; dropping the connection")
                raise
            # Cleared, then removed: no bytecode boundary in between (see _sync).
            wire.in_frame = False
            todo.popleft()

    # -- the service thread ----------------------------------------------------------------------

    def start_service(self, name: str) -> None:
        """Start the service thread (heartbeats, liveness, reading while no caller does)."""
        self._service = Worker(self._service_loop, f"carrot-kombu-io-{name}")
        self._service.start()

    def join(self, timeout: float) -> None:
        service = self._service
        if service is not None:
            service.wait(timeout)

    def _service_loop(self) -> None:
        wire = self.wire
        assert wire is not None
        while self.dead is None:
            try:
                interval = self.housekeeping()
            except Exception as exc:
                self.fail(exc)
                return
            turn = self._loop_turn
            if turn is not None:
                if turn.still_reading() and not self._carries_deliveries():
                    self._sleep(min(interval, LOOP_CHECK))
                    continue
                self._take_back(turn)
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
                # Checked after _service_reading is set: a loop taking its turn
                # from now on wakes this read (read_on checks it after setting _loop_turn).
                if self._loop_turn is None:
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

    # -- an event loop's turn (see .loopturn) -------------------------------------------------------

    def read_on(self, loop: Any) -> None:
        """On ``loop``'s thread, as it flushes publishes: let it read the connection (see :mod:`.loopturn`).

        Does nothing if another loop reads it, or the connection is lost, or
        the loop cannot watch a socket (no ``add_reader``) or the socket is
        green, or a consumer is subscribed on the connection (see
        :meth:`_carries_deliveries`).
        """
        turn = self._loop_turn
        if turn is not None:
            if turn.loop is loop:
                turn.asked += 1
            return
        wire = self.wire
        if wire is None or wire.green or self.dead is not None or self._service is None:
            return
        now = monotonic()
        if now < self._no_turn_until:
            return
        if self._carries_deliveries():
            self._no_turn_until = now + LOOP_CHECK  # looked at again later, not on every flush
            return
        with self._turn_lock:
            if self._loop_turn is not None:
                return
            try:
                turn = LoopTurn(self, wire, loop)
                turn.asked = 1
                turn.watch()
            except (NotImplementedError, OSError, RuntimeError, ValueError):
                return  # a loop that cannot watch sockets (Windows' proactor): the service thread reads
            self._loop_turn = turn
        if self._service_reading:
            wire.wake_reader()  # the service thread steps aside

    def _carries_deliveries(self) -> bool:
        """Whether a consumer is subscribed on this connection: then the loop does not read it.

        Deliveries come in bursts of up to the prefetch count, and their
        dispatch (content assembly, hand-off to the consumers' threads) would
        run on the loop: measured, it pushed an event loop's lag (row 11d:
        8 publishing tasks and a consumer) past its 2 ms goal.  The loop
        reads only a connection whose traffic is its own confirms.
        """
        channels = getattr(self.conn, "channels", None)
        if not channels:
            return False
        return any(getattr(chan, "callbacks", None) for chan in list(channels.values()))

    def _take_back(self, turn: LoopTurn) -> None:
        """The service thread reads again: the loop stopped asking or stopped reading."""
        with self._turn_lock:
            if self._loop_turn is turn:
                self._loop_turn = None
        if self._loop_parked is turn:
            self._loop_parked = None
        turn.end()

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
