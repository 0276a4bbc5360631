"""What a manager re-creates on a new connection, over the scripted fake broker.

Declared entities, setup functions, consumers and unconfirmed publishes come
back on every new connection *before* the manager reports ``connected``; one
entity or consumer the broker refuses is degraded (reported, retried) without
keeping the rest down.  The fake broker accepts the reconnection; the test
decides what it answers.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Any, Iterator, Optional

import kombu
import pytest

from carrot_kombu import Backoff, ConnectionManager, ConnectionState, Rejected
from tests.fakebroker import FakeBroker, Method, Peer, WaitTimeout
from tests.recorder import Recorder
from tests.support import in_background

JSON = {"content_type": "application/json", "content_encoding": "utf-8"}


class Events(Recorder):
    EVENTS = Recorder.EVENTS + ("degraded", "recovered")


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


@pytest.fixture
def managers() -> Iterator[list[ConnectionManager]]:
    made: list[ConnectionManager] = []
    yield made
    for manager in made:
        manager.stop(timeout=5)


def connect(broker: FakeBroker, managers: list[ConnectionManager], **options: Any) -> tuple[ConnectionManager, Peer, Events]:
    options.setdefault("heartbeat", 0)
    options.setdefault("backoff", Backoff(min=0.05, max=0.3, jitter=False))
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", **options)
    managers.append(manager)
    events = Events(manager)
    manager.start()
    peer = broker.accept()
    assert manager.wait_connected(5)
    # Events reach listeners on the event thread, after the status: counted
    # here, so that reconnect() never takes this one for the next connection's.
    assert events.wait_count("connected", 1), events.names()
    return manager, peer, events


def hold_next_open(broker: FakeBroker) -> None:
    """The next connection waits for the test to send connection.open-ok (to script it first)."""
    broker.options = dataclasses.replace(broker.options, manual=frozenset({"connection.open"}))


def open_held(peer: Peer) -> None:
    peer.expect("connection.open")
    peer.send_method(0, "connection.open-ok", "")


def reconnect(broker: FakeBroker, peer: Peer, events: Events, script: Optional[Any] = None) -> Peer:
    """Close ``peer``'s connection from the broker's side; the manager's next connection, scripted first."""
    connected = events.count("connected")
    if script is not None:
        hold_next_open(broker)
    peer.close_connection()
    second = broker.accept()
    if script is not None:
        broker.options = dataclasses.replace(broker.options, manual=frozenset())
        script(second)
        open_held(second)
    assert events.wait_count("connected", connected + 1), events.names()
    return second


def queue_names(peer: Peer, method: str = "queue.declare") -> list[str]:
    return [m["queue"] for m in peer.received(method)]


# -- declared entities -------------------------------------------------------------------------------


def test_declared_queues_exchanges_and_bindings_come_back_before_connected(broker, managers):
    manager, peer, events = connect(broker, managers)
    exchange = kombu.Exchange("events", "topic", durable=True)
    manager.declare(kombu.Queue("jobs", exchange=exchange, routing_key="job.*"), kombu.Exchange("audit", "fanout"))
    assert queue_names(peer) == ["jobs"]
    second = reconnect(broker, peer, events)
    # Recorded before the manager said "connected": nothing to wait for.
    assert queue_names(second) == ["jobs"]
    assert {m["exchange"] for m in second.received("exchange.declare")} == {"events", "audit"}
    (bind,) = second.received("queue.bind")
    assert (bind["queue"], bind["exchange"], bind["routing_key"]) == ("jobs", "events", "job.*")
    assert manager.status().degraded == ()


def test_a_server_named_queue_is_declared_anew_and_its_name_written_back(broker, managers):
    manager, peer, events = connect(broker, managers)
    replies = kombu.Queue("")
    manager.declare(replies)
    first_name = replies.name
    assert first_name.startswith("amq.gen-")
    second = reconnect(broker, peer, events)
    (declare,) = second.received("queue.declare")
    assert declare["queue"] == "" and declare["exclusive"]  # it dies with its connection
    assert replies.name.startswith("amq.gen-") and replies.name != first_name


def test_a_declare_refused_now_is_not_registered(broker, managers):
    manager, peer, events = connect(broker, managers)

    def refuse(p: Peer, m: Method) -> None:
        p.close_channel(m.channel, 406, "PRECONDITION_FAILED - inequivalent arg 'durable'", 50, 10, wait=None)

    peer.on("queue.declare", refuse)
    with pytest.raises(Exception) as caught:
        manager.declare(kombu.Queue("jobs"))
    assert getattr(caught.value, "reply_code", None) == 406
    peer.on("queue.declare", None)
    second = reconnect(broker, peer, events)
    assert queue_names(second) == []


def test_a_406_at_recovery_degrades_only_that_entity_until_it_declares_again(broker, managers):
    manager, peer, events = connect(broker, managers)
    manager.declare(kombu.Queue("good"), kombu.Queue("bad"), kombu.Queue("also-good"))

    def refuse_bad(p: Peer, m: Method) -> None:
        if m["queue"] == "bad":
            p.close_channel(m.channel, 406, "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'", 50, 10,
                            wait=None)
        else:
            p.send_method(m.channel, "queue.declare-ok", m["queue"], 0, 0, wait=None)

    second = reconnect(broker, peer, events, script=lambda p: p.on("queue.declare", refuse_bad))
    assert manager.state is ConnectionState.CONNECTED
    assert dict(manager.status().degraded).keys() == {"queue 'bad'"}
    assert "PRECONDITION_FAILED" in dict(manager.status().degraded)["queue 'bad'"]
    assert events.wait_count("degraded", 1)
    what, error = events.args("degraded")[0]
    assert what == "queue 'bad'" and "(406) PRECONDITION_FAILED" in error
    assert set(queue_names(second)) >= {"good", "bad", "also-good"}
    manager.publish(b"served meanwhile", routing_key="good", timeout=5)  # the connection serves the rest
    second.on("queue.declare", None)  # the conflict is resolved on the broker
    assert events.wait_count("recovered", 1)
    assert events.args("recovered") == [("queue 'bad'",)]
    assert manager.wait_status(lambda s: s.degraded == (), 5)


def test_an_entity_the_broker_answers_by_closing_the_connection_is_dropped_not_retried_forever(broker, managers):
    manager, peer, events = connect(broker, managers)
    manager.declare(kombu.Queue("jobs"), kombu.Queue("poison"))

    def close_on_poison(p: Peer, m: Method) -> None:
        if m["queue"] == "poison":
            p.close_connection(540, "NOT_IMPLEMENTED - queue type not supported", 50, 10, wait=None)
        else:
            p.send_method(m.channel, "queue.declare-ok", m["queue"], 0, 0, wait=None)

    connected = events.count("connected")
    hold_next_open(broker)
    peer.close_connection()
    second = broker.accept()
    broker.options = dataclasses.replace(broker.options, manual=frozenset())
    second.on("queue.declare", close_on_poison)
    open_held(second)
    assert events.wait_count("connect_failed", 1)
    assert "NOT_IMPLEMENTED" in str(events.args("connect_failed")[-1][0])
    third = broker.accept()
    assert events.wait_count("connected", connected + 1)
    assert queue_names(third) == ["jobs"]  # the rest is still declared; the poison is gone


# -- setup functions ---------------------------------------------------------------------------------


def test_setup_functions_run_now_and_on_every_new_connection_and_a_failing_one_fails_the_attempt(broker, managers):
    manager, peer, events = connect(broker, managers)
    failing = threading.Event()
    calls = []

    def setup(channel: Any) -> None:
        calls.append(channel)
        if failing.is_set():
            raise RuntimeError("setup refused")
        channel.basic_qos(0, 7, True)

    assert manager.add_setup(setup) is setup
    assert [m["prefetch_count"] for m in peer.received("basic.qos")] == [7]
    second = reconnect(broker, peer, events)
    # (the peer records a method when its thread parses it: wait for that, bounded)
    second.wait_for(lambda: second.received("basic.qos"), what="the setup's basic.qos")
    assert [m["prefetch_count"] for m in second.received("basic.qos")] == [7]
    assert len(calls) == 2

    failing.set()
    connected = events.count("connected")
    second.close_connection()
    third = broker.accept()
    assert events.wait_count("connect_failed", 1)
    assert "setup refused" in str(events.args("connect_failed")[-1][0])
    assert events.count("connected") == connected  # never reported connected with a failed setup
    assert third.received("basic.qos") == []
    failing.clear()
    assert events.wait_count("connected", connected + 1, timeout=5)
    assert any(p.received("basic.qos") for p in broker.peers[3:])
    manager.remove_setup(setup)
    before = len(calls)
    reconnect(broker, broker.peers[-1], events)
    assert len(calls) == before


# -- consumers ---------------------------------------------------------------------------------------


def test_a_consumer_is_subscribed_again_after_a_reconnect(broker, managers):
    manager, peer, events = connect(broker, managers)
    received: list[Any] = []
    got = threading.Condition()

    def on_message(body: Any, message: Any) -> None:
        with got:
            received.append(body)
            message.ack()
            got.notify_all()

    consumer = manager.consume("jobs", on_message, prefetch_count=5)
    consume = peer.expect("basic.consume")
    assert consume["queue"] == "jobs"
    assert peer.received("basic.qos", channel=consume.channel)[0]["prefetch_count"] == 5
    peer.deliver(consume.channel, consume["consumer_tag"], body=json.dumps(1), properties=JSON)
    with got:
        assert got.wait_for(lambda: received == [1], 5)

    second = reconnect(broker, peer, events)
    consume = second.expect("basic.consume")  # subscribed before "connected"
    assert consume["queue"] == "jobs"
    tag = second.deliver(consume.channel, consume["consumer_tag"], body=json.dumps(2), properties=JSON)
    with got:
        assert got.wait_for(lambda: received == [1, 2], 5)
    assert second.expect("basic.ack", channel=consume.channel)["delivery_tag"] == tag

    consumer.cancel()
    assert second.expect("basic.cancel")["consumer_tag"] == consume["consumer_tag"]
    second.expect("channel.close", channel=consume.channel)


def test_a_consumer_the_broker_cancels_is_reported_once_and_subscribed_again(broker, managers):
    manager, peer, events = connect(broker, managers)
    received: list[Any] = []
    manager.consume("jobs", lambda body, message: (received.append(body), message.ack()))
    first = peer.expect("basic.consume")
    peer.send_method(first.channel, "basic.cancel", first["consumer_tag"], True)  # queue deleted, node down...
    assert events.wait_count("consumer_cancelled", 1)
    assert events.args("consumer_cancelled") == [("jobs",)]
    again = peer.expect("basic.consume")  # on its own new channel, after its backoff
    assert again["queue"] == "jobs"
    assert events.count("consumer_cancelled") == 1
    assert manager.wait_status(lambda s: s.degraded == (), 5)
    assert manager.state is ConnectionState.CONNECTED and events.count("connected") == 1


def test_a_consumer_whose_queue_is_missing_at_recovery_is_degraded_and_the_connection_comes_up(broker, managers):
    manager, peer, events = connect(broker, managers)
    manager.consume("jobs", lambda body, message: message.ack(), declare=False)
    peer.expect("basic.consume")

    def missing(p: Peer, m: Method) -> None:
        p.close_channel(m.channel, 404, "NOT_FOUND - no queue 'jobs' in vhost '/'", 60, 20, wait=None)

    second = reconnect(broker, peer, events, script=lambda p: p.on("basic.consume", missing))
    assert "consumer of queue 'jobs'" in dict(manager.status().degraded)
    assert events.wait_count("degraded", 1)
    second.on("basic.consume", None)  # the queue is back
    assert events.wait_count("recovered", 1)
    assert events.args("recovered")[-1] == ("consumer of queue 'jobs'",)
    assert manager.wait_status(lambda s: s.degraded == (), 5)


def test_an_undecodable_delivery_is_rejected_without_requeue_and_the_consumer_goes_on(broker, managers):
    manager, peer, events = connect(broker, managers)
    received: list[Any] = []
    manager.consume("jobs", lambda body, message: (received.append(body), message.ack()))
    consume = peer.expect("basic.consume")
    bad = peer.deliver(consume.channel, consume["consumer_tag"], body=b"{not json", properties=JSON)
    reject = peer.expect("basic.reject", channel=consume.channel)
    assert reject["delivery_tag"] == bad and not reject["requeue"]
    good = peer.deliver(consume.channel, consume["consumer_tag"], body=json.dumps("ok"), properties=JSON)
    assert peer.expect("basic.ack", channel=consume.channel)["delivery_tag"] == good
    assert received == ["ok"]


def test_a_consume_the_broker_refuses_now_raises_and_nothing_stays_subscribed(broker, managers):
    manager, peer, events = connect(broker, managers)

    def missing(p: Peer, m: Method) -> None:
        p.close_channel(m.channel, 404, "NOT_FOUND - no queue 'ghost' in vhost '/'", 60, 20, wait=None)

    peer.on("basic.consume", missing)
    with pytest.raises(Exception) as caught:
        manager.consume("ghost", lambda body, message: None, declare=False)
    assert getattr(caught.value, "reply_code", None) == 404
    peer.on("basic.consume", None)
    second = reconnect(broker, peer, events)
    assert second.received("basic.consume") == []  # not registered: not resubscribed either
    assert manager.status().degraded == ()


def test_idle_pooled_channels_give_their_ids_to_a_consumer_at_channel_max(broker, managers):
    manager, peer, events = connect(broker, managers, channel_max=4, pool_limit=3)
    leases = [manager.open_channel(timeout=5) for _ in range(3)]
    for lease in leases:
        lease.release()
    manager.publish(b"x", routing_key="q", timeout=5)  # the confirm channel: the fourth id
    assert manager.status().pool.idle == 3
    manager.consume("jobs", lambda body, message: message.ack())
    consume = peer.expect("basic.consume")
    assert consume["queue"] == "jobs" and consume.channel <= 4
    assert manager.status().pool.idle < 3
    manager.publish(b"y", routing_key="q", timeout=5)  # publishing goes on


# -- the confirm channel -----------------------------------------------------------------------------


def test_an_unconfirmed_publish_is_published_again_on_the_next_connection(broker, managers):
    manager, peer, events = connect(broker, managers)
    manager.publish(b"warm-up", routing_key="q", timeout=5)
    peer.set_confirms(None)  # this broker never confirms: the message is in doubt
    worker = in_background(lambda: manager.publish(b"in doubt", routing_key="q", timeout=10), "publish")
    peer.wait_for(lambda: len(peer.published) == 2)
    second = reconnect(broker, peer, events)
    second.wait_for(lambda: second.published)
    assert [p.body for p in second.published] == [b"in doubt"]
    worker.result(5)  # confirmed on the second connection: it raises nothing


def _publish_in_background(manager: ConnectionManager, *calls: dict[str, Any]) -> tuple[list[threading.Thread], dict[int, Any]]:
    outcomes: dict[int, Any] = {}

    def run(index: int, kwargs: dict[str, Any]) -> None:
        try:
            manager.publish(timeout=10, **kwargs)
            outcomes[index] = "ok"
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            outcomes[index] = exc

    threads = [threading.Thread(target=run, args=(i, kw)) for i, kw in enumerate(calls)]
    for t in threads:
        t.start()
    return threads, outcomes


@pytest.mark.parametrize("text, culprit", [
    ("NOT_FOUND - no exchange 'missing' in vhost '/'", 1),
    ("PRECONDITION_FAILED - message size 600 is larger than configured max size 100", 1),
    ("PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'", 1),
])
def test_a_refused_publish_among_several_in_flight_fails_only_its_caller(broker, managers, text, culprit):
    manager, peer, events = connect(broker, managers)
    manager.publish(b"warm-up", routing_key="q", timeout=5)
    channel = peer.published[-1].channel
    peer.set_confirms(None)
    calls = [
        {"body": b"fine", "routing_key": "q"},
        {"body": b"x" * 600, "exchange": "missing", "routing_key": "q", "user_id": "mallory"},
        {"body": b"also fine", "routing_key": "q"},
    ]
    threads, outcomes = _publish_in_background(manager, *calls)
    peer.wait_for(lambda: len(peer.published) == 4)
    peer.set_confirms("ack")
    peer.close_channel(channel, int(text.startswith("NOT") and 404 or 406), text, 60, 40)
    for t in threads:
        t.join(10)
    assert isinstance(outcomes[culprit], Rejected), outcomes
    assert sorted(i for i, o in outcomes.items() if o == "ok") == sorted(set(range(3)) - {culprit}), outcomes
    republished = [p.body for p in peer.published[4:]]
    assert sorted(republished) == [b"also fine", b"fine"]  # the others went again, the culprit not


def test_an_unattributed_channel_close_publishes_the_in_flight_messages_again_one_at_a_time(broker, managers):
    manager, peer, events = connect(broker, managers)
    manager.publish(b"warm-up", routing_key="q", timeout=5)
    channel = peer.published[-1].channel
    peer.set_confirms(None)
    threads, outcomes = _publish_in_background(
        manager, {"body": b"one", "routing_key": "q"}, {"body": b"two", "routing_key": "q"})
    peer.wait_for(lambda: len(peer.published) == 3)
    peer.close_channel(channel, 541, "INTERNAL_ERROR - something went wrong", 60, 40)
    # One at a time, on a new confirm channel: the second only once the first is confirmed.
    peer.wait_for(lambda: len(peer.published) == 4)
    assert len(peer.received("confirm.select")) == 2
    with pytest.raises(WaitTimeout):
        peer.wait_for(lambda: len(peer.published) == 5, timeout=0.3)
    first_again = peer.published[3]
    peer.confirm(first_again.channel, first_again.delivery_tag)
    peer.wait_for(lambda: len(peer.published) == 5)
    peer.set_confirms("ack")
    peer.release_confirms()
    for t in threads:
        t.join(10)
    assert outcomes == {0: "ok", 1: "ok"}, outcomes
    assert sorted(p.body for p in peer.published[3:5]) == [b"one", b"two"]


def test_many_entities_come_back_pipelined_and_a_refused_one_is_named_alone(broker, managers):
    """20 queues: declared nowait, a channel.flow per chunk proves them; a 406 sends that chunk one by one."""
    manager, peer, events = connect(broker, managers)
    names = [f"many-{n}" for n in range(20)]
    manager.declare(*[kombu.Queue(name) for name in names])

    def refuse_one(p: Peer, m: Method) -> None:
        if m["queue"] == "many-7":
            p.close_channel(m.channel, 406, "PRECONDITION_FAILED - inequivalent arg 'durable'", 50, 10, wait=None)
        elif not m["nowait"]:
            p.send_method(m.channel, "queue.declare-ok", m["queue"], 0, 0, wait=None)

    second = reconnect(broker, peer, events, script=lambda p: p.on("queue.declare", refuse_one))
    declares = second.received("queue.declare")
    assert all(m["nowait"] for m in declares[:20])  # the first pass: written back to back
    assert second.received("channel.flow")
    assert set(queue_names(second)) == set(names)
    # The refused chunk went one by one: only many-7 is degraded, the others were declared again, awaited.
    assert dict(manager.status().degraded).keys() == {"queue 'many-7'"}
    assert {m["queue"] for m in declares[20:] if not m["nowait"]} == set(names)
