"""Shared pytest configuration for unit (``tests/``) and integration (``integration/``) tests.

The broker URL for integration tests comes from ``CARROT_KOMBU_TEST_URL``
(default ``amqp://guest:guest@127.0.0.1:5672//``).  When the broker cannot be
reached, integration tests are skipped on a developer machine and *fail* when
``CI=true``: CI must never pass by skipping the tests that matter.
"""

from __future__ import annotations

import collections
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

import pytest

DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672//"


def broker_url() -> str:
    return os.environ.get("CARROT_KOMBU_TEST_URL", DEFAULT_URL)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


_reachable: dict[str, str] = {}


def _broker_problem(url: str) -> str:
    """Empty when a TCP connection to the broker succeeds, else why not."""
    if url not in _reachable:
        parsed = urlparse(url)
        host, port = parsed.hostname or "127.0.0.1", parsed.port or 5672
        try:
            with socket.create_connection((host, port), timeout=3):
                _reachable[url] = ""
        except OSError as exc:
            _reachable[url] = f"broker {host}:{port} unreachable: {exc}"
    return _reachable[url]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = os.path.join(str(config.rootpath), "integration")
    for item in items:
        if str(item.path).startswith(root):
            item.add_marker(pytest.mark.integration)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("integration") is None:
        return
    problem = _broker_problem(broker_url())
    if problem:
        if _in_ci():
            pytest.fail(f"CI=true and the integration broker is needed: {problem}", pytrace=False)
        pytest.skip(problem)


@pytest.fixture
def amqp_url() -> str:
    """The real broker's URL (integration tests)."""
    return broker_url()


@pytest.fixture(autouse=True)
def _fresh_memory_transport() -> Iterator[None]:
    """kombu's memory transport keeps queues in class attributes: isolate tests."""
    from kombu.transport import memory, virtual

    memory.Transport.global_state = virtual.BrokerState()
    memory.Channel.queues = {}
    memory.Channel.events = collections.defaultdict(set)
    yield
