from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from carrot_kombu import ConnectionManager

from .faulty import FAULTS, Faults
from .recorder import Recorder


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
