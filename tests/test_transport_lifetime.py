"""Resource lifetime of the ``carrot+amqp://`` transport (issue 17.8), over the scripted fake broker."""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Iterator

import kombu
import pytest

import carrot_kombu  # noqa: F401 - registers carrot+amqp://
from carrot_kombu import ConnectionState, transport
from tests.fakebroker import FakeBroker
from tests.support import wait_until


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _entry_for(url: str) -> transport._Entry:
    with transport._registry_lock:
        found = [e for key, e in transport._registry.items() if any(str(url).split("@")[-1] in u for u in key[1])]
    assert len(found) == 1, found
    return found[0]



def test_kombu_connections_dropped_without_close_leak_no_descriptor(broker):
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    keep = kombu.Connection(url)
    keep.connect()  # the manager and its AMQP connection exist before we count
    try:
        gc.collect()
        before = _fds()
        for _ in range(60):
            conn = kombu.Connection(url)
            conn.connect()
            conn.default_channel  # noqa: B018 - a leased channel too
            del conn
        gc.collect()
        assert wait_until(lambda: _fds() - before < 10), (before, _fds())
    finally:
        keep.close()


def test_a_manager_no_kombu_connection_uses_is_stopped_after_the_grace(broker, monkeypatch):
    monkeypatch.setattr(transport, "IDLE_GRACE", 0.2)
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    threads_before = threading.active_count()
    conn = kombu.Connection(url)
    conn.connect()
    peer = broker.accept()
    entry = _entry_for(url)
    manager = entry.manager
    with conn.channel() as chan:
        chan.queue_declare("jobs")
        assert not entry.idle(time.monotonic() + 10)  # open: never idle
    conn.close()
    assert wait_until(lambda: manager.state is ConnectionState.STOPPED), manager.status()
    with transport._registry_lock:
        assert entry not in transport._registry.values()
    peer.wait_closed()  # closed politely, not dropped
    assert wait_until(lambda: threading.active_count() <= threads_before), threading.enumerate()
    again = kombu.Connection(url)  # a later use gets a new manager
    try:
        again.connect()
        assert _entry_for(url).manager is not manager
    finally:
        again.close()


def test_an_open_connection_keeps_its_manager(broker, monkeypatch):
    monkeypatch.setattr(transport, "IDLE_GRACE", 0.1)
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    conn = kombu.Connection(url)
    conn.connect()
    try:
        manager = _entry_for(url).manager
        time.sleep(0.5)  # several janitor rounds: what is asserted is that nothing happened
        assert manager.state is ConnectionState.CONNECTED
        with conn.channel() as chan:
            chan.queue_declare("jobs")
    finally:
        conn.close()


def test_callback_queues_dropped_without_close_give_their_descriptors_back(broker):
    """A ``ConnectionView.callback_queue()`` an integration forgets to close: its pipe goes with it (17 red-team)."""
    from carrot_kombu import ConnectionManager

    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0")
    manager.start(wait=5)
    try:
        view = manager.connection(timeout=5)
        gc.collect()
        before = _fds()
        queues = [view.callback_queue() for _ in range(50)]
        assert _fds() - before >= 50  # a pipe each (2 descriptors)
        del queues
        gc.collect()
        assert _fds() - before < 5, (before, _fds())
        kept = view.callback_queue()
        kept.close()
        kept.close()  # idempotent; and the finalizer does not run again
        with pytest.raises(ValueError, match="closed"):
            kept.fileno()
    finally:
        manager.stop(timeout=5)
