"""The fake broker (tests/fakebroker.py), proven against plain py-amqp.

Every test starts its own broker on an ephemeral port and must leave no
thread and no file descriptor behind (see the ``no_leaks`` fixture).
"""

from __future__ import annotations

import gc
import os
import socket
import ssl
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import amqp
import pytest
from amqp import spec
from amqp.exceptions import (
    AccessRefused,
    ConnectionForced,
    MessageNacked,
    NotFound,
    RecoverableChannelError,
    RecoverableConnectionError,
)
from amqp.transport import TCPTransport

from .fakebroker import (
    PROTOCOL_HEADER,
    FakeBroker,
    FakeBrokerError,
    PeerClosed,
    WaitTimeout,
    encode_frames,
    method_spec,
)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _fake_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("fakebroker-")]


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Each test leaves no fake-broker thread and no file descriptor behind."""
    before = _fds()
    yield
    deadline = time.monotonic() + 2
    while _fake_threads() or _fds() > before:
        if time.monotonic() > deadline:
            break
        gc.collect()  # a py-amqp object cycle may still hold a closed socket object
        time.sleep(0.01)
    assert _fake_threads() == []
    assert _fds() <= before, "file descriptors leaked"


@pytest.fixture
def make_broker() -> Iterator[Callable[..., FakeBroker]]:
    brokers: list[FakeBroker] = []

    def make(**kwargs: Any) -> FakeBroker:
        broker = FakeBroker(**kwargs).start()
        brokers.append(broker)
        return broker

    yield make
    for broker in brokers:
        broker.stop()


@pytest.fixture
def connect() -> Iterator[Callable[..., amqp.Connection]]:
    """Open py-amqp connections; whatever state they end in, their sockets are closed."""
    conns: list[amqp.Connection] = []

    def open_(broker: FakeBroker, cls: type = amqp.Connection, host: Optional[str] = None,
              start: bool = True, **kwargs: Any) -> amqp.Connection:
        kwargs.setdefault("connect_timeout", 5)
        conn = cls(host=host or f"127.0.0.1:{broker.port}", **kwargs)
        conns.append(conn)
        if start:
            conn.connect()
        return conn

    yield open_
    for conn in conns:
        conn.collect()


def drain_until(conn: amqp.Connection, predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        remaining = deadline - time.monotonic()
        assert remaining > 0, "client did not see it in time"
        try:
            conn.drain_events(timeout=min(remaining, 0.2))
        except socket.timeout:
            pass


# -- encoding -------------------------------------------------------------------


def test_method_names_are_forgiving() -> None:
    assert method_spec("basic.consume-ok").sig == spec.Basic.ConsumeOk
    assert method_spec("Basic.ConsumeOk") is method_spec("basic.consume_ok") is method_spec((60, 21))
    with pytest.raises(ValueError):
        method_spec("basic.teleport")


def test_encode_frames_splits_content_per_frame_max() -> None:
    body = os.urandom(300 * 1024)
    data = encode_frames(1, "basic.deliver", "ctag", 7, False, "ex", "rk", body=body,
                         properties={"content_type": "application/octet-stream"}, frame_limit=8192)
    frames, pos = [], 0
    while pos < len(data):
        ftype, channel, size = struct.unpack_from(">BHI", data, pos)
        assert data[pos + 7 + size] == 0xCE and channel == 1
        frames.append((ftype, data[pos + 7:pos + 7 + size]))
        pos += 8 + size
    assert [t for t, _ in frames[:2]] == [1, 2]
    assert all(t == 3 and 8 + len(p) <= 8192 for t, p in frames[2:])
    assert len(frames) - 2 == -(-len(body) // (8192 - 8))
    assert b"".join(p for _, p in frames[2:]) == body


# -- handshake ------------------------------------------------------------------


def test_handshake_negotiates_tune(make_broker, connect) -> None:
    broker = make_broker(channel_max=100, frame_max=8192, heartbeat=30)
    assert broker.url == f"amqp://guest:guest@127.0.0.1:{broker.port}//"
    conn = connect(broker, heartbeat=10)
    peer = broker.accept().wait_open()

    assert peer.tune_ok == (100, 8192, 10)
    assert (conn.channel_max, conn.frame_max, conn.heartbeat) == (100, 8192, 10)
    assert conn.server_properties["product"] == "RabbitMQ"
    assert conn.server_properties["version"] == "3.10.8"
    caps = conn.server_capabilities
    for cap in ("publisher_confirms", "consumer_cancel_notify", "connection.blocked", "basic.nack",
                "authentication_failure_close"):
        assert caps[cap] is True
    assert peer.login == ("AMQPLAIN", "guest", "guest")
    assert peer.virtual_host == "/"
    assert peer.start_ok[0]["capabilities"]["connection.blocked"] is True
    assert [m.name for m in peer.methods] == ["connection.start-ok", "connection.tune-ok", "connection.open"]
    assert "open" in repr(peer) and "127.0.0.1" in repr(peer)

    conn.close()
    assert peer.wait_closed() == "closed"
    assert peer.close_received == (0, "")


@pytest.mark.parametrize("step", ["start", "tune", "open-ok"])
def test_silent_handshake_step_times_the_client_out(make_broker, connect, step: str) -> None:
    broker = make_broker(silent_at=step)
    with pytest.raises(socket.timeout):
        connect(broker, connect_timeout=0.3)
    peer = broker.accept()
    expected = {"start": [], "tune": ["connection.start-ok"],
                "open-ok": ["connection.start-ok", "connection.tune-ok", "connection.open"]}[step]
    assert peer.wait_closed() == "eof"  # the client gave up
    assert [m.name for m in peer.methods] == expected


def test_refused_login(make_broker, connect) -> None:
    broker = make_broker(refuse_login=True)
    with pytest.raises(AccessRefused) as info:
        connect(broker, login_method="PLAIN", password="wrong")
    assert info.value.reply_code == 403
    peer = broker.accept()
    assert peer.login == ("PLAIN", "guest", "wrong")
    assert peer.wait_closed() == "closed"  # the client answered close with close-ok


# -- channels, declares, publish and confirms ----------------------------------------


def test_channel_open_close_and_queue_declare(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    assert peer.channels == [ch.channel_id]

    name, messages, consumers = ch.queue_declare("", exclusive=True)
    assert name.startswith("amq.gen-") and (messages, consumers) == (0, 0)
    assert ch.queue_declare("named", durable=True) == ("named", 0, 0)
    ch.exchange_declare("ex", "topic")
    ch.queue_bind("named", "ex", "rk.#")
    ch.basic_qos(0, 10, False)

    declare = peer.expect("queue.declare")
    assert declare["queue"] == "" and declare["exclusive"] is True
    assert peer.expect("queue.declare")["durable"] is True
    assert peer.expect("queue.bind").fields["routing_key"] == "rk.#"
    assert peer.expect("basic.qos")["prefetch_count"] == 10

    ch.close()
    assert peer.channels == []
    assert [(m.channel, m.name) for m in peer.received(channel=1)] == [
        (1, "channel.open"), (1, "queue.declare"), (1, "queue.declare"), (1, "exchange.declare"),
        (1, "queue.bind"), (1, "basic.qos"), (1, "channel.close"),
    ]
    conn.close()


def test_publish_with_confirms_is_recorded_and_acked(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker, confirm_publish=True)
    peer = broker.accept()
    ch = conn.channel()
    msg = amqp.Message(b"hello", content_type="text/plain", application_headers={"n": 1}, delivery_mode=2)
    ch.basic_publish(msg, exchange="ex", routing_key="rk")  # returns once the ack is in
    ch.basic_publish(amqp.Message(b""), exchange="", routing_key="q", mandatory=True)

    first, second = peer.published
    assert (first.channel, first.exchange, first.routing_key, first.body) == (1, "ex", "rk", b"hello")
    assert first.properties == {"content_type": "text/plain", "application_headers": {"n": 1}, "delivery_mode": 2}
    assert (first.delivery_tag, second.delivery_tag) == (1, 2)
    assert second.body == b"" and second.mandatory is True
    assert peer.pending_confirms(1) == []
    publish = peer.expect("basic.publish")
    assert publish["routing_key"] == "rk" and publish.content.body == b"hello"
    assert publish.content.content_type == "text/plain"
    conn.close()


def test_publish_nacked(make_broker, connect) -> None:
    broker = make_broker(confirm="nack")
    conn = connect(broker, confirm_publish=True)
    ch = conn.channel()
    with pytest.raises(MessageNacked):
        ch.basic_publish(amqp.Message(b"x"), routing_key="q")
    assert broker.accept().published[0].delivery_tag == 1
    conn.close()


def test_confirm_batch_delay_and_withhold(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    ch.confirm_select()
    acks: list[tuple[str, int, bool]] = []
    ch.events["basic_ack"].add(lambda tag, multiple: acks.append(("ack", tag, multiple)))
    ch.events["basic_nack"].add(lambda tag, multiple: acks.append(("nack", tag, multiple)))

    peer.set_confirms("ack", batch=3)  # one multiple ack per three publishes
    for _ in range(3):
        ch.basic_publish(amqp.Message(b"b"), routing_key="q")
    drain_until(conn, lambda: acks)
    assert acks == [("ack", 3, True)]

    peer.set_confirms(None)  # withhold
    ch.basic_publish(amqp.Message(b"w"), routing_key="q")
    ch.basic_publish(amqp.Message(b"w"), routing_key="q")
    peer.wait_for(lambda: peer.pending_confirms(1) == [4, 5])
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=0.2)
    peer.confirm(1, 4)
    assert peer.release_confirms(nack=True) == 1
    drain_until(conn, lambda: len(acks) == 3)
    assert acks[1:] == [("ack", 4, False), ("nack", 5, False)]

    peer.set_confirms("ack", delay=0.3)
    started = time.monotonic()
    ch.basic_publish(amqp.Message(b"d"), routing_key="q")
    drain_until(conn, lambda: len(acks) == 4)
    assert acks[3] == ("ack", 6, False) and time.monotonic() - started >= 0.25
    conn.close()


def test_manual_answer_scripted_by_the_test(make_broker, connect) -> None:
    broker = make_broker(manual={"queue.declare"})
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    with ThreadPoolExecutor(1) as pool:
        declared = pool.submit(ch.queue_declare, "jobs", passive=True)
        m = peer.expect("queue.declare", channel=ch.channel_id)
        assert m["queue"] == "jobs" and m["passive"] is True
        with pytest.raises(WaitTimeout):
            peer.expect("queue.declare", timeout=0.05)  # each method is expected once
        peer.send_method(m.channel, "queue.declare-ok", "jobs", message_count=5, consumer_count=1)
        assert declared.result(timeout=5) == ("jobs", 5, 1)
    conn.close()
    with pytest.raises(PeerClosed):
        peer.expect("basic.publish", timeout=5)  # closed: fails at once rather than waiting


def test_handler_replaces_the_answer_and_its_errors_surface(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    peer.on("basic.qos", lambda p, m: p.send_method(m.channel, "basic.qos-ok"))
    ch.basic_qos(0, 5, False)
    peer.on("basic.qos", lambda p, m: 1 / 0)  # a bug in a test's handler...
    with pytest.raises(OSError):
        ch.basic_qos(0, 6, False)  # ...drops the connection...
    assert peer.wait_closed() == "error"
    with pytest.raises(FakeBrokerError) as info:
        broker.stop()  # ...and is raised when the broker stops
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- consume and deliver -----------------------------------------------------------


def test_consume_and_deliver_300k_over_frame_max_8192(make_broker, connect) -> None:
    broker = make_broker(frame_max=8192)
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    received: list[amqp.Message] = []
    tag = ch.basic_consume("q", callback=received.append)
    assert peer.consumers(ch.channel_id) == [tag] and tag.startswith("amq.ctag-")

    body = os.urandom(300 * 1024)
    props = {"content_type": "application/octet-stream", "application_headers": {"k": "v"}}
    peer.wait_flushed()
    sent_before = peer.bytes_sent
    delivery_tag = peer.deliver(ch.channel_id, tag, body=body, exchange="ex", routing_key="rk",
                                properties=props, wait=None)  # the client is not reading yet
    drain_until(conn, lambda: received)
    peer.wait_flushed()
    # on the wire: one method frame, one header frame, 38 body frames of <= 8192 bytes
    assert peer.bytes_sent - sent_before == len(encode_frames(
        1, "basic.deliver", tag, 1, False, "ex", "rk", body=body, properties=props, frame_limit=8192))
    msg = received[0]
    assert msg.body == body and delivery_tag == 1
    assert msg.delivery_info["delivery_tag"] == 1 and msg.delivery_info["routing_key"] == "rk"
    assert msg.properties["application_headers"] == {"k": "v"}

    # and the other way: the client splits a big publish, the broker reassembles it
    ch.basic_publish(amqp.Message(body), routing_key="back")
    peer.wait_for(lambda: peer.published)
    assert peer.published[0].body == body and peer.protocol_errors == []

    ch.basic_cancel(tag)
    assert peer.consumers(ch.channel_id) == []
    conn.close()


# -- heartbeats, blocked, broker-initiated closes -------------------------------------------


def test_heartbeats_both_ways(make_broker, connect) -> None:
    broker = make_broker(heartbeat=1)
    conn = connect(broker, heartbeat=1)
    peer = broker.accept()
    assert peer.heartbeat == 1
    frames_before = conn.bytes_recv
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        conn.heartbeat_tick()  # sends ours every 0.5 s; raises if the broker's stop coming
        try:
            conn.drain_events(timeout=0.1)
        except socket.timeout:
            pass
    assert len(peer.heartbeats_sent) >= 2
    assert conn.bytes_recv - frames_before >= 2  # heartbeat frames reached the client
    assert len(peer.heartbeats) >= 3
    assert all(b - a > 0.2 for a, b in zip(peer.heartbeats, peer.heartbeats[1:]))
    conn.close()


def test_silence_stops_everything_but_keeps_reading(make_broker, connect) -> None:
    broker = make_broker(heartbeat=1)
    conn = connect(broker, heartbeat=1)
    peer = broker.accept()
    ch = conn.channel()
    peer.silence()
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=0.3)
    ch.basic_publish(amqp.Message(b"into the void"), routing_key="q")
    peer.wait_for(lambda: peer.published)  # still reading
    beats = len(peer.heartbeats)
    with pytest.raises(ConnectionForced):
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            conn.heartbeat_tick()
            try:
                conn.drain_events(timeout=0.1)
            except socket.timeout:
                pass
    assert len(peer.heartbeats) > beats  # the client's heartbeats still arrive
    assert not peer.closed


@pytest.mark.parametrize("rst", [True, False])
def test_drop_breaks_the_client_read(make_broker, connect, rst: bool) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    peer.drop(rst=rst)
    assert peer.close_reason == "dropped"
    with pytest.raises(OSError) as info:
        conn.drain_events(timeout=2)
    assert not isinstance(info.value, socket.timeout)
    if rst:
        assert isinstance(info.value, ConnectionResetError)


def test_connection_blocked_reaches_on_blocked(make_broker, connect) -> None:
    class ReasonConnection(amqp.Connection):
        # py-amqp drops connection.blocked's reason; decode it to see it is on the wire.
        _METHODS = {**amqp.Connection._METHODS, spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s")}

        def _on_blocked(self, reason: str) -> None:  # type: ignore[override]
            self.on_blocked(reason)

    events: list[str] = []
    broker = make_broker()
    plain = connect(broker, on_blocked=lambda reason: events.append(f"plain:{reason}"))
    decoded = connect(broker, cls=ReasonConnection, on_blocked=lambda reason: events.append(f"decoded:{reason}"),
                      on_unblocked=lambda: events.append("unblocked"))
    first, second = broker.accept(), broker.accept()
    first.block("low on memory")
    second.block("low on memory")
    drain_until(plain, lambda: events)
    drain_until(decoded, lambda: len(events) == 2)
    second.unblock()
    drain_until(decoded, lambda: len(events) == 3)
    assert events == ["plain:connection blocked, see broker logs", "decoded:low on memory", "unblocked"]
    plain.close()
    decoded.close()


def test_broker_closes_a_channel(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    peer.close_channel(ch.channel_id, 404, "NOT_FOUND - no queue 'missing' in vhost '/'", 50, 10)
    with pytest.raises(NotFound) as info:
        ch.queue_declare("missing", passive=True)
    assert info.value.reply_code == 404 and info.value.method_sig == (50, 10)
    peer.expect("channel.close-ok", channel=1)
    assert peer.received("queue.declare")  # arrived on the closing channel, dropped unanswered
    # py-amqp revives a channel the broker closed: close-ok, then channel.open again
    assert [m.name for m in peer.received(channel=1)] == [
        "channel.open", "queue.declare", "channel.close-ok", "channel.open"]
    assert ch.is_open and peer.channels == [1]
    conn.close()


def test_broker_closes_the_connection(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    peer.close_connection(320, "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'")
    with pytest.raises(ConnectionForced):
        conn.drain_events(timeout=2)
    assert peer.wait_closed() == "closed"
    peer.expect("connection.close-ok")


def test_stop_reading_stalls_client_writes(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    peer.stop_reading()
    # after the socket buffers fill (amqp 5.4: a connection error; 5.2: a channel error)
    with pytest.raises((RecoverableConnectionError, RecoverableChannelError), match="timed out"):
        ch.basic_publish(amqp.Message(b"x" * (16 << 20)), routing_key="q", timeout=0.5)
    stalled_at = peer.bytes_received
    time.sleep(0.1)
    assert peer.bytes_received == stalled_at
    peer.resume_reading()
    peer.wait_for(lambda: peer.bytes_received > stalled_at + (1 << 20))


# -- framing errors -----------------------------------------------------------------


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed"
            data += chunk
        return data

    ftype, channel, size = struct.unpack(">BHI", exactly(7))
    payload = exactly(size + 1)[:-1]
    return ftype, channel, payload


def test_raw_client_framing_errors(make_broker) -> None:
    broker = make_broker()
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(b"AMQP\x01\x01\x00\x0a")
        assert sock.recv(8) == PROTOCOL_HEADER  # what RabbitMQ answers to a wrong protocol
        assert sock.recv(8) == b""
    assert broker.accept().close_reason == "bad-header"

    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as sock:
        sock.sendall(PROTOCOL_HEADER)
        ftype, channel, payload = _read_frame(sock)
        assert (ftype, channel, payload[:4]) == (1, 0, struct.pack(">HH", *spec.Connection.Start))
        sock.sendall(encode_frames(0, "connection.start-ok", {}, "PLAIN", "\0guest\0guest", "en_US")[:-1] + b"\x00")
        ftype, channel, payload = _read_frame(sock)
        assert payload[:4] == struct.pack(">HH", *spec.Connection.Close)
        assert sock.recv(1) == b""
    peer = broker.accept()
    assert peer.wait_closed() == "protocol-error" and peer.protocol_errors[0][0] == 501


def test_method_on_a_channel_that_is_not_open(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    conn.frame_writer(1, 5, spec.Basic.Qos, b"\0\0\0\0\0\x01\0", None)  # channel 5 never opened
    with pytest.raises(amqp.exceptions.ChannelNotOpen) as info:  # 504 is a connection error
        conn.drain_events(timeout=2)
    assert info.value.reply_code == 504
    assert peer.wait_closed() == "closed"
    assert peer.protocol_errors == [(504, "CHANNEL_ERROR - expected 'channel.open', got basic.qos")]


# -- partial frames ------------------------------------------------------------------


def _peek_raw(sock: socket.socket, expected: int, timeout: float = 5.0) -> bytes:
    """The bytes waiting in ``sock``'s kernel buffer (not consumed), once ``expected`` are there."""
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = raw.recv(expected + 65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                data = b""
            if len(data) >= expected or time.monotonic() > deadline:
                time.sleep(0.05)  # and nothing more follows
                return raw.recv(expected + 65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            time.sleep(0.01)
    finally:
        raw.close()


def test_partial_frame_leaves_the_client_waiting(make_broker, connect) -> None:
    broker = make_broker()
    conn = connect(broker)
    peer = broker.accept()
    ch = conn.channel()
    tag = ch.basic_consume("q", callback=lambda m: None)
    body = b"x" * 100_000
    keep = peer.send_partial_frame(ch.channel_id, "basic.deliver", tag, 1, False, "", "q", body=body)
    whole = encode_frames(ch.channel_id, "basic.deliver", tag, 1, False, "", "q", body=body)
    assert _peek_raw(conn.transport.sock, keep) == whole[:keep]  # exactly the first half, then nothing
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=0.3)
    with pytest.raises(Exception, match="cut mid-frame"):
        peer.send_heartbeat()
    assert not peer.closed


# -- TLS ---------------------------------------------------------------------------


def test_tls_handshake_with_the_generated_ca(make_broker, connect) -> None:
    broker = make_broker(tls=True)
    assert broker.tls_url == f"amqps://guest:guest@localhost:{broker.port}//"
    assert os.path.exists(broker.ca_path)
    conn = connect(broker, host=f"localhost:{broker.port}", ssl={
        "ca_certs": broker.ca_path, "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"})
    peer = broker.accept().wait_open()
    assert peer.tls and conn.transport.sock.version() in ("TLSv1.2", "TLSv1.3")
    ch = conn.channel()
    ch.basic_publish(amqp.Message(b"over tls"), routing_key="q")
    peer.wait_for(lambda: peer.published)
    assert peer.published[0].body == b"over tls"

    # a client that verifies by IP address works too (SAN IP:127.0.0.1)
    by_ip = connect(broker, ssl={"ca_certs": broker.ca_path, "cert_reqs": ssl.CERT_REQUIRED,
                                 "server_hostname": "127.0.0.1"})
    by_ip.close()
    conn.close()

    with pytest.raises(ssl.SSLCertVerificationError):  # and a client that does not trust it fails
        connect(broker, host=f"localhost:{broker.port}", ssl={"cert_reqs": ssl.CERT_REQUIRED,
                                                               "server_hostname": "localhost"})
    untrusting = broker.peers[-1]
    assert untrusting.wait_closed() in ("tls-error", "eof", "reset")
    ca_path = broker.ca_path
    broker.stop()
    assert not os.path.exists(ca_path)


def test_tls_silent_before_handshake(make_broker, connect) -> None:
    broker = make_broker(tls=True, silent_at="tls")
    with pytest.raises(TimeoutError):
        connect(broker, connect_timeout=0.3, ssl={"ca_certs": broker.ca_path, "server_hostname": "127.0.0.1"})
    assert broker.accept().bytes_received == 0


def test_tls_partial_frame_leaves_half_a_record(make_broker, connect) -> None:
    broker = make_broker(tls=True)
    conn = connect(broker, ssl={"ca_certs": broker.ca_path, "server_hostname": "127.0.0.1"})
    peer = broker.accept()
    ch = conn.channel()
    tag = ch.basic_consume("q", callback=lambda m: None)
    peer.wait_flushed()
    sent_before = peer.bytes_sent  # (small enough that all of it fits in the client's socket buffer)
    peer.send_partial_frame(ch.channel_id, "basic.deliver", tag, 1, False, "", "q", body=os.urandom(100 * 1024))
    ciphertext = _peek_raw(conn.transport.sock, peer.bytes_sent - sent_before)
    assert len(ciphertext) == peer.bytes_sent - sent_before
    records, pos = [], 0
    while pos + 5 <= len(ciphertext):
        assert ciphertext[pos] == 23  # TLS application data
        length = int.from_bytes(ciphertext[pos + 3:pos + 5], "big")
        records.append(min(length, len(ciphertext) - pos - 5) / length)
        pos += 5 + length
    assert len(records) >= 3 and all(r == 1 for r in records[:-1])
    assert 0 < records[-1] < 1  # the last record is cut in half
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=0.5)


# -- socketpair mode -------------------------------------------------------------------


class _GivenSocketTransport(TCPTransport):
    """A py-amqp transport over an already-connected socket."""

    given: socket.socket

    def _connect(self, host: str, port: int, timeout: Any) -> None:
        self.sock = self.given

    def _set_socket_options(self, socket_settings: Any) -> None:
        if self.sock.family != socket.AF_UNIX:
            super()._set_socket_options(socket_settings)


@pytest.mark.parametrize("tcp", [False, True])
def test_socketpair_mode(make_broker, connect, request, tcp: bool) -> None:
    broker = make_broker()
    client_sock, peer = broker.socketpair(tcp=tcp)

    class GivenSocketConnection(amqp.Connection):
        def Transport(self, host: str, connect_timeout: Any, ssl: Any = False,  # noqa: N802
                      read_timeout: Any = None, write_timeout: Any = None, **kwargs: Any) -> Any:
            transport = _GivenSocketTransport(host, connect_timeout, read_timeout=read_timeout,
                                              write_timeout=write_timeout, **kwargs)
            transport.given = client_sock
            return transport

    request.addfinalizer(client_sock.close)
    conn = connect(broker, cls=GivenSocketConnection)
    assert peer.wait_open().via == "socketpair" and broker.peers == [peer]
    ch = conn.channel()
    ch.basic_publish(amqp.Message(b"paired"), routing_key="q")
    peer.wait_for(lambda: peer.published)
    conn.close()
    assert peer.wait_closed() == "closed"
    with pytest.raises(WaitTimeout):
        broker.accept(timeout=0.05)  # socketpair peers are not "accepted"
