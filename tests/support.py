"""Small helpers shared by the unit tests: a call on another thread, a bounded wait.

Kept here, not copied into each module: every test that runs a call in the
background or waits for a condition does it the same way, with a deadline.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

#: Seconds a test waits for something that takes milliseconds when it works.
WAIT = 5.0


class Worker:
    """A thread running ``fn``; :meth:`result` re-raises what it raised (bounded wait)."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self.fn = fn
        self.value: Any = None
        self.error: Optional[BaseException] = None
        self.finished_at: Optional[float] = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"pyamqp-test-{name}", daemon=True)

    @property
    def name(self) -> str:
        return self.thread.name

    def _run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # handed to the test by result()
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self.done.set()

    def start(self) -> "Worker":
        self.thread.start()
        return self

    def result(self, timeout: float = WAIT) -> Any:
        if not self.done.wait(timeout):
            raise AssertionError(f"{self.name} did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self.value

    def exception(self, timeout: float = WAIT) -> BaseException:
        if not self.done.wait(timeout):
            raise AssertionError(f"{self.name} did not finish within {timeout}s")
        assert self.error is not None, f"{self.name} returned {self.value!r} instead of raising"
        return self.error


def in_background(fn: Callable[[], Any], name: str = "call") -> Worker:
    """Run ``fn`` on a new (daemon) thread now; the returned :class:`Worker` tells how it ended."""
    return Worker(fn, name).start()


def wait_until(predicate: Callable[[], Any], timeout: float = WAIT, poll: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passed; its last verdict.

    For states no event announces (a thread count, open descriptors, a
    registry entry); anything that has an event or a condition waits on it.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return bool(predicate())


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    """Wait on the running event loop for ``predicate()`` with a deadline (yielding to the loop between looks)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.005)
    return True


def chain_loops(exc: BaseException) -> list[str]:
    """The chain of causes and contexts from ``exc``; a name repeated at the end if it loops."""
    seen: set[int] = set()
    path: list[str] = []
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            return path + [f"{type(current).__name__} (again)"]
        seen.add(id(current))
        path.append(type(current).__name__)
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return []

