"""Settling a delivery without ever waiting: :func:`nowait` and :class:`WouldWait`.

An event loop must not wait for room in the connection's outgoing buffer
(a stalled peer while other threads publish big messages) to acknowledge a
delivery.  Inside ``with nowait():`` a settlement (ack, reject, requeue) that
would have to wait for room is not written and raises :class:`WouldWait`
instead; the caller hands it to a thread.  What is written is queued and
sent without waiting for the socket (the next writer, or the connection's
service thread, sends what the socket did not take).

No imports from the package: the fenced py-amqp layer reads the flag.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

__all__ = ("WouldWait", "active", "nowait")

_STATE = threading.local()


class WouldWait(Exception):
    """The settlement would have waited for room in the outgoing buffer: nothing was written."""


def active() -> bool:
    """Whether the calling thread is inside ``with nowait():``."""
    return getattr(_STATE, "on", False)


@contextlib.contextmanager
def nowait() -> Iterator[None]:
    """Settlements made by this thread inside the block never wait (see the module)."""
    previous = active()
    _STATE.on = True
    try:
        yield
    finally:
        _STATE.on = previous
