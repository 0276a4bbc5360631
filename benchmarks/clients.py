"""Connections, managers and scratch queues for the benchmarks.

Every queue is uniquely named, expires on the broker after 30 idle minutes
even if the run dies, and is deleted at the end; nothing else on the shared
broker is touched.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import amqp
import kombu
from amqp.exceptions import AMQPError

from carrot_kombu import CarrotKombuError, ConnectionManager
from integration.broker import unique

#: Safety net: the broker drops a scratch queue left behind by a killed run.
QUEUE_EXPIRES_MS = 30 * 60 * 1000
#: Errors a lease may raise while the connection is down or being replaced.
RECOVERABLE = (CarrotKombuError, AMQPError, OSError)


def endpoint(url: str) -> dict[str, Any]:
    """Host, port, credentials and vhost of ``url``, kombu's way."""
    conn = kombu.Connection(url)
    return {
        "hostname": conn.hostname or "127.0.0.1",
        "port": conn.port or 5672,
        "userid": conn.userid or "guest",
        "password": conn.password or "guest",
        "virtual_host": conn.virtual_host or "/",
    }


def raw_connection(url: str, name: str = "") -> amqp.Connection:
    """A connected raw py-amqp connection (py-amqp defaults: no heartbeat).

    Args:
        url: Broker URL.
        name: ``connection_name`` client property (default: a unique one).
    """
    ep = endpoint(url)
    conn = amqp.Connection(
        host=f"{ep['hostname']}:{ep['port']}", userid=ep["userid"], password=ep["password"],
        virtual_host=ep["virtual_host"], client_properties={"connection_name": name or unique("ck-bench-raw")},
    )
    conn.connect()
    return conn


@contextmanager
def raw(url: str) -> Iterator[amqp.Connection]:
    """``with raw(url) as conn:`` a raw py-amqp connection, closed on exit."""
    conn = raw_connection(url)
    try:
        yield conn
    finally:
        try:
            conn.close()
        except Exception:
            conn.collect()


@contextmanager
def started(url: str, **options: Any) -> Iterator[tuple[ConnectionManager, str]]:
    """A started, connected manager with a unique ``connection_name``; stopped on exit.

    Yields:
        The manager and its ``connection_name``.

    Raises:
        RuntimeError: Not connected within 15 s.
    """
    name = unique("ck-bench")
    options.setdefault("client_properties", {"connection_name": name})
    manager = ConnectionManager(url, **options).start()
    try:
        if not manager.wait_connected(15):
            raise RuntimeError(f"manager did not connect to {manager.status().broker}: {manager.status().last_error}")
        yield manager, name
    finally:
        manager.stop(timeout=10)


@contextmanager
def scratch_queues(url: str, count: int = 1) -> Iterator[tuple[amqp.Channel, list[str]]]:
    """Declare ``count`` unique queues; delete them on exit.

    Yields:
        An admin channel (its own raw connection: purge with it between runs)
        and the queue names.
    """
    with raw(url) as conn:
        admin = conn.channel()
        names = [unique("ck-bench-q") for _ in range(count)]
        try:
            for name in names:
                admin.queue_declare(name, arguments={"x-expires": QUEUE_EXPIRES_MS})
            yield admin, names
        finally:
            for name in names:
                try:
                    admin.queue_delete(name)
                except Exception:
                    pass  # x-expires removes it later


def lease_works(manager: ConnectionManager, queue: str) -> bool:
    """Take a lease and make one broker round trip on it; False if that failed."""
    try:
        with manager.channel(timeout=1.0) as lease:
            lease.queue_declare(queue, passive=True)
        return True
    except RECOVERABLE:
        return False


def until_lease_works(manager: ConnectionManager, queue: str, since: float, timeout: float = 30.0) -> float:
    """Poll (every ms) until a lease works; seconds since ``since`` (monotonic).

    Raises:
        TimeoutError: Still not working after ``timeout`` seconds.
    """
    deadline = since + timeout
    while not lease_works(manager, queue):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no working lease {timeout}s after the fault: {manager.status().last_error}")
        time.sleep(0.001)
    return time.monotonic() - since


def until_not_connected(manager: ConnectionManager, since: float, timeout: float, poll: float = 0.001) -> float:
    """Poll until the manager leaves ``CONNECTED``; seconds since ``since``.

    Raises:
        TimeoutError: Still connected after ``timeout`` seconds.
    """
    deadline = since + timeout
    while manager.connected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"still connected {timeout}s after the fault")
        time.sleep(poll)
    return time.monotonic() - since
