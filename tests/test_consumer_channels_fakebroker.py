"""Consumers sharing channels, over the scripted fake broker: qos per consume, isolation, pipelined restore."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from carrot_kombu import Backoff, ConnectionManager
from carrot_kombu._pyamqp.link import CONSUMERS_PER_CHANNEL
from tests.fakebroker import FakeBroker, Peer
from tests.recorder import Recorder

N = CONSUMERS_PER_CHANNEL + 8  # two channels


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


def connect(broker: FakeBroker) -> tuple[ConnectionManager, Peer, Recorder]:
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0,
                                backoff=Backoff(min=0.05, max=0.5))
    recorder = Recorder(manager)
    manager.start()
    peer = broker.accept()
    assert manager.wait_connected(5)
    return manager, peer, recorder


def _consumes(peer: Peer) -> dict[str, Any]:
    """The last basic.consume of each queue."""
    return {m["queue"]: m for m in peer.received("basic.consume")}


def test_consumers_share_channels_each_with_its_own_prefetch(broker) -> None:
    manager, peer, _ = connect(broker)
    try:
        for n in range(N):
            manager.consume(f"q{n}", lambda body, message: message.ack(), declare=False, prefetch_count=5 + n % 2)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == N and _consumes(peer))
        assert len({m.channel for m in consumes.values()}) == 2
        # On each channel, the qos in force at each consume is that consumer's prefetch.
        for channel in {m.channel for m in consumes.values()}:
            prefetch = None
            for m in peer.received(channel=channel):
                if m.name == "basic.qos":
                    prefetch = m["prefetch_count"]
                elif m.name == "basic.consume":
                    assert prefetch == 5 + int(m["queue"][1:]) % 2, m
    finally:
        manager.stop(timeout=5)


def test_a_multiple_ack_on_a_shared_channel_is_refused_and_settles_nothing_of_the_neighbours(broker) -> None:
    """ack(multiple=True) on a channel shared by consumers acked the neighbours' deliveries (red team 20, F1)."""
    manager, peer, _ = connect(broker)
    errors: list[BaseException] = []
    done = threading.Event()

    def greedy(body: Any, message: Any) -> None:
        try:
            message.ack(multiple=True)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
            message.ack()
        finally:
            done.set()

    try:
        manager.consume("neighbour", lambda body, message: None, declare=False, prefetch_count=5)
        manager.consume("greedy", greedy, declare=False)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == 2 and _consumes(peer))
        neighbour, mine = consumes["neighbour"], consumes["greedy"]
        assert neighbour.channel == mine.channel  # shared
        for _ in range(3):
            peer.deliver(neighbour.channel, neighbour["consumer_tag"], body=b"theirs")
        peer.deliver(mine.channel, mine["consumer_tag"], body=b"mine")
        assert done.wait(5)
        assert isinstance(errors[0], ValueError) and "multiple" in str(errors[0])
        acks = peer.wait_for(lambda: peer.received("basic.ack", channel=mine.channel))
        assert [(a["delivery_tag"], a["multiple"]) for a in acks] == [(4, False)]  # its own, alone
    finally:
        manager.stop(timeout=5)


def test_a_406_for_one_consumers_double_ack_cancels_it_alone_and_moves_the_others(broker) -> None:
    manager, peer, events = connect(broker)
    acked = threading.Event()

    def ack_twice(body: Any, message: Any) -> None:
        message.ack()
        message.channel.basic_ack(message.delivery_tag)
        acked.set()

    try:
        for n in range(N):
            manager.consume(f"q{n}", ack_twice if n == 3 else (lambda body, message: message.ack()), declare=False)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == N and _consumes(peer))
        culprit = consumes["q3"]
        neighbours = sorted(q for q, m in consumes.items() if m.channel == culprit.channel and q != "q3")
        others = sorted(q for q, m in consumes.items() if m.channel != culprit.channel)
        assert neighbours and others
        peer.deliver(culprit.channel, culprit["consumer_tag"], body=b"x")
        assert acked.wait(5)
        peer.wait_for(lambda: len(peer.received("basic.ack", channel=culprit.channel)) == 2)
        peer.close_channel(culprit.channel, 406, "PRECONDITION_FAILED - unknown delivery tag 1", 60, 80)
        # The neighbours come back at once on another channel, quietly; the culprit as before.
        def subscribed() -> dict[str, int]:
            counts: dict[str, int] = {}
            for m in peer.received("basic.consume"):
                counts[m["queue"]] = counts.get(m["queue"], 0) + 1
            return counts

        peer.wait_for(lambda: all(subscribed()[q] == 2 for q in neighbours + ["q3"]), timeout=5)
        assert all(subscribed()[q] == 1 for q in others)  # untouched
        assert events.wait_count("consumer_cancelled", 1)
        assert events.args("consumer_cancelled") == [("q3",)]
        assert not any(what != "consumer of queue 'q3'" for what, *_ in events.args("degraded"))
    finally:
        manager.stop(timeout=5)


def test_a_reconnect_restores_every_consumer_pipelined(broker) -> None:
    manager, peer, _ = connect(broker)
    try:
        for n in range(N):
            manager.consume(f"q{n}", lambda body, message: message.ack(), declare=False)
        peer.wait_for(lambda: len(_consumes(peer)) == N)
        peer.close_connection()
        second = broker.accept()
        consumes = second.wait_for(lambda: len(_consumes(second)) == N and _consumes(second))
        assert all(m["nowait"] for m in consumes.values())  # written back to back, nothing awaited each
        assert len(second.received("channel.open")) <= 2 + 2  # two consumer channels (+ publisher, pool)
        channels = {m.channel for m in consumes.values()}
        assert len(channels) == 2
        # One round trip per channel proves the broker took them all.
        assert {m.channel for m in second.received("channel.flow")} >= channels
        assert manager.wait_connected(5)
    finally:
        manager.stop(timeout=5)
