"""A ``consume()`` callback that raises (issue 17.6), on RabbitMQ.

Before: the delivery stayed unacknowledged for good, so with prefetch 1 the
consumer stalled silently.  Now it is rejected with requeue once, and
without requeue when it raises again on the redelivered message (into the
dead-letter exchange, if the queue has one); ``consumer_error`` and a log
line report it each time.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import kombu
import pytest

from .broker import unique


class Poison(Exception):
    pass


def _events(manager: Any) -> "queue.Queue[tuple[Any, ...]]":
    got: "queue.Queue[tuple[Any, ...]]" = queue.Queue()  # delivered on the events thread
    manager.on("consumer_error", lambda *args: got.put(args))
    return got


@pytest.fixture
def cleanup(rabbit):
    names: list[tuple[str, str]] = []
    yield names
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    with manager.channel() as lease:
        for kind, name in names:
            (lease.queue_delete if kind == "queue" else lease.exchange_delete)(name)


def test_a_raising_callback_does_not_stall_a_prefetch_1_consumer(rabbit, cleanup, caplog):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    jobs = kombu.Queue(unique("ck-poison"), auto_delete=False)
    cleanup.append(("queue", jobs.name))
    errors = _events(manager)
    seen: "queue.Queue[tuple[Any, bool]]" = queue.Queue()

    def callback(body: Any, message: Any) -> None:
        seen.put((body, message.delivery_info["redelivered"]))
        if body == 1:
            raise Poison("cannot handle 1")
        message.ack()

    manager.consume(jobs, callback, prefetch_count=1)
    manager.publish_many([1, 2], routing_key=jobs.name, timeout=5)
    assert seen.get(timeout=5) == (1, False)
    assert seen.get(timeout=5) == (1, True)  # requeued once: the redelivered flag is set
    assert seen.get(timeout=5) == (2, False)  # ...then rejected for good: message 2 is not stuck behind it
    first, second = errors.get(timeout=5), errors.get(timeout=5)
    assert (first[0], type(first[1]), first[2]) == (jobs.name, Poison, "requeued")
    assert (second[0], type(second[1]), second[2]) == (jobs.name, Poison, "rejected")
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "callback" in r.getMessage()]
    assert len(logged) == 2 and all(r.exc_info and r.exc_info[0] is Poison for r in logged)
    assert "requeue" in logged[0].getMessage() and "without requeue" in logged[1].getMessage()
    with manager.channel() as lease:  # nothing left unacked or requeued: without a DLX it is dropped
        assert lease.queue_declare(jobs.name, passive=True).message_count == 0
    assert seen.empty() and errors.empty()


def test_a_poisoned_message_lands_in_the_dead_letter_exchange(rabbit, cleanup):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    dlx = kombu.Exchange(unique("ck-dlx"), type="fanout", auto_delete=False)
    dead = kombu.Queue(unique("ck-dead"), dlx, auto_delete=False)
    jobs = kombu.Queue(unique("ck-jobs"), auto_delete=False, queue_arguments={"x-dead-letter-exchange": dlx.name})
    cleanup.extend([("queue", jobs.name), ("queue", dead.name), ("exchange", dlx.name)])
    manager.declare(dead, jobs)
    errors = _events(manager)
    handled: "queue.Queue[Any]" = queue.Queue()

    def callback(body: Any, message: Any) -> None:
        if body == {"poison": True}:
            raise Poison("always")
        handled.put(body)
        message.ack()

    dead_letters: "queue.Queue[tuple[Any, Any]]" = queue.Queue()
    manager.consume(dead, lambda body, message: (dead_letters.put((body, message.headers)), message.ack()))
    manager.consume(jobs, callback, prefetch_count=1)
    manager.publish_many([{"n": 1}, {"poison": True}, {"n": 2}], routing_key=jobs.name, timeout=5)
    assert [handled.get(timeout=5) for _ in range(2)] == [{"n": 1}, {"n": 2}]
    assert [errors.get(timeout=5)[2] for _ in range(2)] == ["requeued", "rejected"]
    body, headers = dead_letters.get(timeout=10)
    assert body == {"poison": True}
    assert headers["x-death"][0]["reason"] == "rejected" and headers["x-death"][0]["queue"] == jobs.name
    assert handled.empty() and dead_letters.empty()


@pytest.mark.parametrize("how", ["message.ack()", "message.channel.basic_ack", "message.channel.basic_reject"])
def test_a_callback_that_settled_its_message_before_raising_keeps_its_choice(rabbit, cleanup, how):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    jobs = kombu.Queue(unique("ck-settled"), auto_delete=False)
    cleanup.append(("queue", jobs.name))
    errors = _events(manager)
    seen: "queue.Queue[Any]" = queue.Queue()

    def callback(body: Any, message: Any) -> None:
        seen.put(body)
        if how == "message.ack()":
            message.ack()
        elif how == "message.channel.basic_ack":
            message.channel.basic_ack(message.delivery_tag)
        else:
            message.channel.basic_reject(message.delivery_tag, requeue=False)
        raise Poison("after the settlement")

    manager.consume(jobs, callback, prefetch_count=1)
    manager.publish_many([1, 2], routing_key=jobs.name, timeout=5)
    assert [seen.get(timeout=5), seen.get(timeout=5)] == [1, 2]  # each once: no reject, no redelivery
    assert [errors.get(timeout=5)[2] for _ in range(2)] == ["settled", "settled"]
    with manager.channel() as lease:
        assert lease.queue_declare(jobs.name, passive=True).message_count == 0
    assert seen.empty()
