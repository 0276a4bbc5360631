"""``memory://`` (kombu's in-process broker) under a manager: consumers, publishing, stopping."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import kombu
import pytest

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


def test_a_consume_whose_declare_fails_raises_and_leaves_nothing_behind(make_manager):
    manager, _ = make_manager("memory://bad-declare")
    assert manager.wait_connected(5)
    broken = kombu.Queue("mq-broken", exchange=kombu.Exchange("mq-ex", type="no-such-type"), routing_key="r")
    with pytest.raises(KeyError):  # kombu's in-process transport: no such exchange type
        manager.consume(broken, lambda body, message: None)
    assert not pumps("mq-broken")  # its private connection was released
    assert manager.status().degraded == ()
    manager.publish("still fine", routing_key="q", timeout=5)


class _Waiter:
    """What the publisher waits on: ``ready()`` and an ``event`` set on every change."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.done = False

    def ready(self) -> bool:
        return self.done

    def settle(self) -> None:
        self.done = True
        self.event.set()


def test_the_memory_confirm_channel_waits_until_ready_the_deadline_or_an_interrupt():
    from carrot_kombu._memory import MemoryConfirmChannel

    channel = MemoryConfirmChannel(None, None)
    assert channel.failure() is None
    waiter = _Waiter()
    started = time.monotonic()
    assert channel.wait(waiter, time.monotonic() + 0.1) is False  # the deadline
    assert 0.05 <= time.monotonic() - started < 2
    assert channel.wait(waiter, None, interrupt=lambda: True) is False  # the interrupt, at once
    timer = threading.Timer(0.05, waiter.settle)
    timer.start()
    assert channel.wait_confirm(waiter, time.monotonic() + 5, lambda: "") is True
    timer.join()


def test_closing_a_memory_channel_lets_an_application_exception_through(make_manager):
    """An exception that is not the library's (a signal handler's) reaches the caller, never swallowed."""
    manager, _ = make_manager("memory://close")
    assert manager.wait_connected(5)
    link = manager._core.live.current()

    class Interrupted(Exception):
        pass

    class Chan:
        def close(self) -> None:
            raise Interrupted()

    with pytest.raises(Interrupted):
        link.close_channel(Chan())
    real = link.open_channel()
    link.close_channel(real)
    link.close_channel(real)  # twice: harmless


def test_a_callback_that_raises_systemexit_does_not_end_its_consumer(make_manager):
    """sys.exit() in handler code used to kill the consumer's thread silently: the queue stalled (red-team)."""
    import queue as _queue

    manager, _ = make_manager("memory://systemexit")
    assert manager.wait_connected(5)
    errors: "_queue.SimpleQueue[tuple]" = _queue.SimpleQueue()
    manager.on("consumer_error", lambda queue, error, outcome: errors.put((queue, type(error).__name__, outcome)))
    seen: "_queue.SimpleQueue[str]" = _queue.SimpleQueue()

    def handle(body, message):
        seen.put(body)
        if body == "exit":
            raise SystemExit(3)
        message.ack()

    consumer = manager.consume("mq-systemexit", handle)
    manager.publish("exit", routing_key="mq-systemexit", timeout=5)
    assert errors.get(timeout=5) == ("mq-systemexit", "SystemExit", "requeued")
    manager.publish("after", routing_key="mq-systemexit", timeout=5)
    bodies = set()
    while "after" not in bodies:
        bodies.add(seen.get(timeout=5))  # the consumer still runs (the requeued "exit" may come first)
    consumer.cancel()
