"""A kombu consumer without QoS over ``carrot+amqp://``, on the shared broker (issue 17.5 remainder).

py-amqp reads only when the application drains, so an unread backlog stays in
the broker (TCP back-pressure).  The manager's reader always reads: without a
prefetch the whole backlog came into this process's memory, and kombu's
``Consumer.cancel()`` then ran every buffered delivery in the caller.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import kombu
import pytest

import carrot_kombu  # noqa: F401 - registers the carrot+amqp:// transport
from carrot_kombu.transport import DEFAULT_PREFETCH_COUNT

from .broker import unique

BACKLOG = 1500
BODY = b"x" * 4096


@pytest.fixture
def backlog(amqp_url: str) -> Iterator[str]:
    name = unique("ck-backlog")
    with kombu.Connection(amqp_url) as conn:
        chan = conn.default_channel
        chan.queue_declare(name, auto_delete=False)
        producer = kombu.Producer(chan)
        for _ in range(BACKLOG):
            producer.publish(BODY, routing_key=name)
    yield name
    with kombu.Connection(amqp_url) as conn:
        conn.default_channel.queue_delete(name)


def _ready(amqp_url: str, name: str) -> int:
    with kombu.Connection(amqp_url) as conn:
        return int(conn.default_channel.queue_declare(name, passive=True).message_count)


def _unacked_settles(amqp_url: str, name: str, at_least: int, timeout: float = 10.0) -> int:
    """Messages the broker handed out: waits until ``at_least`` are, then 0.5 s more for any excess."""
    deadline = time.monotonic() + timeout
    while BACKLOG - _ready(amqp_url, name) < at_least and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # a bound is a maximum: give an unbounded consumer the time to go past it
    return BACKLOG - _ready(amqp_url, name)


@pytest.mark.parametrize("scheme", ["carrot+amqp", "pyamqp"])
def test_a_consumer_without_qos_does_not_take_the_whole_backlog(scheme, amqp_url, backlog):
    got: list[Any] = []
    with kombu.Connection(f"{scheme}://{amqp_url.split('://', 1)[1]}", connect_timeout=5) as conn:
        consumer = kombu.Consumer(conn, [kombu.Queue(backlog, no_declare=True)], callbacks=[lambda body, msg: got.append(msg)])
        with consumer:
            conn.drain_events(timeout=5)
            taken = _unacked_settles(amqp_url, backlog, at_least=min(DEFAULT_PREFETCH_COUNT, 50))
            print(f"{scheme}: {taken} of {BACKLOG} handed out by the broker")
            if scheme == "carrot+amqp":
                assert taken <= DEFAULT_PREFETCH_COUNT
            else:
                assert taken < BACKLOG  # the baseline: TCP back-pressure stops the broker too


def test_cancel_runs_only_what_the_prefetch_let_in(amqp_url, backlog):
    """kombu's ``Consumer.cancel()`` runs the deliveries already received, as py-amqp does: now at most the prefetch.

    It used to run the whole backlog in the caller (14 s for 2 600 in the
    issue); the rest of the backlog stays in the broker.
    """
    got: list[Any] = []
    with kombu.Connection(f"carrot+{amqp_url}", connect_timeout=5) as conn:
        consumer = kombu.Consumer(conn, [kombu.Queue(backlog, no_declare=True)], callbacks=[lambda body, msg: got.append(msg)])
        consumer.consume()
        conn.drain_events(timeout=5)
        assert len(got) == 1
        _unacked_settles(amqp_url, backlog, at_least=DEFAULT_PREFETCH_COUNT)
        consumer.cancel()
        assert 1 < len(got) <= DEFAULT_PREFETCH_COUNT, len(got)
        for message in got:
            message.ack()
        assert _ready(amqp_url, backlog) == BACKLOG - len(got)
