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
