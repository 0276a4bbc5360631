"""The one owner of "are we connected, and to which connection?".

The supervisor alone attaches a link when it is ready to serve and detaches
it when it is lost or stopped; everyone else only asks (:meth:`current`,
:meth:`require`, :meth:`is_live`) or waits (:meth:`wait`).  A link that died
is hidden at once, before the supervisor gets to detach it: no lease is
handed out on a dead connection meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from ._sync import Monitor
from .exceptions import Disconnected

if TYPE_CHECKING:
    from ._link import Link

__all__ = ("LiveConnection",)


class LiveConnection:
    """The live link of one manager (or why there is none)."""

    def __init__(self) -> None:
        self._cond = Monitor()
        #: The attached link (read by anyone; only attach/detach write it).
        #: It may have died since: :meth:`current` hides a dead one.
        self.link: Optional["Link"] = None
        self._down: Optional[BaseException] = None
        self._down_message = "not connected yet"
        self._watchers: list[Callable[[], None]] = []
        #: The manager stopped: nobody waits for a link any more (a restart builds a new one).
        self._closed = False

    # -- the supervisor ------------------------------------------------------------------------

    def attach(self, link: "Link") -> None:
        """``link`` is served from now on."""
        with self._cond.lock:
            self.link = link
            self._down = None
            self._cond.notify_all()
        self._changed()

    def detach(self, message: str, reason: Optional[BaseException], generation: Optional[int] = None) -> bool:
        """No link is served any more; False if ``generation`` is not the live one (nothing changes)."""
        with self._cond.lock:
            link = self.link
            if generation is not None and (link is None or link.generation != generation):
                return False
            self.link = None
            self._down_message, self._down = message, reason
            self._cond.notify_all()
        self._changed()
        return True

    def set_down(self, message: str, reason: Optional[BaseException]) -> None:
        """Why there is no link (a failed attempt, giving up); ignored while a link is attached."""
        with self._cond.lock:
            if self.link is None:
                self._down_message, self._down = message, reason
                self._cond.notify_all()

    def close(self, message: str) -> None:
        """The manager stops (any thread, never blocks): waiters for a link return now, without one."""
        with self._cond.lock:
            self._closed = True
            if self.link is None:
                self._down_message, self._down = message, None
            self._cond.notify_all()
        self._changed()

    def wake(self) -> None:
        """A link died (any thread, never blocks): waiters look again."""
        with self._cond.lock:
            self._cond.notify_all()
        self._changed()

    def watch(self, callback: Callable[[], None]) -> None:
        """``callback()`` after every change (supervisor or link thread; must not block)."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        for callback in list(self._watchers):
            callback()

    def forget_after_fork(self) -> Optional["Link"]:
        """In a forked child (single thread, no lock taken): no link; returns the parent's."""
        link, self.link = self.link, None
        self._cond = Monitor()
        self._down, self._down_message = None, "the process forked; this connection belongs to the parent"
        return link

    # -- everyone else -----------------------------------------------------------------------------

    def current(self) -> Optional["Link"]:
        """The live link, or None (none attached, or it died)."""
        link = self.link
        if link is None or link.dead is not None:
            return None
        return link

    @property
    def generation(self) -> Optional[int]:
        link = self.current()
        return None if link is None else link.generation

    def is_live(self, generation: int) -> bool:
        link = self.link
        return link is not None and link.generation == generation and link.dead is None

    def require(self) -> "Link":
        """The live link.

        Raises:
            Disconnected: There is none; the error says why.
        """
        link = self.current()
        if link is None:
            raise self.down_error()
        return link

    def wait(self, timeout: Optional[float]) -> Optional["Link"]:
        """The live link, waiting up to ``timeout`` for one (not past :meth:`close`)."""
        with self._cond.lock:
            self._cond.wait_for(lambda: self._closed or self.current() is not None, timeout)
        return self.current()

    def down_error(self) -> Disconnected:
        """Why there is no live link, as users see it (a fresh instance)."""
        link = self.link
        dead = None if link is None else link.dead
        if dead is not None:
            return Disconnected(f"connection lost: {type(dead).__name__}: {dead}", dead)
        reason, text = self._down, self._down_message
        if reason is not None:
            text = f"{text}: {type(reason).__name__}: {reason}"
        return Disconnected(text, reason)

    def down_reason(self) -> Optional[BaseException]:
        link = self.link
        dead = None if link is None else link.dead
        return dead if dead is not None else self._down

    def stale_error(self) -> Disconnected:
        return Disconnected("the connection this lease was taken on is gone; take a new lease", self.down_reason())


