"""A lazily started helper thread that runs handed-off work in order, and timers: :class:`Handoff`.

Used where the caller must not wait and no thread may be spent per call:
``publish_async`` completes its ``concurrent.futures.Future`` here (so that
user done-callbacks never run on the thread reading the connection) and
expires it at its deadline; the asyncio API hands over the rare publish
that would have to wait (no free slot, a blocked connection).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque
from typing import Callable, Optional

from ._deadline import clock
from ._sync import Worker

__all__ = ("Handoff", "Timer")

logger = logging.getLogger("carrot_kombu")

Work = Callable[[], None]


class Timer:
    """A scheduled call; :meth:`cancel` makes it a no-op (it leaves the heap when due, or on a cleanup)."""

    __slots__ = ("at", "work")

    def __init__(self, at: float, work: Optional[Work]) -> None:
        self.at = at
        self.work = work

    def cancel(self) -> None:
        self.work = None


class Handoff:
    """One daemon thread (started on first use, ended after ``idle`` seconds without work).

    Work runs in the order handed over; an exception in one is logged and
    the thread goes on.  Nothing here blocks its callers.
    """

    def __init__(self, name: str, idle: float = 5.0) -> None:
        self._name = name
        self._idle = idle
        self._cond = threading.Condition(threading.Lock())
        self._todo: deque[Work] = deque()
        self._timers: list[tuple[float, int, Timer]] = []
        self._live_timers = 0
        self._seq = itertools.count()
        self._worker: Optional[Worker] = None
        self._retire = False

    def call(self, work: Work) -> None:
        """Run ``work`` on the helper thread, after what was handed over before."""
        with self._cond:
            self._todo.append(work)
            self._ensure_running()
            self._cond.notify()

    def call_at(self, at: float, work: Work) -> Timer:
        """Run ``work`` on the helper thread at ``at`` (``clock()``), unless cancelled first."""
        timer = Timer(at, work)
        with self._cond:
            self._live_timers += 1
            if len(self._timers) > 64 and len(self._timers) > 2 * self._live_timers:
                # Mostly cancelled (settled publishes): drop them, so the heap
                # holds what is live, not every publish of the last timeout.
                self._timers = [entry for entry in self._timers if entry[2].work is not None]
                heapq.heapify(self._timers)
            heapq.heappush(self._timers, (at, next(self._seq), timer))
            self._ensure_running()
            self._cond.notify()
        return timer

    def cancel(self, timer: Timer) -> None:
        with self._cond:
            if timer.work is not None:
                timer.work = None
                self._live_timers -= 1

    def retire(self) -> None:
        """The manager stops: the thread ends as soon as nothing is left to run (not ``idle`` later).

        Work handed over afterwards (the last settlements) still runs, on a
        thread started for it if needed, which ends right after it.
        """
        with self._cond:
            self._retire = True
            self._cond.notify()

    def resume(self) -> None:
        """The manager starts again: an idle thread waits ``idle`` seconds for more work again."""
        with self._cond:
            self._retire = False

    def _ensure_running(self) -> None:
        # Under the lock.
        if self._worker is None:
            self._worker = Worker(self._run, self._name)
            self._worker.start()

    def _run(self) -> None:
        idle_since = clock()
        while True:
            with self._cond:
                batch: list[Work] = []
                while True:
                    now = clock()
                    while self._timers and self._timers[0][0] <= now:
                        timer = heapq.heappop(self._timers)[2]
                        if timer.work is not None:
                            batch.append(timer.work)
                            timer.work = None
                            self._live_timers -= 1
                    batch.extend(self._todo)
                    self._todo.clear()
                    if batch:
                        break
                    if self._live_timers == 0 and (self._retire or now - idle_since >= self._idle):
                        self._worker = None  # the next call starts another thread
                        return
                    wait = self._idle if not self._timers else self._timers[0][0] - now
                    self._cond.wait(max(0.0, min(wait, self._idle)))
            for work in batch:
                try:
                    work()
                except Exception:  # noqa: BLE001 - one failing piece of work must not end the others
                    logger.exception("carrot_kombu: error in handed-off work on %s", self._name)
            idle_since = clock()
