"""The fault proxy itself, against a local echo server."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from .proxy import FaultProxy


@pytest.fixture
def echo_port():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve(conn):
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def accept():
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def client(proxy, timeout=2.0):
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)


def test_forwards_both_ways(echo_port):
    with FaultProxy("127.0.0.1", echo_port) as proxy, client(proxy) as c:
        c.sendall(b"hello")
        assert c.recv(100) == b"hello"
        assert proxy.connections() == 1


def test_cut_resets_current_connections_only(echo_port):
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        c = client(proxy)
        c.sendall(b"x")
        assert c.recv(10) == b"x"
        assert proxy.cut() == 1
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            c.sendall(b"y" * 100)
            assert c.recv(10) == b""  # never reached with an RST
        c.close()
        with client(proxy) as again:  # new connections still work
            again.sendall(b"z")
            assert again.recv(10) == b"z"


def test_blackhole_goes_silent_and_heal_resumes(echo_port):
    with FaultProxy("127.0.0.1", echo_port) as proxy, client(proxy, timeout=0.3) as c:
        proxy.blackhole()
        c.sendall(b"lost?")
        with pytest.raises(socket.timeout):
            c.recv(10)
        proxy.heal()
        c.settimeout(2)
        assert c.recv(10) == b"lost?"  # the socket stayed open: data flows again


def test_refuse_and_heal(echo_port):
    with FaultProxy("127.0.0.1", echo_port) as proxy:
        proxy.refuse()
        with pytest.raises(ConnectionRefusedError):
            client(proxy)
        proxy.heal()
        with client(proxy) as c:
            c.sendall(b"ok")
            assert c.recv(10) == b"ok"


def test_latency_delays_traffic(echo_port):
    with FaultProxy("127.0.0.1", echo_port) as proxy, client(proxy) as c:
        proxy.latency(0.2)
        started = time.monotonic()
        c.sendall(b"slow")
        assert c.recv(10) == b"slow"
        assert time.monotonic() - started >= 0.4  # one delay each way
        proxy.heal()
