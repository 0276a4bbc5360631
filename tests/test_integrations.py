"""from_url / from_connection / from_celery, the Celery module, kombu on leases (memory://)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import kombu
import pytest
from celery import Celery, signals
from kombu.simple import SimpleQueue

from carrot_kombu import Backoff, ConfigurationError, ConnectionManager, ConnectionState, Disconnected


def test_from_url_is_the_constructor():
    m = ConnectionManager.from_url("amqp://u:p@h:5680/v", heartbeat=3)
    e = m.settings.endpoints[0]
    assert (e.host, e.port, e.userid, e.password, e.virtual_host, e.heartbeat) == ("h", 5680, "u", "p", "v", 3)


def test_from_connection_takes_hosts_credentials_and_options():
    conn = kombu.Connection(
        "amqp://alice:s3cret@h1:5673/prod;amqp://h2:5674/prod",
        heartbeat=20, connect_timeout=7, transport_options={"confirm_publish": True},
        ssl={"cert_reqs": 2},
    )
    m = ConnectionManager.from_connection(conn, pool_limit=3)
    first, second = m.settings.endpoints
    assert (first.host, first.port, first.userid, first.password, first.virtual_host) == ("h1", 5673, "alice", "s3cret", "prod")
    assert (second.host, second.port, second.userid, second.password) == ("h2", 5674, "alice", "s3cret")
    assert first.heartbeat == 20 and first.connect_timeout == 7.0 and first.ssl
    assert m.settings.transport_options == {"confirm_publish": True} and m.settings.pool_limit == 3
    assert conn._connection is None  # its socket was never used


def test_from_connection_keeps_the_default_heartbeat_and_rejects_other_transports():
    assert ConnectionManager.from_connection(kombu.Connection("amqp://h//")).settings.endpoints[0].heartbeat == 10
    assert ConnectionManager.from_connection(kombu.Connection("memory://")).settings.endpoints[0].scheme == "memory"
    with pytest.raises(ConfigurationError, match="not supported"):
        ConnectionManager.from_connection(kombu.Connection("filesystem://"))


def test_from_celery_maps_the_broker_settings():
    app = Celery("t", broker="amqp://u:pw@broker:5679/vh", set_as_current=False)
    app.conf.update(
        broker_write_url="amqp://w:pw@writer:5680/vh",
        broker_heartbeat=30,
        broker_connection_timeout=3,
        broker_pool_limit=7,
        broker_connection_max_retries=5,
        broker_transport_options={"confirm_publish": True},
    )
    m = ConnectionManager.from_celery(app, heartbeat=15)
    e = m.settings.endpoints[0]
    assert (e.host, e.port, e.userid) == ("writer", 5680, "w")  # broker_write_url wins for a producer
    assert e.heartbeat == 15  # overrides win
    assert e.connect_timeout == 3.0 and m.settings.pool_limit == 7
    assert m.settings.backoff.max_tries == 5
    assert m.settings.transport_options["confirm_publish"] is True
    forever = Celery("t2", broker="amqp://h//", set_as_current=False)
    forever.conf.broker_connection_max_retries = None
    forever.conf.broker_pool_limit = None
    m = ConnectionManager.from_celery(forever)
    assert m.settings.backoff.max_tries is None and m.settings.pool_limit == 10
    defaults = Celery("t3", broker="amqp://h//", set_as_current=False)
    m = ConnectionManager.from_celery(defaults)
    # Celery's defaults (heartbeat 120 s, 100 retries then give up) are not taken
    assert m.settings.endpoints[0].heartbeat == 10 and m.settings.backoff.max_tries is None
    assert m.settings.endpoints[0].connect_timeout == 4.0  # Celery's broker_connection_timeout


def test_from_celery_honours_the_url_and_takes_url_keyword():
    app = Celery("u", broker="amqp://u:pw@broker:5679/vh?heartbeat=30&connect_timeout=3", set_as_current=False)
    app.conf.broker_heartbeat = 60
    e = ConnectionManager.from_celery(app).settings.endpoints[0]
    assert e.heartbeat == 30 and e.connect_timeout == 3.0  # the URL's own values win, as in Celery
    e = ConnectionManager.from_celery(app, url="amqp://x:y@other:5690//").settings.endpoints[0]
    assert (e.host, e.port, e.heartbeat) == ("other", 5690, 60)
    carrot = Celery("c", broker="carrot+amqp://u:pw@broker:5679/vh", set_as_current=False)
    e = ConnectionManager.from_celery(carrot).settings.endpoints[0]
    assert (e.host, e.port, e.userid, e.virtual_host) == ("broker", 5679, "u", "vh")


def test_celery_worker_signals_start_and_stop_one_manager_per_process():
    from carrot_kombu.celery import install, manager_for, uninstall

    app = Celery("w", broker="memory://", set_as_current=False)
    manager = install(app)
    try:
        assert install(app) is manager
        assert manager.state is ConnectionState.STOPPED
        signals.worker_process_init.send(sender=None)  # a prefork child starts
        assert manager.wait_connected(5)
        with manager_for(app).channel() as lease:
            lease.queue_declare("celery-side")
        signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)
        assert manager.state is ConnectionState.STOPPED
    finally:
        uninstall(app)
    with pytest.raises(RuntimeError, match="install"):
        manager_for(app)


def test_core_imports_without_celery():
    code = "import sys; sys.modules['celery'] = None; import carrot_kombu, carrot_kombu.cli; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_kombu_consumer_and_simple_queue_on_memory(make_manager):
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    queue = kombu.Queue("kq")
    got = []
    with manager.channel() as lease:
        with kombu.Consumer(lease, queues=[queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            kombu.Producer(lease).publish({"n": 1}, routing_key="kq")
            manager.drain_events(timeout=2)
    assert got == [{"n": 1}]
    with manager.channel() as lease:
        simple = SimpleQueue(lease, "sq")
        simple.put({"hello": "world"})
        assert simple.get(timeout=2).payload == {"hello": "world"}
        simple.close()


def test_drain_events_while_disconnected_raises(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    with pytest.raises(Disconnected):
        manager.drain_events(timeout=0.1)


def test_backoff_pickles_for_celery_configuration():
    assert pickle.loads(pickle.dumps(Backoff(min=0.5))) == Backoff(min=0.5)


@pytest.mark.parametrize("url, expected", [
    ("amqp://h:1", "amqp://atuser:pw@h:1/atvh"),
    ("amqp://h:1/", "amqp://atuser:pw@h:1/atvh"),  # kombu: an empty vhost is none (found by attack)
    ("amqp://h:1?heartbeat=5", "amqp://atuser:pw@h:1/atvh?heartbeat=5"),
    ("amqp://h:1//", "amqp://atuser:pw@h:1//"),
    ("amqp://u:p@h:1/v", "amqp://u:p@h:1/v"),  # what the URL names wins, as kombu does
    ("amqp://u@h:1/v", "amqp://u:pw@h:1/v"),
])
def test_the_transport_fills_what_the_url_leaves_out_from_the_kombu_connection(url, expected):
    from types import SimpleNamespace

    from carrot_kombu.transport import _with_connection_credentials

    client = SimpleNamespace(userid="atuser", password="pw", virtual_host="atvh")
    assert _with_connection_credentials(url, client) == expected
