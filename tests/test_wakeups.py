"""A close or stop on one thread wakes a caller blocked on another thread at once (17 red-team).

Each waiter is known to be blocked (the pool counts it, the broker got its
message, the queue lists it) before the close; then it must return well
within its own timeout (30 s here), bounded by ``AT_ONCE``.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterator

import kombu
import pytest

import carrot_kombu  # noqa: F401 - registers carrot+amqp://
from carrot_kombu import Backoff, ConnectionManager, Disconnected, transport
from tests.fakebroker import FakeBroker

#: Seconds a woken waiter may take to return (its own timeout is 30 s).
AT_ONCE = 1.0


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


class Blocked:
    """``fn()`` on another thread: its outcome, and when it returned."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.error: BaseException | None = None
        self.returned = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - recorded for the test
            self.error = exc
        finally:
            self.returned.set()


def _until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the waiter never blocked"
        time.sleep(0.01)


def _manager(broker: FakeBroker, **options: Any) -> tuple[ConnectionManager, Any]:
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0,
                                backoff=Backoff(min=0.05, max=0.5), **options)
    manager.start()
    peer = broker.accept()
    assert manager.wait_connected(5)
    return manager, peer


def test_stop_wakes_a_caller_waiting_for_a_channel(broker):
    manager, _peer = _manager(broker, pool_limit=1)
    try:
        held = manager.open_channel(timeout=5)  # the only channel: the next caller waits  # noqa: F841
        waiter = Blocked(lambda: manager.open_channel(timeout=30))
        _until(lambda: manager.status().pool.waiting == 1 or waiter.returned.is_set())
        assert not waiter.returned.is_set(), waiter.error
        started = time.monotonic()
        manager.stop(timeout=5)
        assert waiter.returned.wait(AT_ONCE), "open_channel() still waiting after stop()"
        assert isinstance(waiter.error, Disconnected) and time.monotonic() - started < AT_ONCE
    finally:
        manager.stop(timeout=5)


def test_stop_wakes_a_publisher_waiting_for_its_confirm(broker):
    manager, peer = _manager(broker)
    try:
        manager.publish(b"first", routing_key="q", timeout=5)
        peer.set_confirms(None)  # the broker stores but never confirms
        waiter = Blocked(lambda: manager.publish(b"x", routing_key="q", timeout=30))
        peer.wait_for(lambda: len(peer.published) == 2)
        manager.stop(timeout=5)
        assert waiter.returned.wait(AT_ONCE), "publish() still waiting after stop()"
        assert isinstance(waiter.error, Disconnected)
        assert "may have been stored" in str(waiter.error)
    finally:
        manager.stop(timeout=5)


def test_closing_a_kombu_connection_wakes_its_drainer(broker):
    """Celery closes a connection while its consumer thread drains: the drainer raised only after its timeout."""
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    conn = kombu.Connection(url, connect_timeout=5)
    try:
        conn.connect()
        virtual = conn.connection
        waiter = Blocked(lambda: virtual.drain_events(timeout=30))
        _until(lambda: virtual.events.raw._waiters)
        virtual.close()
        assert waiter.returned.wait(AT_ONCE), "drain_events() still waiting after close()"
        assert isinstance(waiter.error, Disconnected) and "closed" in str(waiter.error)
    finally:
        conn.close()
        with transport._registry_lock:
            entries = [transport._registry.pop(key) for key in list(transport._registry)
                       if any(f":{broker.port}/" in u for u in key[1])]
        for entry in entries:
            entry.manager.stop(timeout=5)


@pytest.mark.parametrize("call", ["connection", "wait_connected", "publish"])
def test_stop_wakes_a_caller_waiting_for_the_connection(call):
    """Disconnected (the broker is gone, the manager retries): callers waiting for a connection end at stop()."""
    broker = FakeBroker(heartbeat=0)
    broker.start()
    manager, _peer = _manager(broker)
    try:
        manager.publish(b"first", routing_key="q", timeout=5)  # the confirm channel exists
        broker.stop()
        assert manager.wait_status(lambda s: s.attempts >= 1, 5)
        calls = {
            "connection": lambda: manager.connection(timeout=30),
            "wait_connected": lambda: manager.wait_connected(30) and None,
            "publish": lambda: manager.publish(b"x", routing_key="q", timeout=30),
        }
        waiter = Blocked(calls[call])
        assert not waiter.returned.wait(0.2), waiter.error  # it waits (or failed at once: shown)
        manager.stop(timeout=5)
        assert waiter.returned.wait(AT_ONCE), f"{call} still waiting after stop()"
    finally:
        manager.stop(timeout=5)
        broker.stop()
