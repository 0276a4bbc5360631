"""Shared fixtures for the tests of the fenced py-amqp layer (``carrot_kombu/_pyamqp``).

Holds no tests itself: the ``test_pyamqp_*`` modules import the fixtures.

Every test gets a :class:`Harness` that starts fake brokers, opens
:class:`SupervisedConnection` objects and runs worker threads; at teardown it
kills the connections (which wakes every waiter), stops the brokers and joins
the workers.  ``no_leaks`` then checks that no service thread, no fake-broker
thread, no worker and no file descriptor is left behind.
"""

from __future__ import annotations

import gc
import os
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterator, Optional

import pytest

from carrot_kombu._pyamqp import ConnHooks, LinkOptions, SupervisedConnection
from carrot_kombu.exceptions import Disconnected

from .fakebroker import FakeBroker
from .support import Worker

#: Generous bound for things that normally take milliseconds.
WAIT = 5.0

_PREFIXES = ("carrot-kombu-io-", "fakebroker-", "pyamqp-test-")


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _our_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(_PREFIXES)]


def eventually(predicate: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Poll ``predicate`` until truthy (its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {what or predicate!r}")
        time.sleep(0.005)


class Hooks:
    """Records what a connection reports to its owner, with the reporting thread and time."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.lost: list[tuple[float, BaseException, str]] = []
        self.blocked: list[tuple[float, str, str]] = []
        self.unblocked: list[float] = []

    def conn_hooks(self) -> ConnHooks:
        return ConnHooks(self._on_lost, self._on_blocked, self._on_unblocked)

    def _on_lost(self, exc: BaseException) -> None:
        with self.cond:
            self.lost.append((time.monotonic(), exc, threading.current_thread().name))
            self.cond.notify_all()

    def _on_blocked(self, reason: str) -> None:
        with self.cond:
            self.blocked.append((time.monotonic(), reason, threading.current_thread().name))
            self.cond.notify_all()

    def _on_unblocked(self) -> None:
        with self.cond:
            self.unblocked.append(time.monotonic())
            self.cond.notify_all()

    def wait_lost(self, timeout: float = WAIT) -> tuple[float, BaseException, str]:
        with self.cond:
            if not self.cond.wait_for(lambda: self.lost, timeout):
                raise AssertionError(f"on_lost not called within {timeout}s")
            return self.lost[0]


class Harness:
    def __init__(self) -> None:
        self.brokers: list[FakeBroker] = []
        self.conns: list[SupervisedConnection] = []
        self.workers: list[Worker] = []

    def broker(self, **options: Any) -> FakeBroker:
        options.setdefault("heartbeat", 0)
        broker = FakeBroker(**options).start()
        self.brokers.append(broker)
        return broker

    def connection(
        self,
        broker: FakeBroker,
        *,
        reply_timeout: float = WAIT,
        blocked_timeout: Optional[float] = 2.0,
        connect: bool = True,
        **kwargs: Any,
    ) -> SupervisedConnection:
        """A SupervisedConnection to ``broker``, connected (not started) unless ``connect=False``."""
        kwargs.setdefault("heartbeat", 0)
        kwargs.setdefault("connect_timeout", WAIT)
        # What the manager's link sets: no 1 s TCP_USER_TIMEOUT (py-amqp's default) that
        # would kill a stalled socket before our own liveness checks get a say.
        kwargs.setdefault("socket_settings", {socket.TCP_USER_TIMEOUT: 0})
        kwargs.setdefault("userid", "guest")
        kwargs.setdefault("password", "guest")
        if broker.tls:
            kwargs.setdefault("ssl", {"ca_certs": broker.ca_path, "server_hostname": "127.0.0.1"})
        conn = SupervisedConnection(
            host=f"127.0.0.1:{broker.port}",
            carrot_options=LinkOptions(reply_timeout=reply_timeout, blocked_timeout=blocked_timeout),
            **kwargs,
        )
        self.conns.append(conn)
        if connect:
            conn.connect()
        return conn

    def started(self, broker: FakeBroker, name: str = "test", **kwargs: Any) -> tuple[SupervisedConnection, Hooks]:
        """A connection with its service thread running and its hooks recorded."""
        conn = self.connection(broker, **kwargs)
        hooks = Hooks()
        conn.carrot.start(hooks.conn_hooks(), name)
        return conn, hooks

    def spawn(self, fn: Callable[[], Any], name: str = "worker") -> Worker:
        worker = Worker(fn, name)
        self.workers.append(worker)
        worker.thread.start()
        return worker

    def close(self) -> None:
        errors: list[BaseException] = []
        for conn in self.conns:
            state = conn.carrot
            if state.running:
                state.fail(Disconnected("test teardown"))
                state.join(WAIT)
                service = state._service
                if service is not None and service.running():
                    errors.append(AssertionError(f"service thread {service.thread.name} still running"))
                assert state.wire is not None
                state.wire.close()
            else:
                conn.collect()  # a failed handshake: closes the socket
        for broker in self.brokers:
            try:
                broker.stop()
            except BaseException as exc:
                errors.append(exc)
        for worker in self.workers:
            worker.thread.join(WAIT)
            if worker.thread.is_alive():
                errors.append(AssertionError(f"{worker.name} still running after teardown"))
        if errors:
            raise errors[0]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Each test leaves no service/broker/worker thread and no file descriptor behind."""
    before = _fds()
    yield
    deadline = time.monotonic() + 3
    while _our_threads() or _fds() > before:
        if time.monotonic() > deadline:
            break
        gc.collect()  # a py-amqp object cycle may still hold a closed socket object
        time.sleep(0.01)
    assert _our_threads() == []
    assert _fds() <= before, "file descriptors leaked"


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    try:
        yield h
    finally:
        h.close()


def spy_dispatch(conn: SupervisedConnection) -> list[tuple[str, int, int, Optional[tuple[int, int]]]]:
    """Record (thread name, frame type, channel, method sig) of every frame the connection dispatches."""
    record: list[tuple[str, int, int, Optional[tuple[int, int]]]] = []
    original = conn.on_inbound_frame

    def spy(frame: tuple[int, int, bytes]) -> Any:
        frame_type, channel, payload = frame
        sig = struct.unpack_from(">HH", payload) if frame_type == 1 else None
        record.append((threading.current_thread().name, frame_type, channel, sig))
        return original(frame)

    conn.on_inbound_frame = spy
    return record


def parse_frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """Cut a client byte stream into (type, channel, payload) frames, checking every frame end."""
    frames, pos = [], 0
    while pos < len(data):
        frame_type, channel, size = struct.unpack_from(">BHI", data, pos)
        assert data[pos + 7 + size] == 0xCE, f"bad frame end at {pos}"
        frames.append((frame_type, channel, data[pos + 7:pos + 7 + size]))
        pos += 8 + size
    return frames
