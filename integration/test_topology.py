"""Topology recovery on RabbitMQ: entities and setup re-created on every new connection."""

from __future__ import annotations

import queue

import kombu
import pytest

from .broker import drain, unique



def test_server_named_exclusive_queue_and_binding_survive_disconnects(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff={"min": 0.05, "max": 0.5})
    exchange = kombu.Exchange(unique("ck-topo"), type="direct", auto_delete=True)
    queue = kombu.Queue("", exchange, routing_key="k", exclusive=True)
    qos = []
    manager.add_setup(lambda channel: qos.append(channel.basic_qos(0, 10, False)))
    manager.declare(queue)  # not connected yet: registered, declared on connect
    assert manager.wait_connected(10)
    names = []
    for round_ in range(5):
        assert queue.name.startswith("amq.gen-")
        names.append(queue.name)
        with manager.channel() as lease:
            lease.basic_publish(lease.prepare_message(b"%d" % round_), exchange=exchange.name, routing_key="k")
            assert drain(lease, queue.name, 1) == [b"%d" % round_]
        proxy.cut()
        assert events.wait_count("connected", round_ + 2, timeout=10)
    assert len(set(names)) == 5  # a fresh server-named queue on every connection
    assert len(qos) == 6  # setup ran on every connection


def test_declare_reports_broker_errors_now(rabbit):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    name = unique("ck-ex")
    manager.declare(kombu.Exchange(name, type="direct", auto_delete=True))
    from amqp.exceptions import PreconditionFailed

    with pytest.raises(PreconditionFailed):
        manager.declare(kombu.Exchange(name, type="fanout", auto_delete=True))


def test_an_entity_declared_offline_that_closes_the_connection_is_dropped_not_retried_forever(rabbit, caplog):
    """An unknown exchange type is refused with 503, closing the whole connection, on every connection.

    Registered while disconnected, it must cost one failed attempt, not keep
    the manager (and every other caller) disconnected for ever.
    """
    from carrot_kombu import Disconnected

    manager, events, _ = rabbit(start=False, backoff={"min": 0.1, "max": 0.5})
    good = kombu.Queue(unique("ck-good"), auto_delete=False)
    bogus = kombu.Exchange(unique("ck-bogus"), type="bogustype")
    manager.declare(good, bogus)  # not started: registered only
    manager.start()
    assert manager.wait_connected(10), manager.status()
    assert len(events.args("connect_failed")) == 1
    assert any("dropped a registered entity" in r.getMessage() and bogus.name in r.getMessage()
               for r in caplog.records)
    with manager.channel() as lease:
        assert lease.queue_declare(good.name, passive=True).queue == good.name  # the others were declared
        lease.queue_delete(good.name)
    with pytest.raises(Disconnected, match="503"):
        manager.declare(bogus)  # declared live, the caller gets the broker's answer
    assert manager.wait_connected(10)


@pytest.mark.parametrize(
    "bad, error",
    [
        ("jobs", TypeError),  # a queue name alone, not a kombu Queue
        (kombu.Queue("q" * 256), ValueError),  # AMQP short strings: 255 bytes at most
        (kombu.Queue("ck-args", queue_arguments={"x-max-length": object()}), TypeError),  # no AMQP field type
    ],
)
def test_an_invalid_entity_registered_while_disconnected_is_refused_and_the_manager_connects(rabbit, proxy, bad, error):
    """17.4: before, declare() registered it silently and every later attempt failed: never connected."""
    proxy.refuse()  # the port is closed: the manager is started but disconnected
    manager, events, _ = rabbit(proxy.url(), backoff={"min": 0.05, "max": 0.2, "jitter": False})
    assert events.wait_count("connect_failed", 1, timeout=10)
    good = kombu.Queue(unique("ck-good"), auto_delete=True)
    with pytest.raises(error):
        manager.declare(bad)
    manager.declare(good)  # registered only (disconnected)
    proxy.heal()
    assert manager.wait_connected(10), manager.status()
    assert manager.status().degraded == ()
    with manager.channel() as lease:
        assert lease.queue_declare(good.name, passive=True).queue == good.name


def test_an_entity_the_broker_refuses_on_reconnect_degrades_alone(rabbit, proxy):
    """406 PRECONDITION_FAILED (it exists with other arguments): the rest and the connection come up."""
    setup, _, _ = rabbit()
    assert setup.wait_connected(10)
    clash = unique("ck-clash")
    with setup.channel() as lease:
        lease.exchange_declare(clash, "direct", auto_delete=True)
        lease.queue_declare(clash + "-anchor", auto_delete=False)  # keeps the exchange: bound to it below
        lease.queue_bind(clash + "-anchor", clash, "k")

    proxy.refuse()
    manager, events, _ = rabbit(proxy.url(), backoff={"min": 0.05, "max": 0.5, "jitter": False})
    degraded, recovered = queue.Queue(), queue.Queue()  # events arrive on their own thread
    manager.on("degraded", lambda what, err: degraded.put((what, err)))
    manager.on("recovered", recovered.put)
    assert events.wait_count("connect_failed", 1, timeout=10)
    before = kombu.Queue(unique("ck-before"), auto_delete=True)
    after = kombu.Queue(unique("ck-after"), auto_delete=True)
    manager.declare(before, kombu.Exchange(clash, type="fanout", auto_delete=True), after)  # disconnected: registered
    proxy.heal()
    assert manager.wait_connected(10), manager.status()
    what = f"exchange {clash!r}"
    assert manager.wait_status(lambda s: what in dict(s.degraded), 5)
    assert "PRECONDITION_FAILED" in dict(manager.status().degraded)[what]
    event = degraded.get(timeout=5)
    assert event[0] == what and "406" in event[1]
    with manager.channel() as lease:  # declared before and after the refused one
        assert lease.queue_declare(before.name, passive=True).queue == before.name
        assert lease.queue_declare(after.name, passive=True).queue == after.name
    manager.publish(b"x", routing_key=before.name, timeout=5)  # the connection serves
    with setup.channel() as lease:  # someone fixes the broker's side: retried and declared
        lease.queue_delete(clash + "-anchor")
        lease.exchange_delete(clash)
    assert manager.wait_status(lambda s: s.degraded == (), 10)
    assert recovered.get(timeout=5) == what
    assert degraded.empty()  # reported once
    with setup.channel() as lease:
        lease.exchange_delete(clash)
        lease.queue_delete(before.name)
        lease.queue_delete(after.name)


def test_declaring_many_entities_at_once_is_pipelined_and_still_names_a_refused_one(rabbit, proxy):
    """``declare(*many)`` writes them in chunks (one round trip each); a refused chunk goes one by one,
    so the caller still gets the broker's error for the entity it refused, and nothing is registered."""
    from amqp.exceptions import PreconditionFailed

    manager, events, _ = rabbit(proxy.url(), backoff={"min": 0.05, "max": 0.5})
    assert manager.wait_connected(10)
    exchange = kombu.Exchange(unique("ck-many"), type="direct", auto_delete=True)
    # x-expires: auto_delete alone never removes a queue nobody consumed from (140 per run were left behind).
    expires = {"x-expires": 120_000}
    queues = [kombu.Queue(unique("ck-many"), exchange, routing_key=str(i), auto_delete=True,
                          queue_arguments=expires) for i in range(80)]
    manager.declare(*queues)
    with manager.channel() as lease:
        for q in queues:
            lease.queue_declare(q.name, passive=True)  # each exists (a missing one raises NotFound)
        lease.basic_publish(lease.prepare_message(b"to-79"), exchange=exchange.name, routing_key="79")
        assert drain(lease, queues[79].name, 1) == [b"to-79"]  # bound as declared
    # The same queues again, one in the middle redeclared with other arguments: refused by the broker.
    clash = kombu.Queue(queues[40].name, exchange, routing_key="40", auto_delete=True,
                        queue_arguments={**expires, "x-max-length": 5})
    others = [kombu.Queue(unique("ck-many"), exchange, routing_key=f"n{i}", auto_delete=True,
                          queue_arguments=expires) for i in range(60)]
    with pytest.raises(PreconditionFailed) as info:
        manager.declare(*others[:30], clash, *others[30:])
    assert "x-max-length" in str(info.value) or queues[40].name in str(info.value)
    # none of that call is registered: a reconnect declares only the first 80 again, and connects cleanly
    proxy.cut()
    assert events.wait_count("connected", 2, timeout=10)
    assert manager.status().degraded == ()
