"""Locks, conditions and flags that an exception raised into a thread cannot wedge.

A signal handler that raises (Ctrl-C, ``SIGALRM``, Celery's soft time limit)
does so in the main thread at any bytecode boundary, including inside the
Python-level methods of :class:`threading.Condition` and
:class:`threading.Event`: ``Condition.__enter__`` can acquire its lock and be
interrupted before ``with`` registers the release; ``Condition.__exit__`` can
be interrupted before releasing.  The lock then stays held for ever and the
next thread that needs it (the connection's reader, the supervisor) hangs.

Here every lock a ``with`` statement takes is a C lock (``__enter__`` and
``__exit__`` run without a bytecode boundary), waiting happens on per-waiter C
locks, and every Python-level step is arranged so that an interruption at any
point leaves the shared lock either held by the interrupted ``with`` (which
releases it) or free.  A wake-up lost to an interrupted notifier costs a
waiter at most :data:`SLICE` seconds: waits re-check their predicate that often.

A lock taken without ``with`` (a non-blocking or timed ``acquire``) is an
RLock handed over to a ``with`` at once (:func:`run_locked` does it)::

    try:
        if not lock.acquire(False):
            return
        with lock:          # a second level, released by the C-level exit
            lock.release()  # the first level: only the ``with`` holds it now
            ...
    finally:
        if lock._is_owned():  # interrupted before the hand-over
            lock.release()

A release written in a ``finally`` (or a helper it calls) is Python code: an
interrupt landing just before it skipped it, and the lock stayed held for
ever.  With the hand-over, that takes a second interrupt within the few
bytecodes before ``lock.release()``.  A caller that may already hold the lock
(re-entry from its own callback) must not use the ``finally``: it would give
back the outer level: it checks :func:`owned` first and takes a plain
``with``.

No imports from the package: the fenced py-amqp layer uses this too.
"""

from __future__ import annotations

import enum
import os
import threading
from _thread import allocate_lock
from time import monotonic
from typing import Any, Callable, Literal, Optional, TypeVar, Union

__all__ = ("Flag", "Monitor", "NOT_ACQUIRED", "SLICE", "Worker", "owned", "raised_by_library", "run_locked")

T = TypeVar("T")

#: Longest a waiter sleeps before it looks at its predicate again.
SLICE = 0.25


class _NotAcquired(enum.Enum):
    NOT_ACQUIRED = "not acquired"


#: What :func:`run_locked` returns when the lock was not acquired.
NOT_ACQUIRED = _NotAcquired.NOT_ACQUIRED


def owned(lock: Any) -> bool:
    """Whether the calling thread holds ``lock`` (a ``threading.RLock``)."""
    return bool(lock._is_owned())


def run_locked(
    lock: Any, fn: Callable[[], T], blocking: bool = True, timeout: float = -1
) -> Union[T, Literal[_NotAcquired.NOT_ACQUIRED]]:
    """``fn()`` with ``lock`` (an RLock) held, taken as ``lock.acquire(blocking, timeout)``; the hand-over idiom.

    The lock is released whatever interrupts this thread (see the module
    docstring).  Not for a thread that may already hold ``lock`` (the
    ``finally`` would give back the outer level): check :func:`owned` and
    use a plain ``with lock:`` then.

    Returns:
        What ``fn`` returned, or :data:`NOT_ACQUIRED` (``fn`` did not run).
    """
    try:
        if not lock.acquire(blocking, timeout):
            return NOT_ACQUIRED
        # The ``with`` takes a second level and the first is given back at
        # once: from then on its C-level exit releases the lock.
        with lock:
            lock.release()
            return fn()
    finally:
        if lock._is_owned():  # interrupted before the hand-over
            lock.release()


class Monitor:
    """A re-entrant C lock (:attr:`lock`, for ``with``) with condition-variable waits.

    Use ``with monitor.lock:`` (never ``with monitor:``); :meth:`wait`,
    :meth:`wait_for` and :meth:`notify_all` are called with the lock held.
    Waits may wake spuriously: callers loop on their predicate.
    """

    __slots__ = ("lock", "_waiters")

    def __init__(self) -> None:
        self.lock = threading.RLock()  # the C implementation: owner-aware, signal-safe ``with``
        self._waiters: list[Any] = []

    def wait(self, timeout: Optional[float] = None) -> None:
        """Release the lock, sleep until notified (or ``timeout``, at most :data:`SLICE`), take it again."""
        lock = self.lock
        waiter = allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)
        seconds = SLICE if timeout is None else max(0.0, min(timeout, SLICE))
        saved: Any = None
        try:
            # Inside the try: whatever interrupts us from here on, the finally
            # hands the lock back to the ``with`` that owns it.
            saved = lock._release_save()  # type: ignore[attr-defined]  # all levels, like Condition.wait
            waiter.acquire(True, seconds)
        finally:
            if not lock._is_owned():  # type: ignore[attr-defined]
                if saved is not None:
                    lock._acquire_restore(saved)  # type: ignore[attr-defined]
                else:
                    lock.acquire()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass  # notified: already taken off

    def wait_for(self, predicate: Callable[[], Any], timeout: Optional[float]) -> Any:
        """Wait until ``predicate()`` is true or ``timeout`` passes; its last value."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                return result
            self.wait(remaining)

    def notify(self) -> None:
        """Wake the longest waiting thread."""
        if self._waiters:
            self._waiters.pop(0).release()

    def notify_all(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.release()


class Flag:
    """:class:`threading.Event`'s ``set``/``clear``/``is_set``/``wait``, on one C lock.

    :attr:`_set` is the truth; the lock only puts waiters to sleep (held while
    the flag is clear, released by ``set``).  No Python-level lock is
    involved.  A waiter interrupted between taking the lock and giving it
    back leaves it held while the flag is set: ``is_set`` and new waits still
    see the flag set at once, and waiters already asleep see it within
    :data:`SLICE` (waits are sliced).
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._set = False
        self._lock = allocate_lock()
        self._lock.acquire()

    def set(self) -> None:
        self._set = True
        try:
            self._lock.release()
        except RuntimeError:
            pass  # already released

    def clear(self) -> None:
        self._set = False
        self._lock.acquire(False)

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: Optional[float] = None) -> bool:
        """True once set (at once if it is), False after ``timeout`` seconds."""
        deadline = None if timeout is None else monotonic() + max(0.0, timeout)
        while not self._set:
            remaining = SLICE if deadline is None else min(SLICE, deadline - monotonic())
            if remaining <= 0:
                return False
            if self._lock.acquire(True, remaining):
                if self.is_set():  # (a call: set by another thread while we slept)
                    try:
                        self._lock.release()  # stay set for the others
                    except RuntimeError:
                        pass  # a set() came in between: set it is
                # Not set: a clear() raced a set() and left the lock free; kept
                # held, as a clear flag's is (the next wait sleeps, not spins).
        return True


class Worker:
    """A daemon thread whose end is waited for on a :class:`Flag`, never with ``Thread.join``.

    An exception raised into ``Thread.join`` (Python 3.11, bpo-45274's
    handler) releases the running thread's state lock: from then on the
    thread counts as stopped while it still runs, and every later ``join``
    and ``is_alive`` lies.  :attr:`ended` is set by the thread itself, last.

    An exception raised into ``Thread.start`` itself can also leave a thread
    that got an id but died in its bootstrap (``del _limbo[self]``: KeyError)
    before running anything: it never sets :attr:`ended`.  Such a thread
    counts as ended once it is gone (``began`` is set by the thread first,
    so ``is_alive`` is only trusted for one that never began).
    """

    __slots__ = ("thread", "ended", "began")

    def __init__(self, target: Callable[[], Any], name: str) -> None:
        self.ended = Flag()
        self.began = False

        def run() -> None:
            self.began = True
            try:
                target()
            finally:
                self.ended.set()

        self.thread = threading.Thread(target=run, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _died_unstarted(self) -> bool:
        return not self.began and self.thread.ident is not None and not self.thread.is_alive()

    def running(self) -> bool:
        """Started and not ended (a worker never started, or dead before it began, counts as ended)."""
        return self.thread.ident is not None and not self.ended.is_set() and not self._died_unstarted()

    def wait(self, timeout: Optional[float]) -> bool:
        """True once the thread ended; False after ``timeout``, or if called from the thread itself."""
        if self.thread is threading.current_thread():
            return False
        if self.thread.ident is None:
            return True
        deadline = None if timeout is None else monotonic() + max(0.0, timeout)
        while True:
            if self._died_unstarted():
                return True
            step = SLICE if deadline is None else min(SLICE, deadline - monotonic())
            if step <= 0:
                return self.ended.is_set()
            if self.ended.wait(step):
                return True


_LIBRARIES = tuple(
    os.path.dirname(os.path.abspath(module.__file__ or ""))
    for module in (__import__("amqp"), __import__("kombu"))
) + (os.path.dirname(os.path.abspath(__file__)),)


def raised_by_library(exc: BaseException) -> bool:
    """Raised by code of ours, py-amqp or kombu, not by a signal handler of the application.

    A signal handler's exception belongs to the interrupted caller (Celery's
    soft time limit, a ``SIGALRM`` timeout): it must reach it unchanged,
    never be logged and swallowed or turned into one of our errors.
    ``KeyboardInterrupt`` (raised by C code, its traceback ends wherever it
    struck) and other non-``Exception`` classes are never ours.
    """
    if not isinstance(exc, Exception):
        return False
    tb = exc.__traceback__
    if tb is None:
        return True
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_LIBRARIES)
