"""``memory://`` (kombu's in-process broker) under a manager: consumers, publishing, stopping."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import kombu

from carrot_kombu import ConnectionState


def until(predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Wait (bounded) for a predicate that no event announces; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(0.01)


def queued(manager: Any, name: str) -> int:
    with manager.channel() as lease:
        return int(lease.queue_declare(name, passive=True).message_count)


def pumps(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"carrot-kombu-pump-{name}"]


def test_an_undecodable_delivery_is_rejected_not_requeued_and_the_consumer_goes_on(make_manager):
    manager, _ = make_manager("memory://undecodable")
    assert manager.wait_connected(5)
    got: list[Any] = []
    manager.consume("mq-bad", lambda body, message: (got.append(body), message.ack()), prefetch_count=1)
    with manager.channel() as lease:
        producer = kombu.Producer(lease)
        producer.publish(b"{not json", routing_key="mq-bad", content_type="application/json",
                         content_encoding="utf-8", serializer=None)
        producer.publish({"ok": 1}, routing_key="mq-bad")
    assert until(lambda: got == [{"ok": 1}]), got
    assert queued(manager, "mq-bad") == 0  # the bad one was dropped, not put back to loop for ever


def test_a_cancelled_consumer_leaves_later_messages_for_the_next_one(make_manager):
    manager, _ = make_manager("memory://cancel")
    assert manager.wait_connected(5)
    first: list[Any] = []
    consumer = manager.consume("mq-cancel", lambda body, message: (first.append(body), message.ack()))
    manager.publish({"n": 1}, routing_key="mq-cancel", timeout=5)
    assert until(lambda: first == [{"n": 1}])
    consumer.cancel()
    assert until(lambda: not pumps("mq-cancel"))  # its own connection and thread are gone
    manager.publish({"n": 2}, routing_key="mq-cancel", timeout=5)
    assert queued(manager, "mq-cancel") == 1
    second: list[Any] = []
    manager.consume("mq-cancel", lambda body, message: (second.append(body), message.ack()))
    assert until(lambda: second == [{"n": 2}])
    assert first == [{"n": 1}]


def test_stop_ends_every_consumer_thread_and_start_brings_them_back(make_manager):
    manager, _ = make_manager("memory://stop")
    assert manager.wait_connected(5)
    got: list[Any] = []
    manager.consume("mq-stop", lambda body, message: (got.append(body), message.ack()))
    assert until(lambda: pumps("mq-stop"))
    manager.stop(timeout=5)
    assert manager.state is ConnectionState.STOPPED
    assert until(lambda: not pumps("mq-stop"))
    manager.start()
    assert manager.wait_connected(5)
    manager.publish("again", routing_key="mq-stop", timeout=5)
    assert until(lambda: got == ["again"])
