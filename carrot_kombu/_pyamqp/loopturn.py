"""An event loop's turn at reading the connection: :class:`LoopTurn`.

An event loop awaiting confirms was told of each one by two thread
hand-offs: the socket woke the connection's service thread, which
dispatched the confirm and woke the loop through its self-pipe (measured:
most of the gap to aio-pika on one task publishing one by one, row 11a).
While a loop keeps publishing, it reads the socket itself instead, as
aio-pika does: the socket is watched with ``loop.add_reader`` and each
readiness is one non-blocking pump and dispatch on the loop (a leader's turn:
``_read_lock`` taken without waiting; at most :data:`FRAMES_PER_TURN` frames
per callback, the rest in the next iteration, so that a burst of deliveries
never holds the loop long).  What the loop dispatches only settles and
queues, as any reader's dispatch; a confirm it settles completes its future
directly (no self-pipe).

Who reads, and when it changes:

* A loop asks for the turn each time it flushes (:meth:`Reader.read_on`); the
  service thread then stops reading (woken out of its wait if it was
  reading) and keeps only heartbeats and liveness, looking every
  :data:`LOOP_CHECK` seconds at whether the loop still reads.
* The service thread takes reading back when the loop stopped asking (no
  flush since its last look) or stopped reading (bytes wait and the loop has
  not pumped since its last look: a loop blocked by user code, stopped or
  closed).  So the connection is never left unread for more than about two
  looks, and a loop never waits for the service thread.
* A caller waiting for a reply still reads for itself when nobody holds the
  read lock.  A loop that finds the lock held stops watching the socket (a
  level-triggered readiness it cannot act on would spin the loop) and is
  re-armed by whoever releases the lock (:meth:`Reader._promote`).
* The loop watches its own duplicate of the socket's descriptor, closed only
  after it stopped watching it: the socket may be closed (and its number
  reused) on another thread while the loop still watches.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .._sync import NOT_ACQUIRED, run_locked

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

    from .wire import Wire


class ReaderSide(Protocol):
    """What a loop's turn uses of its :class:`~.reader.Reader` (named here: reader imports this module).

    The turn is the reader's, for the loop's thread: it takes the reader's
    read lock and marks itself parked or done on the reader, as a leader does.
    """

    dead: Optional[BaseException]
    _loop_turn: Optional["LoopTurn"]
    _loop_parked: Optional["LoopTurn"]
    _read_lock: Any
    _leading: bool
    _waiters: Any

    def wire_failure(self, exc: BaseException) -> BaseException: ...

    def _promote(self) -> None: ...

    def _dispatch(self, todo: Any, limit: int = -1) -> None: ...

__all__ = ("FRAMES_PER_TURN", "LOOP_CHECK", "LoopTurn")

logger = logging.getLogger("carrot_kombu.amqp")

#: Seconds between the service thread's looks at a loop that reads the connection.
LOOP_CHECK = 0.05
#: Most frames one loop callback dispatches (bounds its time on the loop).
FRAMES_PER_TURN = 64


class LoopTurn:
    """One event loop reading one connection (see the module docstring).

    Made, watched and ended on the loop's thread, except :meth:`still_reading`
    and :meth:`end`, which the service thread calls.
    """

    __slots__ = ("loop", "_reader", "_wire", "_fd", "asked", "pumps", "_seen", "_watching", "_ended", "_more")

    def __init__(self, reader: ReaderSide, wire: "Wire", loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._reader = reader
        self._wire = wire
        self._fd = -1
        self._fd = os.dup(wire.fileno())
        #: Bumped by every flush of the loop (:meth:`Reader.read_on`).
        self.asked = 0
        #: Bumped by every pump on the loop.
        self.pumps = 0
        #: ``(asked, pumps)`` at the service thread's last look.
        self._seen = (0, -1)
        self._watching = False
        self._ended = False
        self._more = False

    def __del__(self) -> None:
        # A loop closed without running our end: its selector is gone with it.
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass

    # -- the loop's thread ----------------------------------------------------------------------

    def watch(self) -> None:
        """Watch the socket for readability (raises what ``add_reader`` raises, e.g. NotImplementedError)."""
        if not self._watching and not self._ended:
            self.loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self._fd)

    def _finish(self) -> None:
        """The turn is over: stop watching, then close our descriptor (in that order: see the module docstring)."""
        self._ended = True
        reader = self._reader
        if reader._loop_parked is self:
            reader._loop_parked = None
        if self.loop.is_closed():
            return  # __del__ closes the descriptor
        self._unwatch()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def _readable(self) -> None:
        """The socket is readable (or frames are left over): one bounded, non-blocking pump."""
        reader = self._reader
        if self._ended or reader._loop_turn is not self or reader.dead is not None:
            self._finish()
            return
        self._more = False
        try:
            got = run_locked(reader._read_lock, self._pump, blocking=False)
        except Exception as exc:
            failure = reader.wire_failure(exc)
            self._finish()
            if failure is exc:
                raise  # not the connection's (a signal handler's): the loop reports it
            logger.debug("carrot_kombu: the connection failed while the event loop read it: %r", exc)
            return
        if got is NOT_ACQUIRED:
            self._park()
            return
        if reader._waiters:
            reader._promote()  # a caller that followed while we held the lock
        if self._more:
            self.loop.call_soon(self._readable)

    def _pump(self) -> bool:
        reader = self._reader
        reader._leading = True
        try:
            self.pumps += 1
            return self._wire.pump(self._dispatch)
        finally:
            reader._leading = False

    def _dispatch(self, todo: Any) -> None:
        self._reader._dispatch(todo, FRAMES_PER_TURN)
        self._more = bool(todo)

    def _park(self) -> None:
        """Another thread reads: stop watching until it lets go (it re-arms us, see :meth:`rearm`)."""
        reader = self._reader
        self._unwatch()
        reader._loop_parked = self
        # It may have let go before it could see us parked: look once more
        # (and try again in the next iteration, never by recursion here).
        if run_locked(reader._read_lock, _nothing, blocking=False) is not NOT_ACQUIRED:
            if reader._loop_parked is self:
                reader._loop_parked = None
            self.loop.call_soon(self._rearmed)

    def _rearmed(self) -> None:
        if not self._ended and self._reader._loop_turn is self:
            self.watch()
            self._readable()  # what arrived meanwhile may already wait
        elif not self._ended:
            self._finish()

    # -- other threads ------------------------------------------------------------------------------

    def rearm(self) -> None:
        """From the thread that released the read lock: watch the socket again."""
        try:
            self.loop.call_soon_threadsafe(self._rearmed)
        except RuntimeError:
            pass  # the loop is closed: the service thread takes reading back at its next look

    def end(self) -> None:
        """From the service thread, which reads again from now on: the loop stops watching."""
        try:
            self.loop.call_soon_threadsafe(self._finish)
        except RuntimeError:
            pass  # the loop is closed: __del__ closes the descriptor

    def still_reading(self) -> bool:
        """The service thread's look: False if the loop stopped asking, or stopped reading.

        Stopped asking: no flush since the last look.  Stopped reading: bytes
        wait unread and the loop has not pumped since the last look.
        """
        asked, pumps = self.asked, self.pumps
        seen_asked, seen_pumps = self._seen
        self._seen = (asked, pumps)
        if asked == seen_asked or self._ended:
            return False
        if pumps == seen_pumps and self._wire.readable():
            return False
        return True


def _nothing() -> bool:
    return True
