"""Event subscription and delivery, off every internal lock and off the I/O threads."""

from __future__ import annotations

import logging
import queue
import threading
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
        self._thread: Optional[Worker] = None

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
            if self._thread is None or not self._thread.running():
                self._thread = Worker(self._run, self._name)
                self._thread.start()

    def post(self, event: str, *args: Any) -> None:
        self._queue.put((event, args))

    def close(self, timeout: Optional[float] = None) -> None:
        """Deliver what was posted, then end the dispatcher thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is None:
            return
        self._queue.put(_STOP)
        thread.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            event, args = item
            with self._lock:
                callbacks = self._subscribers[event]
            for callback in callbacks:
                try:
                    callback(*args)
                except Exception:
                    logger.exception("carrot_kombu %r callback %r failed", event, callback)


def _check_event(event: str) -> None:
    if event not in EVENTS:
        raise ConfigurationError(f"unknown event {event!r}; known: {sorted(EVENTS)}")
