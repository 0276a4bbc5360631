from __future__ import annotations

import threading
from typing import Any, Callable, Iterator

import pytest

from carrot_kombu import ConnectionManager

from .faulty import FAULTS, Faults


class Recorder:
    """Collects events; tests wait for them with deadlines, never sleep."""

    EVENTS = ("connecting", "connected", "connect_failed", "disconnected", "blocked", "unblocked", "stopped")

    def __init__(self, manager: ConnectionManager) -> None:
        self.cond = threading.Condition()
        self.events: list[tuple[str, tuple[Any, ...]]] = []
        for name in self.EVENTS:
            manager.on(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[..., None]:
        def record(*args: Any) -> None:
            with self.cond:
                self.events.append((name, args))
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


@pytest.fixture
def faults() -> Iterator[Faults]:
    FAULTS.reset()
    yield FAULTS
    if FAULTS.gate is not None:
        FAULTS.gate.set()
    FAULTS.reset()


@pytest.fixture
def make_manager(faults: Faults) -> Iterator[Callable[..., tuple[ConnectionManager, Recorder]]]:
    managers: list[ConnectionManager] = []

    def make(url: str = "faulty://", start: bool = True, **options: Any) -> tuple[ConnectionManager, Recorder]:
        options.setdefault("backoff", {"min": 0.01, "max": 0.05, "jitter": False})
        manager = ConnectionManager(url, **options)
        recorder = Recorder(manager)
        managers.append(manager)
        if start:
            manager.start()
        return manager, recorder

    yield make
    for manager in managers:
        manager.stop(timeout=5)
