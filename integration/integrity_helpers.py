"""Helpers for ``test_integrity.py``: waiting with deadlines, reading queues back, interrupting waits.

Nothing here sleeps and hopes: every wait has a deadline and says what it
waited for when it runs out.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import kombu

from carrot_kombu import ConnectionManager

from .broker import rabbitmqctl


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is truthy (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class Collector:
    """Reads a queue back through ``manager.consume`` (no_ack): every body, duplicates included."""

    def __init__(self, manager: ConnectionManager, queue: str) -> None:
        self.cond = threading.Condition()
        self.bodies: list[Any] = []
        self.redelivered: list[Any] = []
        self._consumer = manager.consume(kombu.Queue(queue), self._on_message, no_ack=True, declare=False)

    def _on_message(self, body: Any, message: Any) -> None:
        with self.cond:
            self.bodies.append(body)
            if message.delivery_info.get("redelivered"):
                self.redelivered.append(body)
            self.cond.notify_all()

    def wait_for(self, expected: Iterable[Any], timeout: float) -> set[Any]:
        """Wait until every body of ``expected`` arrived; returns the ones still missing."""
        wanted = set(expected)
        with self.cond:
            self.cond.wait_for(lambda: wanted <= set(self.bodies), timeout)
            return wanted - set(self.bodies)

    def wait_quiet(self, quiet: float, timeout: float) -> None:
        """Wait until nothing arrived for ``quiet`` seconds (at most ``timeout``)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while time.monotonic() < deadline:
                seen = len(self.bodies)
                self.cond.wait(min(quiet, max(0.0, deadline - time.monotonic())))
                if len(self.bodies) == seen:
                    return

    def snapshot(self) -> list[Any]:
        with self.cond:
            return list(self.bodies)

    def close(self) -> None:
        self._consumer.cancel()

    def __enter__(self) -> "Collector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queue_depth(manager: ConnectionManager, queue: str) -> int:
    with manager.channel(timeout=10) as lease:
        return int(lease.queue_declare(queue, passive=True).message_count)


def declare_queue(manager: ConnectionManager, name: str, **arguments: Any) -> str:
    """A plain queue that expires 2 minutes after its last use (tests leave no junk behind)."""
    with manager.channel(timeout=10) as lease:
        lease.queue_declare(name, durable=False, auto_delete=False,
                            arguments={"x-expires": 120_000, **arguments})
    return name


def broker_queue_names() -> set[str]:
    out = rabbitmqctl("list_queues", "name", "-q", "--no-table-headers")
    return {line.strip() for line in out.splitlines() if line.strip()}


def carrot_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("carrot-kombu") and t.is_alive()}


class Interrupted(Exception):
    """Raised by the SIGALRM handler of :func:`interrupt_after` inside whatever the main thread does."""


@contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise :class:`Interrupted` in the main thread after ``seconds`` (once), like a user's signal handler."""
    armed = [True]

    def handler(signum: int, frame: Any) -> None:
        if armed[0]:
            armed[0] = False
            raise Interrupted(f"interrupted after {seconds}s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Background:
    """Runs ``fn`` on a daemon thread; once :attr:`done` is set, ``error``, ``elapsed`` and ``ended_at`` tell how it went.

    Whatever ``fn`` raises is kept for the test to judge (never an unhandled thread exception).
    """

    def __init__(self, fn: Callable[[], Any], name: str = "integrity-background") -> None:
        self.done = threading.Event()
        self.error: Optional[BaseException] = None
        self.elapsed = 0.0
        self.ended_at = 0.0
        threading.Thread(target=self._run, args=(fn,), name=name, daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        self.error, self.elapsed = timed(fn)
        self.ended_at = time.monotonic()
        self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def timed(fn: Callable[[], Any]) -> tuple[Optional[BaseException], float]:
    """Run ``fn``; return (its exception or None, seconds it took)."""
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the caller judges it
        return exc, time.monotonic() - start
    return None, time.monotonic() - start
