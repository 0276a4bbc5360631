"""A TCP fault proxy between a client and a broker (stdlib only).

Controls, each taking effect at once:

* :meth:`FaultProxy.cut` resets every current connection (RST both ways);
* :meth:`FaultProxy.blackhole` stops forwarding both ways but keeps the
  sockets open: the silent dead peer;
* :meth:`FaultProxy.refuse` makes new connections fail (the listening socket
  is closed, so connects get ``ECONNREFUSED``);
* :meth:`FaultProxy.latency` delays every forwarded chunk;
* :meth:`FaultProxy.blackhole_after` forwards exactly N more bytes from the
  broker, then black-holes: a stream cut in the middle of a frame (or of a
  TLS record), the half record of ../shared/BROKER.md;
* :meth:`FaultProxy.heal` undoes blackhole, refuse and latency.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from typing import Optional


class FaultProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._blackholed = threading.Event()
        self._latency = 0.0
        self._budget: Optional[int] = None  # bytes still forwarded downstream before blackhole_after trips
        self.tripped = threading.Event()
        self.tripped_at: Optional[float] = None
        self._closed = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._listener: Optional[socket.socket] = None
        self.port = listen_port
        self.accepted = 0
        self._listen()
        self._accepter: Optional[threading.Thread] = None
        self._start_accepting()

    @property
    def url_hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "/") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/{vhost.replace('/', '%2F') if vhost != '/' else '/'}"

    # -- controls -------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every current connection; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        return len(pairs)

    def blackhole(self) -> None:
        self._blackholed.set()

    def refuse(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._accepter is not None:
            self._accepter.join(5)

    def latency(self, seconds: float) -> None:
        self._latency = seconds

    def blackhole_after(self, nbytes: int) -> threading.Event:
        """Forward ``nbytes`` more bytes from the broker to the client, then black-hole both ways.

        The cut falls at that exact offset of the broker's stream, whatever
        it carries (half a frame, half a TLS record).  Returns :attr:`tripped`,
        set once the black hole is in place (:attr:`tripped_at` is its
        ``time.monotonic()``).
        """
        if nbytes < 0:
            raise ValueError("nbytes must be >= 0")
        with self._lock:
            self.tripped.clear()
            self.tripped_at = None
            self._budget = nbytes
        return self.tripped

    def heal(self) -> None:
        self._blackholed.clear()
        self._latency = 0.0
        with self._lock:
            self._budget = None
            refused = self._listener is None
        if refused and not self._closed.is_set():
            self._listen()
            self._start_accepting()

    def connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until no pump thread of a closed connection is left (for resource counts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                self._pumps = [t for t in self._pumps if t.is_alive()]
                if len(self._pumps) == len(self._pairs):
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._closed.set()
        self.refuse()
        self.cut()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- machinery ----------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener

    def _start_accepting(self) -> None:
        self._accepter = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while True:
            with self._lock:
                listener = self._listener
            if listener is None:
                return
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            for sock in (client, upstream):
                # without it Nagle + delayed ACKs add ~40 ms to small exchanges
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._pairs.append((client, upstream))
                self.accepted += 1
            pump = threading.Thread(target=self._pump, args=(client, upstream), name="fault-proxy-pump", daemon=True)
            with self._lock:
                self._pumps.append(pump)
            pump.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        peer = {client: upstream, upstream: client}
        try:
            sel.register(client, selectors.EVENT_READ)
            sel.register(upstream, selectors.EVENT_READ)
            while True:
                if self._blackholed.is_set():
                    # forward nothing, read nothing: the peer goes silent
                    if self._closed.wait(0.05) or not self._alive(client):
                        return
                    continue
                for key, _ in sel.select(timeout=0.1):
                    src = key.fileobj
                    assert isinstance(src, socket.socket)
                    data = src.recv(65536)
                    if not data:
                        return
                    tripped = False
                    if src is upstream:
                        data, tripped = self._spend(data)
                    if self._latency:
                        time.sleep(self._latency)
                    peer[src].sendall(data)
                    if tripped:
                        self.tripped_at = time.monotonic()
                        self.tripped.set()
                        break
                if not self._alive(client):
                    return
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            for sock in (client, upstream):
                try:
                    sock.close()
                except OSError:
                    pass

    def _spend(self, data: bytes) -> tuple[bytes, bool]:
        """What of ``data`` (broker to client) still goes out under :meth:`blackhole_after`; True when it trips."""
        with self._lock:
            budget = self._budget
            if budget is None:
                return data, False
            if len(data) < budget:
                self._budget = budget - len(data)
                return data, False
            self._budget = None
            self._blackholed.set()  # every pump stops before this one sends the last piece
            return data[:budget], True

    def _alive(self, client: socket.socket) -> bool:
        with self._lock:
            return any(c is client for c, _ in self._pairs)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets RST, not a polite FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
