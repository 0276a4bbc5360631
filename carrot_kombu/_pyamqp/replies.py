"""What a thread waits for on a supervised connection, and what the connection reports to its owner.

A :class:`Waiter` is anything a thread can block on while the connection's
current reader (see :mod:`.reader`) dispatches; a :class:`Reply` is one
expected answer of the broker, registered before its request is written.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Iterable, Optional

from .._sync import Flag

__all__ = ("ConnHooks", "Reply", "ReplyPhase", "Waiter", "copy_error")


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


class ReplyPhase(enum.Enum):
    """Where a :class:`Reply` is: awaited, arrived (``args``), or failed (``error``)."""

    PENDING = "pending"
    ARRIVED = "arrived"
    FAILED = "failed"


class Reply(Waiter):
    """One expected reply: registered before its request is written.

    ``args`` and ``error`` are the truth (written once, each a single store,
    so that a reader interrupted anywhere leaves a consistent reply);
    :attr:`phase` names the combination.
    """

    __slots__ = ("methods", "args", "error", "on_arrival")

    def __init__(self, methods: Iterable[Any], on_arrival: Optional[Callable[["Reply"], None]] = None) -> None:
        super().__init__()
        self.methods = tuple(methods)
        self.args: Optional[tuple[Any, ...]] = None
        self.error: Optional[BaseException] = None
        #: Internal continuation run by the reading thread (never user code).
        self.on_arrival = on_arrival

    @property
    def phase(self) -> ReplyPhase:
        if self.args is not None:
            return ReplyPhase.ARRIVED
        return ReplyPhase.PENDING if self.error is None else ReplyPhase.FAILED

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


def copy_error(error: BaseException) -> BaseException:
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
