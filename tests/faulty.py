"""A fault-injecting kombu transport for unit tests: ``faulty://`` (memory + faults).

Tests drive it through :data:`FAULTS`: refuse attempts, fail them fatally,
hold an attempt open, or cut the live connection.  Every attempt and every
established connection is recorded so tests can wait on them with deadlines.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from amqp.exceptions import AccessRefused
from kombu.transport import TRANSPORT_ALIASES, memory


class Faults:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Condition()
        self.attempts: list[str] = []  # hostnames, in order
        self.refuse = 0  # refuse this many next attempts (-1: all)
        self.refuse_hosts: set[str] = set()
        self.fatal = False
        self.gate: Optional[threading.Event] = None  # attempts wait on it
        self.gate_once = False  # only the next attempt waits on the gate
        self.cut_count = 0  # connections to kill (each cut kills the live one)
        self.connections = 0

    def cut(self) -> None:
        with self.lock:
            self.cut_count += 1

    def wait_attempts(self, n: int, timeout: float = 5.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: len(self.attempts) >= n, timeout)


FAULTS = Faults()


class FaultyTransport(memory.Transport):
    def establish_connection(self) -> Any:
        host = self.client.hostname
        with FAULTS.lock:
            FAULTS.attempts.append(host)
            FAULTS.lock.notify_all()
            gate = FAULTS.gate
            if FAULTS.gate_once:
                FAULTS.gate = None
            refuse = FAULTS.refuse != 0 or host in FAULTS.refuse_hosts
            if FAULTS.refuse > 0 and host not in FAULTS.refuse_hosts:
                FAULTS.refuse -= 1
            fatal = FAULTS.fatal
        if gate is not None:
            gate.wait(10)
        if fatal:
            raise AccessRefused("ACCESS_REFUSED - Login was refused", (10, 11), 403)
        if refuse:
            raise ConnectionRefusedError(111, "Connection refused (injected)")
        conn = super().establish_connection()
        with FAULTS.lock:
            FAULTS.connections += 1
            self._cuts_seen = FAULTS.cut_count
        return conn

    def heartbeat_check(self, connection: Any, rate: int = 2) -> None:
        with FAULTS.lock:
            if FAULTS.cut_count > getattr(self, "_cuts_seen", 0):
                self._cuts_seen = FAULTS.cut_count
                raise ConnectionResetError(104, "Connection reset by peer (injected)")


TRANSPORT_ALIASES["faulty"] = lambda: FaultyTransport  # type: ignore[assignment]
