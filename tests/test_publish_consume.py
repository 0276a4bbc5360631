"""manager.publish and manager.consume on the memory transport (no confirms there)."""

from __future__ import annotations

import pickle
import threading
import time

import kombu
import pytest

from carrot_kombu import ConfigurationError, ConnectionManager, Disconnected, PublishTimeout


def test_publish_and_consume_roundtrip(make_manager):
    manager, _ = make_manager("memory://")
    queue = kombu.Queue("work")
    manager.declare(queue)
    got = []
    done = threading.Event()
    on_thread = []

    def on_message(body, message):
        on_thread.append(threading.current_thread().name)
        got.append(body)
        message.ack()
        if len(got) == 3:
            done.set()

    consumer = manager.consume(queue, on_message)
    assert manager.wait_connected(5)
    for n in range(3):
        manager.publish({"n": n}, routing_key="work")
    assert done.wait(5)
    consumer.cancel()
    consumer.cancel()
    assert got == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert all(name.startswith("carrot-kombu-consumer") for name in on_thread)


def test_publish_while_disconnected_times_out_as_not_sent(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    started = time.monotonic()
    with pytest.raises(PublishTimeout) as info:
        manager.publish(b"x", routing_key="q", timeout=0.2)
    assert info.value.outcome == "not_sent" and time.monotonic() - started >= 0.2
    assert pickle.loads(pickle.dumps(info.value)).outcome == "not_sent"


def test_pending_bound_makes_publishers_wait_then_time_out(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager(max_pending=2)
    assert events.wait_count("connect_failed", 1)
    waiting = [threading.Thread(target=lambda: _quiet(manager.publish, b"p", routing_key="q", timeout=2))
               for _ in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 2
    while manager._core.publisher.pending_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert manager._core.publisher.pending_count() == 2
    with pytest.raises(PublishTimeout, match="already waiting") as info:
        manager.publish(b"third", routing_key="q", timeout=0.1)
    assert info.value.outcome == "not_sent"
    faults.refuse = 0  # the broker comes back: the two pending ones go out and are settled
    for t in waiting:
        t.join(5)
    assert manager._core.publisher.pending_count() == 0


def test_publish_waits_for_the_connection_and_then_succeeds(make_manager, faults):
    faults.refuse = 3
    manager, events = make_manager()
    manager.declare(kombu.Queue("later"))
    manager.publish({"late": True}, routing_key="later", timeout=5)  # waits through 3 refusals
    with manager.channel() as lease:
        assert kombu.Queue("later")(lease).get(no_ack=True).payload == {"late": True}


def test_bad_consume_and_max_pending_arguments(make_manager):
    with pytest.raises(ConfigurationError, match="max_pending"):
        ConnectionManager("memory://", max_pending=0)
    manager, _ = make_manager("memory://")
    with pytest.raises(TypeError, match="callback must be callable"):
        manager.consume("q", None)
    with pytest.raises(ConfigurationError, match="prefetch_count"):
        manager.consume("q", lambda b, m: None, prefetch_count=-1)


def _quiet(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except PublishTimeout:
        pass


def test_stop_ends_waiting_publishes_at_once(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    outcome = []

    def publish():
        try:
            manager.publish(b"x", routing_key="q", timeout=30)
        except Disconnected as exc:
            outcome.append(exc)

    t = threading.Thread(target=publish)
    t.start()
    deadline = time.monotonic() + 2
    while manager._core.publisher.pending_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    manager.stop()
    t.join(5)
    assert not t.is_alive() and "never sent" in str(outcome[0]) and "stopped" in str(outcome[0])
    with pytest.raises(Disconnected, match="stopped"):
        manager.publish(b"y", routing_key="q", timeout=30)  # at once, not after 30 s


def test_consumers_and_publisher_come_back_after_stop_and_start(make_manager):
    manager, _ = make_manager("memory://")
    queue = kombu.Queue("again")
    manager.declare(queue)
    got = []
    cond = threading.Condition()

    def on_message(body, message):
        with cond:
            got.append(body)
            cond.notify_all()

    manager.consume(queue, on_message, no_ack=True)
    assert manager.wait_connected(5)
    manager.publish("first", routing_key="again")
    with cond:
        assert cond.wait_for(lambda: "first" in got, 5)
    manager.stop()
    manager.start()  # a new supervisor: its links must not look like the old ones
    assert manager.wait_connected(5)
    manager.publish("second", routing_key="again")
    with cond:
        assert cond.wait_for(lambda: "second" in got, 5), "consumer not resubscribed after restart"


def test_a_refusal_falls_on_a_written_message_whose_caller_is_gone_not_on_another_callers():
    """Caller A's publish to a missing exchange is written, then A is interrupted (or times out) and
    forgets it; caller B's message is the only other one in flight when the 404 closes the channel.
    B used to get ``Rejected: no exchange ...`` for A's message (helper-18, 0.1-0.5 % under a storm)."""
    from amqp import spec
    from amqp.exceptions import NotFound

    from carrot_kombu._link import Outbound
    from carrot_kombu.publisher import Publisher, _Pending

    publisher = Publisher(max_pending=10)
    channel = object()
    publisher._channel = channel
    gone = _Pending(1, Outbound("no-such-exchange", "q", {}, b"a"))
    live = _Pending(2, Outbound("", "q", {}, b"b"))
    for tag, pending in ((1, gone), (2, live)):
        publisher._pending[pending.id] = pending
        pending.tag, pending.written = tag, True
        publisher._by_tag[tag] = pending
    publisher._forget(gone)  # its caller is gone
    error = NotFound("NOT_FOUND - no exchange 'no-such-exchange' in vhost '/'", spec.Basic.Publish, 404)
    publisher._on_channel_closed(channel, error, True)
    assert live.outcome is None  # published again, not blamed
    assert gone.outcome == "rejected"
