"""``carrot+amqp://`` on the shared broker: heartbeat 0 is negotiated as 0, and ``info()`` shows no password.

The broker says what was negotiated: ``rabbitmqctl list_connections
peer_port timeout`` (``timeout`` is the connection's heartbeat in seconds).
"""

from __future__ import annotations

import socket
from typing import Any, Iterator

import kombu
import pytest
from kombu.utils.url import maybe_sanitize_url

import carrot_kombu  # noqa: F401 - registers the carrot+amqp:// transport
from carrot_kombu import transport

from .broker import rabbitmqctl


def _retire(conn: kombu.Connection) -> None:
    """Stop and forget the process's manager of ``conn`` (this test's settings only)."""
    key = transport._key(conn)
    with transport._registry_lock:
        entry = transport._registry.pop(key, None)
    if entry is not None:
        entry.manager.stop(timeout=10)


def _broker_heartbeat(conn: kombu.Connection) -> int:
    """The heartbeat the broker negotiated for ``conn``'s AMQP connection."""
    port = conn.connection.sock.getsockname()[1]
    out = rabbitmqctl("list_connections", "peer_port", "timeout", "-q", "--no-table-headers")
    for line in out.splitlines():
        peer_port, _, timeout = line.partition("\t")
        if peer_port.strip() == str(port):
            return int(timeout)
    raise AssertionError(f"the broker lists no connection from port {port}:\n{out}")


@pytest.fixture
def connect(amqp_url: str) -> Iterator[Any]:
    made: list[kombu.Connection] = []

    def make(url: str = "", **kwargs: Any) -> kombu.Connection:
        conn = kombu.Connection(url or f"carrot+{amqp_url}", connect_timeout=10, **kwargs)
        made.append(conn)
        conn.ensure_connection(max_retries=3)
        return conn

    yield make
    for conn in made:
        conn.release()
        _retire(conn)


def test_transport_option_heartbeat_0_is_negotiated_as_0(connect):
    conn = connect(transport_options={"heartbeat": 0, "pool_limit": 11})  # pool_limit: a manager of its own
    assert conn.connection.heartbeat == 0
    assert _broker_heartbeat(conn) == 0


def test_celery_broker_heartbeat_0_is_negotiated_as_0(connect):
    celery = pytest.importorskip("celery")
    previous = celery.current_app._get_current_object()
    app = celery.Celery("heartbeat-0", set_as_current=True)
    app.conf.broker_heartbeat = 0
    try:
        conn = connect(transport_options={"pool_limit": 12})
        assert conn.connection.heartbeat == 0
        assert _broker_heartbeat(conn) == 0
    finally:
        previous.set_current()


def test_without_a_choice_the_heartbeat_is_10s(connect):
    conn = connect(transport_options={"pool_limit": 13})
    assert _broker_heartbeat(conn) == 10


def test_info_as_celery_stats_shows_it_has_no_password_after_failover(connect, amqp_url):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    conn = connect(f"carrot+amqp://alice:s3cret@127.0.0.1:{dead}//;carrot+{amqp_url}",
                   transport_options={"pool_limit": 14, "backoff": {"min": 0.05, "max": 0.1}})
    live = kombu.Connection(amqp_url)
    assert (conn.hostname, conn.port) == (live.hostname, live.port)  # on the live broker now
    params = conn.info()
    params.pop("password")  # what celery.worker.consumer.connection.Connection.info() does
    params["alternates"] = [maybe_sanitize_url(u) for u in params["alternates"]]
    for text in (repr(params), conn.as_uri(), repr(conn)):
        assert "s3cret" not in text, text
