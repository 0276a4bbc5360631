"""The ``carrot+amqp://`` transport through outages and blips (issue 17.2, 17.3), over the fake broker.

What kombu and Celery see when they establish a connection: during an outage
a producer fails at once (their retry policies apply, as on ``pyamqp://``);
right after a blip it waits for the manager's own reconnect instead of
failing and sleeping kombu's 2 s interval.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import kombu
import pytest
from kombu.exceptions import OperationalError

import carrot_kombu  # noqa: F401 - registers carrot+amqp://
from carrot_kombu import ConnectionState, Disconnected
from tests.fakebroker import FakeBroker
from tests.support import wait_until


class Loop:
    """The part of Celery's event loop (hub) the transport uses."""

    def __init__(self) -> None:
        self.readers: dict[int, Any] = {}

    def add_reader(self, fd: int, callback: Any, *args: Any) -> None:
        self.readers[fd] = (callback, args)

    def remove(self, fd: int) -> None:
        self.readers.pop(fd, None)


#: Reconnect quickly: these connections live less than a second, which the
#: supervisor otherwise answers with Backoff.min (1 s) before the next attempt.
FAST = {"backoff": {"min": 0.05, "max": 0.5}}


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


def _manager_of(conn: kombu.Connection) -> Any:
    return conn.connection.manager



def test_a_producer_fails_at_once_during_an_outage_even_after_the_consumer_lost_its_connection(broker):
    """Celery's consumer losing its connection made every establish in the process wait 30 s (17.2)."""
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    consuming = kombu.Connection(url, connect_timeout=2, transport_options=FAST)
    consuming.connect()
    consuming.transport.register_with_event_loop(consuming.connection, Loop())
    manager = _manager_of(consuming)
    broker.stop()  # the outage: nothing listens any more
    assert wait_until(lambda: manager.status().attempts >= 1, 10), manager.status()
    with pytest.raises(Disconnected):
        consuming.transport.heartbeat_check(consuming.connection)  # the consumer sees the loss
    outcome: list[Any] = []

    def produce() -> None:
        started = time.monotonic()
        producer = kombu.Connection(url, connect_timeout=2, transport_options=FAST)
        try:
            producer.ensure_connection(max_retries=2, interval_start=0, interval_step=0.1, interval_max=0.1)
            outcome.append(("connected", time.monotonic() - started))
        except OperationalError:
            outcome.append(("failed", time.monotonic() - started))

    worker = threading.Thread(target=produce)  # another thread: a task's .delay()
    worker.start()
    worker.join(10)
    assert outcome and outcome[0][0] == "failed" and outcome[0][1] < 2.0, outcome
    consuming.close()


def test_the_consumers_own_reconnect_waits_for_the_manager(broker):
    """The consumer's thread keeps the long wait: it is back as soon as the manager is."""
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    consuming = kombu.Connection(url, connect_timeout=2, transport_options=FAST)
    consuming.connect()
    consuming.transport.register_with_event_loop(consuming.connection, Loop())
    manager = _manager_of(consuming)
    port = broker.port
    broker.stop()
    assert wait_until(lambda: manager.status().attempts >= 1, 10)
    with pytest.raises(Disconnected):
        consuming.transport.heartbeat_check(consuming.connection)
    again = FakeBroker(heartbeat=0, port=port)
    threading.Timer(0.5, again.start).start()  # the broker comes back while the consumer waits
    try:
        fresh = kombu.Connection(url, connect_timeout=2, transport_options=FAST)
        started = time.monotonic()
        fresh.ensure_connection(max_retries=0)  # one attempt: it waits for the manager, no retry needed
        assert time.monotonic() - started < 10
        fresh.close()
    finally:
        again.stop()
        consuming.close()


def test_establishing_right_after_a_blip_waits_for_the_reconnect_instead_of_failing(broker):
    """After a cut, establish failed at once and kombu slept 2 s while rpc:// results were lost (17.3)."""
    url = f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0"
    first = kombu.Connection(url, connect_timeout=3, transport_options=FAST)
    first.connect()
    manager = _manager_of(first)
    peer = broker.accept()
    try:
        for _ in range(5):
            view = manager.connection(timeout=5)
            peer.drop()  # a blip: the broker still listens
            assert wait_until(lambda: not view.alive, 5)
            conn = kombu.Connection(url, connect_timeout=3, transport_options=FAST)
            conn.ensure_connection(max_retries=0)  # one attempt, as kombu's revive makes
            with conn.channel() as chan:
                chan.queue_declare("results")
            conn.close()
            peer = broker.accept()
            assert manager.status().state is ConnectionState.CONNECTED
    finally:
        first.close()


