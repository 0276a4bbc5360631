"""Event subscription and delivery, off every internal lock and off the I/O threads."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from ._sync import Worker
from .exceptions import ConfigurationError

__all__ = ("EVENTS", "EventBus")

logger = logging.getLogger("carrot_kombu")

#: Event names and the arguments their callbacks receive.
EVENTS = {
    "connecting": (),
    "connected": (),
    "connect_failed": ("error", "delay"),
    "disconnected": ("error",),
    "blocked": ("reason",),
    "unblocked": (),
    "stopped": (),
    "consumer_cancelled": ("queue",),
    "consumer_error": ("queue", "error", "outcome"),
    "degraded": ("what", "error"),
    "recovered": ("what",),
}

Callback = Callable[..., Any]
_STOP = object()


class EventBus:
    """Delivers events in order on one dispatcher thread.

    The supervisor and the reader only *post*; callbacks run on the
    ``carrot-kombu-events`` thread, so a slow callback can delay other
    callbacks but never a heartbeat, a reconnect or a frame.  A callback that
    raises is logged and the others still run.
    """

    def __init__(self, name: str = "carrot-kombu-events") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._subscribers: dict[str, tuple[Callback, ...]] = {e: () for e in EVENTS}
        self._queue: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        #: The dispatcher; cleared by the dispatcher itself as it leaves.
        self._thread: Optional[Worker] = None
        self._closing = False
        #: Dispatcher threads running, strays included (see _dispatch).
        self._live: set[threading.Thread] = set()

    def on(self, event: str, callback: Callback) -> Callback:
        _check_event(event)
        if not callable(callback):
            raise ConfigurationError(f"callback for {event!r} must be callable")
        with self._lock:
            self._subscribers[event] += (callback,)
        return callback

    def off(self, event: str, callback: Callback) -> None:
        _check_event(event)
        with self._lock:
            subs = list(self._subscribers[event])
            if callback in subs:
                subs.remove(callback)
            self._subscribers[event] = tuple(subs)

    def fork(self) -> "EventBus":
        """A fresh bus with the same subscribers (for a forked child process)."""
        child = EventBus(self._name)
        child._subscribers = dict(self._subscribers)
        return child

    def start(self) -> None:
        with self._lock:
            # A close() in progress (or interrupted) is called off: the
            # dispatcher ignores its stop mark, or has already left and
            # cleared _thread, under this same lock (one dispatcher at a time:
            # two would deliver out of order, and a stop mark could end the
            # wrong one).
            self._closing = False
            if self._thread is None or not self._thread.running():  # (or it died of a BaseException)
                self._thread = Worker(self._run, self._name)
                self._thread.start()

    def post(self, event: str, *args: Any) -> None:
        self._queue.put((event, args))

    def close(self, timeout: Optional[float] = None) -> None:
        """Deliver what was posted, then end the dispatcher thread."""
        with self._lock:
            thread = self._thread
            self._closing = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if thread is not None:
            self._queue.put(_STOP)
            if not thread.wait(timeout):
                return
        with self._lock:
            strays = len(self._live) if self._thread is None else 0
        if not strays:
            return
        # Rare (see _dispatch): each stray leaves on one stop mark, after the
        # one item it may be delivering; polled, not joined (see _sync.Worker).
        for _ in range(strays):
            self._queue.put(_STOP)
        while self._live and self._thread is None:
            if deadline is not None and time.monotonic() >= deadline:
                return
            time.sleep(0.005)

    def _run(self) -> None:
        me = threading.current_thread()
        with self._lock:
            self._live.add(me)
        try:
            self._dispatch(me)
        finally:
            with self._lock:
                self._live.discard(me)

    def _dispatch(self, me: threading.Thread) -> None:
        while True:
            item = self._queue.get()
            with self._lock:
                # A stray: a start() interrupted inside Thread.start() was
                # followed by another start(), yet the first thread did
                # start.  It leaves after at most one item, passing a stop
                # mark on to the current dispatcher if there is one.
                current = self._thread
                mine = current is not None and current.thread is me
                if item is _STOP:
                    if not mine:
                        if current is not None:
                            self._queue.put(_STOP)
                        return
                    if self._closing:
                        self._thread = None
                        return
                    continue  # from a close() that start() called off since
                event, args = item
                callbacks = self._subscribers[event]
            for callback in callbacks:
                try:
                    callback(*args)
                except Exception:
                    logger.exception("carrot_kombu %r callback %r failed", event, callback)
            if not mine:
                return


def _check_event(event: str) -> None:
    if event not in EVENTS:
        raise ConfigurationError(f"unknown event {event!r}; known: {sorted(EVENTS)}")
