"""Helpers that look at (never reconfigure) the shared broker through rabbitmqctl."""

from __future__ import annotations

import subprocess
import time
import uuid
from typing import Any, Optional


def rabbitmqctl(*args: str, timeout: float = 30) -> str:
    result = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=True
    )
    return result.stdout


def unique(prefix: str = "ck") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def connection_pids(connection_name: str) -> list[str]:
    """Erlang pids of the broker's connections with this client ``connection_name``."""
    out = rabbitmqctl("list_connections", "pid", "client_properties", "-q", "--no-table-headers")
    needle = f'{{"connection_name","{connection_name}"}}'
    return [line.split("\t", 1)[0] for line in out.splitlines() if needle in line]


def channel_count(connection_pid: str) -> int:
    out = rabbitmqctl("list_channels", "connection", "-q", "--no-table-headers")
    return sum(1 for line in out.splitlines() if line.strip() == connection_pid)


def close_connection(connection_name: str, reason: str = "test forced close") -> Optional[str]:
    pids = connection_pids(connection_name)
    assert len(pids) == 1, f"expected one connection named {connection_name}, got {pids}"
    rabbitmqctl("close_connection", pids[0], reason)
    return pids[0]


def drain(lease: Any, queue: str, expected: int, timeout: float = 10.0) -> list[bytes]:
    """Get messages until ``expected`` arrived or ``timeout`` (publishes are asynchronous)."""
    bodies: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(bodies) < expected and time.monotonic() < deadline:
        message = lease.basic_get(queue, no_ack=True)
        if message is None:
            time.sleep(0.02)
            continue
        bodies.append(message.body)
    return bodies


def drain_until(manager: Any, done: Any, timeout: float = 10.0, swallow: tuple[type[BaseException], ...] = ()) -> bool:
    """Run kombu callbacks of leases in this thread (``manager.drain_events``) until ``done()``."""
    import socket
    import time

    deadline = time.monotonic() + timeout
    while not done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            manager.drain_events(timeout=min(remaining, 0.5))
        except socket.timeout:
            pass
        except swallow:
            pass
    return True
