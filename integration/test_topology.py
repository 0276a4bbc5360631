"""Topology recovery on RabbitMQ: entities and setup re-created on every new connection."""

from __future__ import annotations


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
