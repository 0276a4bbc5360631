"""Messages whose outcome is reported to a hook instead of waited for (``publish_async``, asyncio)."""

from __future__ import annotations

import threading
from typing import Callable, Optional, Protocol

from ._deadline import Deadline
from ._metrics import Metrics, now
from ._pending import _first_error, _Pending, _timeout_error



class Publisher(Protocol):
    """What a :class:`Submission` needs of its publisher (``publisher.Publisher``)."""

    metrics: Metrics

    def forget_all(self, pendings: list[_Pending]) -> None: ...

    def _missing(self) -> str: ...

__all__ = ("Submission",)


class Submission:
    """Messages whose outcome is reported to a hook instead of waited for.

    The completion hook of ``publish_async`` and of the asyncio API: no
    thread waits for these confirms.  ``on_settled(submission)`` runs exactly
    once: when the last message settled (on the thread that settled it,
    usually the one reading the connection, under the publisher's lock: it
    must only hand off, as ``loop.call_soon_threadsafe`` or a queue put
    does), or from :meth:`expire`.  Then :attr:`error` is what the blocking
    ``publish_many`` would have raised (None: every message was confirmed).
    """

    __slots__ = ("_publisher", "pendings", "deadline", "_on_settled", "_left", "_lock", "settled", "error",
                 "started")

    def __init__(self, publisher: Publisher, pendings: list[_Pending], deadline: Deadline,
                 on_settled: Callable[["Submission"], None]) -> None:
        self._publisher = publisher
        self.pendings = pendings
        self.deadline = deadline
        self._on_settled = on_settled
        self._left = len(pendings) + 1  # + 1 for start(): nothing is reported before submit() returned
        self._lock = threading.Lock()
        self.settled = False
        self.error: Optional[BaseException] = None
        self.started = now()
        for pending in pendings:
            pending.on_done = self._one_done

    def start(self) -> None:
        """Submitted: from now on the last settlement reports."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish(None)

    def _one_done(self, pending: _Pending) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._finish(None)

    def _finish(self, timeout: Optional[BaseException]) -> bool:
        with self._lock:
            if self.settled:
                return False
            self.settled = True
        self.error = timeout if timeout is not None else _first_error(self.pendings)
        self._on_settled(self)
        return True

    def expire(self) -> None:
        """The deadline passed: the first unsettled message's :class:`PublishTimeout`; the rest are forgotten."""
        total = len(self.pendings)
        for index, pending in enumerate(self.pendings):
            if pending.outcome is None:
                if self._finish(_timeout_error(pending, self.deadline, index, total, self._publisher._missing())):
                    self._publisher.forget_all(self.pendings)
                return

    def cancel(self) -> None:
        """Its caller is gone: nothing is reported; unsettled messages are forgotten (never published again)."""
        with self._lock:
            if self.settled:
                return
            self.settled = True
        self._publisher.forget_all(self.pendings)

    def record(self) -> None:
        """Count the outcomes in the manager's metrics (on the caller's side, never the reading thread)."""
        self._publisher.metrics.publish_ended(self.pendings, self.started, self.deadline)
