from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from carrot_kombu import ConnectionManager
from tests.recorder import Recorder

from .broker import unique
from .proxy import FaultProxy


@pytest.fixture
def rabbit(amqp_url: str) -> Iterator[Callable[..., tuple[ConnectionManager, Recorder, str]]]:
    """Make started managers on the real broker, each with a unique connection_name."""
    managers: list[ConnectionManager] = []

    def make(url: str = "", start: bool = True, keep_args: bool = True, **options: Any) -> tuple[ConnectionManager, Recorder, str]:
        name = unique("ck-conn")
        options.setdefault("client_properties", {"connection_name": name})
        options.setdefault("backoff", {"min": 0.1, "max": 1.0})
        manager = ConnectionManager(url or amqp_url, **options)
        recorder = Recorder(manager, keep_args=keep_args)
        managers.append(manager)
        if start:
            manager.start()
        return manager, recorder, name

    yield make
    for manager in managers:
        manager.stop(timeout=10)


@pytest.fixture
def proxy(amqp_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the shared broker; closed at the end of the test."""
    from urllib.parse import urlparse

    parsed = urlparse(amqp_url)
    with FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672) as p:
        yield p
