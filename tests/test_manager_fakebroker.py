"""The whole manager over the scripted fake broker: what a hostile or unusual broker does to users.

The real py-amqp layer, the AMQP link, the publisher, the pool and recovery
all run; the test decides what the broker answers.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from carrot_kombu import (
    Backoff,
    Blocked,
    ConnectionManager,
    ConnectionState,
    Disconnected,
    Nacked,
    PublishTimeout,
    Rejected,
)
from tests.fakebroker import FakeBroker, Peer
from tests.support import in_background


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


def connect(broker: FakeBroker, **options: Any) -> tuple[ConnectionManager, Peer]:
    options.setdefault("heartbeat", 0)
    options.setdefault("backoff", Backoff(min=0.05, max=0.5))
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", **options)
    manager.start()
    peer = broker.accept()
    assert manager.wait_connected(5)
    return manager, peer


def cpu_seconds_of(fn: Any) -> tuple[float, float]:
    """(wall, process CPU) seconds of ``fn()``."""
    wall, cpu = time.monotonic(), time.process_time()
    fn()
    return time.monotonic() - wall, time.process_time() - cpu


def test_a_confirmed_publish_over_the_fake_broker_is_stored_once(broker):
    manager, peer = connect(broker)
    try:
        manager.publish(b"hello", routing_key="q", timeout=5)
        assert [(p.routing_key, p.body) for p in peer.published] == [("q", b"hello")]
    finally:
        manager.stop(timeout=5)


def test_a_nack_reaches_its_caller_only(broker):
    manager, peer = connect(broker)
    try:
        peer.set_confirms("nack")
        with pytest.raises(Nacked):
            manager.publish(b"refused", routing_key="q", timeout=5)
        peer.set_confirms("ack")
        manager.publish(b"stored", routing_key="q", timeout=5)  # the next caller is not affected
    finally:
        manager.stop(timeout=5)


def test_an_ack_of_a_tag_never_sent_costs_what_is_outstanding_not_the_tag(broker):
    """basic.ack(2**64-1, multiple) on the confirm channel used to loop over range(low, tag) (17.1)."""
    manager, peer = connect(broker)
    try:
        manager.publish(b"first", routing_key="q", timeout=5)  # the confirm channel exists
        channel = peer.published[-1].channel
        peer.set_confirms(None)  # withheld: the next publish waits for our hostile ack
        worker = in_background(lambda: manager.publish(b"second", routing_key="q", timeout=5), "publish")
        peer.wait_for(lambda: len(peer.published) == 2)
        wall, cpu = cpu_seconds_of(lambda: (peer.send_method(channel, "basic.ack", 2**64 - 1, True),
                                            worker.done.wait(5)))
        worker.result(0)  # confirmed: it raises nothing
        assert wall < 2 and cpu < 1, (wall, cpu)
        wall, _ = cpu_seconds_of(lambda: manager.stop(timeout=3))
        assert wall < 3.5
    finally:
        manager.stop(timeout=5)


def test_a_confirm_channel_closed_without_naming_a_publish_is_replaced_with_backoff(broker):
    """A close naming another method used to make one message be rewritten ~2000 times/s (17.1)."""
    manager, peer = connect(broker, backoff=Backoff(min=0.2, max=1.0, jitter=False))
    try:
        manager.publish(b"first", routing_key="q", timeout=5)
        peer.set_confirms(None)
        closes = 0

        def close_again(p: Peer, method: Any) -> None:
            nonlocal closes
            closes += 1
            p.close_channel(method.channel, 541, "INTERNAL_ERROR", 20, 10, wait=None)  # names channel.open

        peer.on("basic.publish", close_again)
        took, cpu = cpu_seconds_of(lambda: pytest.raises(PublishTimeout, manager.publish, b"x", routing_key="q",
                                                         timeout=2.0))
        # Rewritten at most once per backoff slot (0.2, 0.4, 0.8...), never in a hot loop.
        assert 1 <= closes <= 5, closes
        assert cpu < 1.0, cpu
    finally:
        manager.stop(timeout=5)


def test_the_first_publish_on_a_blocked_connection_raises_blocked_after_blocked_timeout(broker):
    """It used to raise PublishTimeout '(no connection)' after the whole timeout (17.10)."""
    manager, peer = connect(broker, blocked_timeout=0.3)
    try:
        peer.block("low on memory")
        peer.wait_for(lambda: manager.blocked or True)
        started = time.monotonic()
        with pytest.raises(Blocked):
            manager.publish(b"x", routing_key="q", timeout=10)
        assert time.monotonic() - started < 5
        peer.unblock()
        assert manager.wait_status(lambda s: not s.blocked, 5)
        manager.publish(b"after", routing_key="q", timeout=5)
    finally:
        manager.stop(timeout=5)


def test_a_publish_to_a_missing_exchange_is_rejected_and_others_go_on(broker):
    manager, peer = connect(broker)
    try:
        manager.publish(b"first", routing_key="q", timeout=5)

        def refuse(p: Peer, method: Any) -> None:
            if method["exchange"] == "missing":
                p.close_channel(method.channel, 404, "NOT_FOUND - no exchange 'missing' in vhost '/'", 60, 40,
                                wait=None)
            else:
                p.confirm(method.channel, wait=None)

        peer.set_confirms(None)
        peer.on("basic.publish", refuse)
        with pytest.raises(Rejected) as caught:
            manager.publish(b"bad", exchange="missing", routing_key="q", timeout=5)
        assert caught.value.reply_code == 404
        manager.publish(b"good", routing_key="q", timeout=5)
    finally:
        manager.stop(timeout=5)


def test_leases_are_fenced_when_the_broker_closes_the_connection(broker):
    manager, peer = connect(broker)
    try:
        lease = manager.open_channel(timeout=5)
        peer.close_connection()
        assert manager.wait_status(lambda s: s.state is not ConnectionState.CONNECTED, 5)
        with pytest.raises(Disconnected):
            _ = lease.channel
        second = broker.accept()
        assert manager.wait_connected(5)
        with manager.channel(timeout=5) as fresh:
            assert fresh.generation != lease.generation
        assert second.is_open
    finally:
        manager.stop(timeout=5)


def test_a_view_of_the_live_connection_dies_with_it(broker):
    manager, peer = connect(broker)
    try:
        view = manager.connection(timeout=5)
        assert view.alive and view.port == broker.port and view.server_properties.get("product") == "RabbitMQ"
        queue = view.callback_queue()
        try:
            assert queue.fileno() >= 0
        finally:
            queue.close()
        peer.close_connection()
        assert manager.wait_status(lambda s: s.state is not ConnectionState.CONNECTED, 5)
        assert not view.alive
        with pytest.raises(Disconnected):
            view.check()
    finally:
        manager.stop(timeout=5)




def test_a_consumer_without_prefetch_holds_at_most_the_default_unacknowledged(broker):
    """No prefetch_count used to mean no basic.qos: the whole backlog was pulled into memory (17.5)."""
    from carrot_kombu.consumers import DEFAULT_PREFETCH

    manager, peer = connect(broker)
    try:
        consumer = manager.consume("jobs", lambda body, message: message.ack(), declare=False)
        qos = peer.wait_for(lambda: peer.received("basic.qos"))
        assert qos[-1]["prefetch_count"] == DEFAULT_PREFETCH
        unlimited = manager.consume("other", lambda body, message: message.ack(), declare=False, prefetch_count=0)
        peer.wait_for(lambda: len(peer.received("basic.consume")) == 2)
        # 0: no limit, said explicitly: the channel may be shared, and the
        # previous consumer's qos would otherwise apply to this consume.
        assert [q["prefetch_count"] for q in peer.received("basic.qos")] == [DEFAULT_PREFETCH, 0]
        consumer.cancel()
        unlimited.cancel()
    finally:
        manager.stop(timeout=5)


def test_a_publish_timeout_says_whether_the_connection_or_only_the_confirm_channel_was_missing():
    """It said '(no connection)' while connected but without a confirm channel (17 red-team)."""
    with FakeBroker(heartbeat=0, manual={"confirm.select"}) as broker:  # the confirm channel never opens
        manager, _peer = connect(broker, reply_timeout=1.0)
        try:
            with pytest.raises(PublishTimeout) as caught:
                manager.publish(b"x", routing_key="q", timeout=0.5)
            assert "connected, but no confirm channel" in str(caught.value), caught.value
            assert "no connection" not in str(caught.value)
            assert caught.value.outcome == "not_sent"
        finally:
            manager.stop(timeout=5)
