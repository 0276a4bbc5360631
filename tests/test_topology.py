"""Topology recovery: declare() and add_setup() on every new connection (memory transport)."""

from __future__ import annotations

import kombu
import pytest

from carrot_kombu import ConnectionState, Disconnected


def test_declared_entities_exist_before_connected_after_every_reconnect(make_manager, faults):
    manager, events = make_manager(start=False)
    queue = kombu.Queue("orders", kombu.Exchange("shop", type="direct"), routing_key="orders")
    seen = []

    def on_connected():
        # runs after `connected`: the queue must already be there on this connection
        with manager.channel() as lease:
            seen.append(lease.queue_declare("orders", passive=True)[0])

    manager.on("connected", on_connected)
    manager.declare(queue)  # not started: only registered
    manager.start()
    assert events.wait_count("connected", 1)
    from kombu.transport import memory

    memory.Channel.queues.clear()  # the "broker" forgets everything, as after a restart
    faults.cut()
    assert events.wait_count("connected", 2)
    manager.stop()
    assert seen == ["orders", "orders"]


def test_declare_while_connected_declares_now(make_manager):
    manager, _ = make_manager()
    assert manager.wait_connected(5)
    manager.declare(kombu.Queue("now"))
    with manager.channel() as lease:
        assert lease.queue_declare("now", passive=True)[0] == "now"


def test_setup_runs_in_order_and_can_be_removed(make_manager, faults):
    manager, events = make_manager(start=False)
    calls = []
    first = manager.add_setup(lambda ch: calls.append("first"))
    manager.add_setup(lambda ch: calls.append("second"))
    manager.start()
    assert events.wait_count("connected", 1)
    manager.remove_setup(first)
    faults.cut()
    assert events.wait_count("connected", 2)
    assert calls == ["first", "second", "second"]


def test_failing_setup_never_reports_connected_and_is_retried(make_manager, faults):
    manager, events = make_manager(start=False, backoff={"min": 0.01, "max": 0.05, "jitter": False})
    failures = [OSError("setup needs the broker"), OSError("still not")]

    def setup(channel):
        if failures:
            raise failures.pop(0)

    manager.add_setup(setup)
    manager.start()
    assert events.wait_count("connected", 1)
    names = events.names()
    assert names[:5] == ["connecting", "connect_failed", "connecting", "connect_failed", "connecting"]
    error, delay = events.args("connect_failed")[0]
    assert "setup failed" in str(error) and isinstance(error.reason, OSError) and delay == 0.01


def test_setup_bug_is_retried_slowly_and_visible(make_manager, faults):
    manager, events = make_manager(start=False, backoff={"min": 0.01, "max": 0.3, "jitter": False})
    manager.add_setup(lambda channel: 1 / 0)
    manager.start()
    assert events.wait_count("connect_failed", 1)
    error, delay = events.args("connect_failed")[0]
    assert isinstance(error.reason, ZeroDivisionError) and delay == 0.3
    status = manager.status()
    assert status.state is ConnectionState.FAILED and status.fatal and "setup failed" in status.last_error
    with pytest.raises(Disconnected):
        manager.open_channel()


def test_publish_from_a_setup_function_fails_at_once_naming_the_mistake(make_manager, faults):
    """It used to wait its whole timeout: the confirm channel is attached after setup, on the same thread."""
    import time

    manager, events = make_manager(start=False, backoff={"min": 0.01, "max": 0.3, "jitter": False})
    manager.add_setup(lambda channel: manager.publish(b"from-setup", routing_key="q", timeout=30))
    start = time.monotonic()
    manager.start()
    assert events.wait_count("connect_failed", 1)
    assert time.monotonic() - start < 5
    error, _ = events.args("connect_failed")[0]
    assert "cannot be called from a setup function" in str(error)


def test_stop_from_a_setup_function_never_reports_connected(make_manager, faults):
    manager, events = make_manager(start=False)
    manager.add_setup(lambda channel: manager.stop(timeout=1))
    manager.start()
    assert events.wait_count("stopped", 1)
    assert manager.state is ConnectionState.STOPPED
    assert "connected" not in events.names()
    with pytest.raises(Disconnected):
        manager.open_channel()


def test_an_entity_changed_since_registration_into_something_unencodable_degrades_alone(make_manager, faults):
    """17.4: it used to fail every connection attempt (the manager never connected again)."""
    manager, events = make_manager(start=False)
    broken = kombu.Queue("ck-broken")
    good = kombu.Queue("ck-fine")
    manager.declare(broken, good)  # valid when registered...
    broken.queue_arguments = {"x-bad": object()}  # ...changed afterwards, as users do
    degraded = []
    manager.on("degraded", lambda what, error: degraded.append((what, error)))
    manager.start()
    assert manager.wait_connected(5), manager.status()
    assert events.count("connect_failed") == 0
    with manager.channel() as lease:
        assert lease.queue_declare("ck-fine", passive=True)[0] == "ck-fine"  # the others were declared
    assert manager.wait_status(lambda s: "queue 'ck-broken'" in dict(s.degraded), 5)
    assert "x-bad" in dict(manager.status().degraded)["queue 'ck-broken'"]
    broken.queue_arguments = {}  # fixed: retried (every Backoff.max) and declared
    assert manager.wait_status(lambda s: s.degraded == (), 5)
    with manager.channel() as lease:
        assert lease.queue_declare("ck-broken", passive=True)[0] == "ck-broken"
    assert [w for w, _ in degraded] == ["queue 'ck-broken'"]
