"""Event recording for tests: wait on events with deadlines, never sleep."""

from __future__ import annotations

import threading
from typing import Any, Callable

from carrot_kombu import ConnectionManager


class Recorder:
    """Collects events; tests wait for them with deadlines, never sleep."""

    EVENTS = (
        "connecting", "connected", "connect_failed", "disconnected", "blocked", "unblocked", "stopped",
        "consumer_cancelled",
    )

    def __init__(self, manager: ConnectionManager, keep_args: bool = True) -> None:
        self.keep_args = keep_args
        self.cond = threading.Condition()
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        for name in self.EVENTS:
            manager.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            with self.cond:
                self.events.append((name, args if self.keep_args else ()))
                self.cond.notify_all()

        return record

    def names(self) -> list[str]:
        with self.cond:
            return [n for n, _ in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def wait_count(self, name: str, n: int, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: [e for e, _ in self.events].count(name) >= n, timeout)

    def args(self, name: str) -> list[tuple[Any, ...]]:
        with self.cond:
            return [a for n, a in self.events if n == name]
