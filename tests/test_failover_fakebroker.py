"""Failover between several brokers over the scripted fake broker (issue 17, item 14).

A RabbitMQ node that has just started answers a new connection with
``connection.close 541 INTERNAL_ERROR - ... vhost '/' is down`` until its
virtual hosts are up.  Such a node is skipped for another one at once, like
any node that fails an attempt; the backoff policy waits only when no node
could be used.
"""

from __future__ import annotations

import threading
from dataclasses import replace
import time
from typing import Any, Iterator

import pytest

from carrot_kombu import Backoff, ConnectionManager
from tests.fakebroker import FakeBroker, Peer

#: What RabbitMQ 3.x says on a node whose vhost supervisor is not running yet.
VHOST_DOWN = "INTERNAL_ERROR - access to vhost '/' refused for user 'guest': vhost '/' is down"

#: A backoff no failover may touch: a wait on it shows as seconds, not milliseconds.
SLOW = Backoff(min=5.0, max=10.0, jitter=False)


class Timeline:
    """Events of a manager, in order, with the monotonic time each was posted."""

    def __init__(self, manager: ConnectionManager) -> None:
        self.lock = threading.Condition(threading.RLock())
        self.events: list[tuple[float, str, tuple[Any, ...]]] = []
        for name in ("connecting", "connected", "connect_failed", "disconnected"):
            manager.on(name, lambda *args, name=name: self._add(name, args))

    def _add(self, name: str, args: tuple[Any, ...]) -> None:
        with self.lock:
            self.events.append((time.monotonic(), name, args))
            self.lock.notify_all()

    def wait_for(self, name: str, count: int, since: float = 0.0, timeout: float = 5) -> bool:
        """Wait until ``count`` ``name`` events posted after ``since`` reached this listener.

        Events reach listeners on the event thread, in order, a little after
        the status changed: once the last expected one is here, every earlier
        one is too.
        """
        with self.lock:
            return self.lock.wait_for(lambda: self.names(since).count(name) >= count, timeout)

    def names(self, since: float = 0.0) -> list[str]:
        with self.lock:  # reentrant (a Condition over an RLock): wait_for's predicate calls this
            return [name for t, name, _ in self.events if t >= since]


@pytest.fixture
def brokers() -> Iterator[list[FakeBroker]]:
    fakes = [FakeBroker(heartbeat=0).start() for _ in range(3)]
    try:
        yield fakes
    finally:
        for fake in fakes:
            fake.stop()


def answer_open_with_541(peer: Peer) -> None:
    """Close the connection instead of connection.open-ok, as a node whose vhost is not up yet does."""
    peer.expect("connection.open")
    peer.close_connection(541, VHOST_DOWN, 10, 40)


def start_on_first(brokers: list[FakeBroker], **options: Any) -> tuple[ConnectionManager, Peer, Timeline]:
    options.setdefault("heartbeat", 0)
    options.setdefault("backoff", SLOW)
    manager = ConnectionManager([b.url for b in brokers], **options)
    timeline = Timeline(manager)
    manager.start()
    peer = brokers[0].accept()
    assert manager.wait_connected(5)
    assert timeline.wait_for("connected", 1)  # not counted after the loss by a late delivery
    manager.publish(b"before", routing_key="q", timeout=5)
    return manager, peer, timeline


def port_of(manager: ConnectionManager) -> str:
    return (manager.status().broker or "").rsplit(":", 1)[-1].split("/")[0]


def wait_on(manager: ConnectionManager, broker: FakeBroker, timeout: float = 5) -> bool:
    return manager.wait_status(lambda s: s.state.value == "CONNECTED" and f":{broker.port}/" in (s.broker or ""),
                               timeout)


def test_a_node_answering_541_to_connection_open_is_left_for_the_next_at_once() -> None:
    a, c = FakeBroker(heartbeat=0).start(), FakeBroker(heartbeat=0).start()
    b = FakeBroker(heartbeat=0, manual={"connection.open"}).start()
    manager, peer, timeline = start_on_first([a, b, c])
    try:
        lost_at = time.monotonic()
        peer.drop()
        answer_open_with_541(b.accept())
        c.accept()
        assert wait_on(manager, c), manager.status()
        took = time.monotonic() - lost_at
        manager.publish(b"after", routing_key="q", timeout=5)
        assert timeline.wait_for("connected", 1, lost_at), timeline.names(lost_at)
        assert timeline.names(lost_at).count("connecting") == 2
        assert "connect_failed" not in timeline.names(lost_at)  # no backoff wait was even considered
        assert took < SLOW.min / 2, f"{took:.2f}s to reach the third node"
    finally:
        manager.stop(timeout=5)
        for fake in (a, b, c):
            fake.stop()


def test_a_node_answering_541_to_the_first_channel_open_is_left_for_the_next_at_once() -> None:
    a, c = FakeBroker(heartbeat=0).start(), FakeBroker(heartbeat=0).start()
    b = FakeBroker(heartbeat=0, manual={"channel.open"}).start()
    manager, peer, timeline = start_on_first([a, b, c])
    try:
        lost_at = time.monotonic()
        peer.drop()
        second = b.accept()
        second.expect("channel.open")
        second.close_connection(541, VHOST_DOWN, 20, 10)
        c.accept()
        assert wait_on(manager, c), manager.status()
        took = time.monotonic() - lost_at
        manager.publish(b"after", routing_key="q", timeout=5)
        assert timeline.wait_for("connected", 1, lost_at), timeline.names(lost_at)
        assert "connect_failed" not in timeline.names(lost_at)
        assert took < SLOW.min / 2, f"{took:.2f}s to reach the third node"
    finally:
        manager.stop(timeout=5)
        for fake in (a, b, c):
            fake.stop()


def test_a_node_that_closes_a_new_connection_with_541_is_left_for_the_next_at_once() -> None:
    """The "second loss": connected to a node that closes the connection right away (541)."""
    brokers = [FakeBroker(heartbeat=0).start() for _ in range(3)]
    a, b, c = brokers
    manager, peer, timeline = start_on_first(brokers)
    try:
        lost_at = time.monotonic()
        peer.drop()
        second = b.accept()
        assert wait_on(manager, b), manager.status()
        second.close_connection(541, VHOST_DOWN)
        c.accept()
        assert wait_on(manager, c), manager.status()
        took = time.monotonic() - lost_at
        manager.publish(b"after", routing_key="q", timeout=5)
        assert timeline.wait_for("connected", 2, lost_at), timeline.names(lost_at)
        assert timeline.names(lost_at).count("disconnected") == 2
        assert took < SLOW.min / 2, f"{took:.2f}s to reach the third node"
    finally:
        manager.stop(timeout=5)
        for fake in brokers:
            fake.stop()


def test_when_no_other_node_is_up_a_node_still_starting_is_tried_again_soon_not_after_the_backoff() -> None:
    """Two nodes: the other is down (refused); the lost one is back but still starting (541).

    The round failed on both, so the backoff applies, but as after a refused
    connection the wait ends as soon as a node accepts TCP: the starting node
    is asked again within about a probe interval, not after ``Backoff.min``.
    """
    x = FakeBroker(heartbeat=0).start()
    down = FakeBroker(heartbeat=0).start()
    down_url = down.url
    down.stop()  # its port now refuses connections
    manager = ConnectionManager([x.url, down_url], heartbeat=0, backoff=SLOW)
    timeline = Timeline(manager)
    try:
        manager.start()
        peer = x.accept()
        assert manager.wait_connected(5)
        assert timeline.wait_for("connected", 1)
        x.options = replace(x.options, manual=frozenset({"connection.open"}))
        lost_at = time.monotonic()
        peer.drop()
        answer_open_with_541(x.accept())  # the down node refused first: this ends the round
        x.options = replace(x.options, manual=frozenset())
        x.accept()
        assert wait_on(manager, x), manager.status()
        took = time.monotonic() - lost_at
        manager.publish(b"after", routing_key="q", timeout=5)
        assert timeline.wait_for("connected", 1, lost_at), timeline.names(lost_at)
        assert timeline.names(lost_at).count("connect_failed") == 1  # one failed round, reported
        assert took < SLOW.min / 2, f"{took:.2f}s to use the node again"
    finally:
        manager.stop(timeout=5)
        x.stop()
