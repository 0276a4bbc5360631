"""``carrot+amqp://`` URLs in kombu: parsed into the connection's fields as on ``pyamqp://``, never shown.

Before, kombu kept ``carrot+amqp://user:pass@host:port/vhost`` whole as the
connection's ``hostname`` (``port`` was ``None``), so ``Connection.info()``
-- what ``celery inspect stats`` shows, without its ``password`` field --
carried the password, and kombu's own failover test failed on our scheme.
Also here: ``heartbeat=0`` chosen through the transport options or Celery's
``broker_heartbeat`` means no heartbeats, as in kombu.
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import kombu
import pytest
from kombu.utils.url import maybe_sanitize_url

import carrot_kombu  # noqa: F401 - registers carrot+amqp:// and its URL parsing
from carrot_kombu import ConnectionManager, transport

FIELDS = ("hostname", "port", "userid", "password", "virtual_host", "heartbeat")
FAILOVER = "{scheme}://alice:s3cret@localhost:12345/jobs?heartbeat=3;{scheme}://bob:pa55@other:12346/x"


def fields(conn: kombu.Connection) -> dict[str, Any]:
    return {name: getattr(conn, name) for name in FIELDS}


def stats_view(conn: kombu.Connection) -> dict[str, Any]:
    """What Celery's ``inspect stats`` shows of a connection (celery.worker.consumer.connection.info)."""
    params = conn.info()
    params.pop("password", None)
    params["alternates"] = [maybe_sanitize_url(u) if isinstance(u, str) else u for u in params["alternates"]]
    return params


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port
    with transport._registry_lock:
        keys = [key for key in transport._registry if any(f":{port}/" in url for url in key[1])]
        entries = [transport._registry.pop(key) for key in keys]
    for entry in entries:
        entry.manager.stop(timeout=5)


def test_fields_parse_as_on_pyamqp_before_and_after_a_failover_switch():
    ours = kombu.Connection(FAILOVER.format(scheme="carrot+amqp"))
    plain = kombu.Connection(FAILOVER.format(scheme="pyamqp"))
    assert fields(ours) == fields(plain) == {
        "hostname": "localhost", "port": 12345, "userid": "alice", "password": "s3cret",
        "virtual_host": "jobs", "heartbeat": 3.0,
    }
    ours.maybe_switch_next()
    plain.maybe_switch_next()
    assert fields(ours) == fields(plain)
    assert (ours.hostname, ours.port, ours.userid) == ("other", 12346, "bob")
    assert ours.transport_cls == "carrot+amqp"  # the alternate keeps carrot_kombu's transport
    assert isinstance(ours.transport, transport.Transport)


@pytest.mark.parametrize("url", [
    "carrot+amqp://alice:s3cret@localhost:12345/jobs",
    FAILOVER.format(scheme="carrot+amqp"),
])
def test_celery_stats_and_as_uri_show_no_password(url):
    conn = kombu.Connection(url)
    shown = [repr(stats_view(conn)), conn.as_uri(), repr(conn)]
    conn.maybe_switch_next()
    shown += [repr(stats_view(conn)), conn.as_uri(), repr(conn)]
    for text in shown:
        assert "s3cret" not in text and "pa55" not in text, text
    assert stats_view(kombu.Connection(url))["hostname"] == "localhost"
    assert kombu.Connection(url).as_uri().startswith("carrot+amqp://alice:**@localhost:12345/jobs")


def test_a_single_url_keeps_its_query_for_the_manager_and_across_clone(closed_port):
    conn = kombu.Connection(f"carrot+amqp://alice:s3cret@127.0.0.1:{closed_port}/jobs?heartbeat=0&channel_max=300")
    clone = conn.clone()
    assert fields(clone) == fields(conn)
    assert transport._key(clone) == transport._key(conn)  # one manager for both, as before
    endpoint = transport.manager_for_connection(clone).settings.endpoints[0]
    assert (endpoint.host, endpoint.port, endpoint.userid, endpoint.password, endpoint.virtual_host) == (
        "127.0.0.1", closed_port, "alice", "s3cret", "jobs")
    assert (endpoint.heartbeat, endpoint.channel_max) == (0, 300)


def test_an_explicit_transport_with_an_amqp_url_parses_too():
    conn = kombu.Connection("amqp://alice:s3cret@localhost:12345/jobs", transport="carrot_kombu.transport:Transport")
    assert (conn.hostname, conn.port, conn.userid, conn.virtual_host) == ("localhost", 12345, "alice", "jobs")
    assert "s3cret" not in repr(stats_view(conn))
    assert conn.as_uri() == "carrot+amqp://alice:**@localhost:12345/jobs"


def test_amqps_turns_tls_on():
    conn = kombu.Connection("carrot+amqps://alice:s3cret@localhost/jobs")
    assert conn.ssl is True and conn.port is None
    assert conn.info()["port"] == 5671


def test_other_transports_are_left_as_kombu_makes_them():
    plain = kombu.Connection("pyamqp://alice:s3cret@localhost:12345/jobs")
    assert plain.alt == [] and plain.transport_cls == "pyamqp"
    prefixed = kombu.Connection("sqla+mysql://alice:s3cret@localhost/db")  # not resolved: nothing imported
    assert prefixed.hostname == "mysql://alice:s3cret@localhost/db" and prefixed.port is None


# -- heartbeat 0 means off, as in kombu -----------------------------------------------------------


def test_transport_option_heartbeat_0_turns_heartbeats_off(closed_port):
    conn = kombu.Connection(f"carrot+amqp://guest:guest@127.0.0.1:{closed_port}//",
                            transport_options={"heartbeat": 0})
    assert transport.manager_for_connection(conn).settings.endpoints[0].heartbeat == 0


@pytest.fixture
def celery_app() -> Iterator[Any]:
    celery = pytest.importorskip("celery")
    previous = celery.current_app._get_current_object()
    app = celery.Celery("heartbeat-test", set_as_current=True)
    try:
        yield app
    finally:
        previous.set_current()


def test_celery_broker_heartbeat_0_turns_heartbeats_off(closed_port, celery_app):
    celery_app.conf.broker_heartbeat = 0
    url = f"carrot+amqp://guest:guest@127.0.0.1:{closed_port}//"
    conn = kombu.Connection(url)  # what Celery's producer connections look like: no heartbeat of their own
    assert transport.manager_for_connection(conn).settings.endpoints[0].heartbeat == 0
    manager = ConnectionManager.from_celery(celery_app, url)
    assert manager.settings.endpoints[0].heartbeat == 0


def test_celery_default_broker_heartbeat_is_not_a_choice(closed_port, celery_app):
    conn = kombu.Connection(f"carrot+amqp://guest:guest@127.0.0.1:{closed_port}//", heartbeat=120)
    assert transport.manager_for_connection(conn).settings.endpoints[0].heartbeat == 10
