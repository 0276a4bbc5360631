"""The wire (one reader, many writers, group commit) and the frame encoder of the py-amqp layer.

Writes from many threads are group-committed; a slow peer pushes back on
writers; an exception in the middle of a flush never leaves half a frame
behind; and a value the protocol cannot carry fails in the caller, naming
the field, before a byte is written.
"""

from __future__ import annotations

import _socket
import datetime
import decimal
import errno
import os
import socket
import struct
import sys
import threading
import time

import amqp
import pytest
from amqp.exceptions import UnexpectedFrame

from carrot_kombu._pyamqp import frames as frames_module
from carrot_kombu._pyamqp import wire as wire_module
from carrot_kombu._pyamqp.frames import HEARTBEAT, FrameParser, encode_method, method_name
from carrot_kombu._pyamqp.wire import Wire, poll_readable

from .test_pyamqp_support import WAIT, eventually, harness, no_leaks  # noqa: F401


def _frame(frame_type: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", frame_type, channel, len(payload)) + payload + b"\xce"


def read_frames(wire: Wire, timeout) -> list[tuple[int, int, bytes]]:
    """What one ``Wire.read`` hands to its dispatcher."""
    got: list[tuple[int, int, bytes]] = []

    def dispatch(todo) -> None:  # the contract: each frame is removed once handled
        while todo:
            got.append(todo.popleft())

    wire.read(timeout, dispatch)
    return got


# -- the frame parser and the wire on a socket pair ----------------------------------------------


def test_the_parser_cuts_a_stream_at_any_boundary() -> None:
    stream = b"".join(_frame(3, 1, bytes([i]) * (1000 + i)) for i in range(100)) + HEARTBEAT
    parser = FrameParser(max_size=4096)
    got = []
    for start in range(0, len(stream), 777):  # arbitrary cuts, mid-header and mid-payload
        parser.feed(stream[start:start + 777])
        got += parser.frames()
    assert [len(p) for _, _, p in got[:-1]] == [1000 + i for i in range(100)]
    assert got[-1] == (8, 0, b"") and parser.buffered == 0


def test_the_parser_keeps_a_partial_frame_after_a_long_run() -> None:
    parser = FrameParser(max_size=4096)
    parser.feed(b"".join(_frame(3, 1, b"x" * 1000) for _ in range(80)) + _frame(3, 1, b"y" * 100)[:50])
    assert len(parser.frames()) == 80
    assert parser.buffered == 50
    parser.feed(_frame(3, 1, b"y" * 100)[50:])
    assert parser.frames() == [(3, 1, b"y" * 100)]


@pytest.mark.parametrize("data,message", [
    (_frame(1, 0, b"abcd")[:-1] + b"\x00", "frame_end"),
    (struct.pack(">BHI", 3, 1, 1 << 20) + b"x", "frame_max"),
])
def test_the_parser_rejects_a_stream_that_is_not_amqp(data, message) -> None:
    parser = FrameParser(max_size=131072)
    parser.feed(data)
    with pytest.raises(UnexpectedFrame, match=message):
        parser.frames()


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    wires: list[Wire] = []
    yield a, b, wires
    for w in wires:
        w.kill(OSError("test done"))
        w.close()
    a.close()
    b.close()


def test_the_wire_reads_frames_left_over_from_the_handshake_first(pair) -> None:
    a, b, wires = pair
    first, second = _frame(1, 0, b"\x00\x0a\x00\x29"), _frame(3, 1, b"z" * 300)
    wire = Wire(a, initial=first + second[:100], max_frame=4096)
    wires.append(wire)
    assert read_frames(wire, 0) == [(1, 0, b"\x00\x0a\x00\x29")]
    b.sendall(second[100:])
    assert read_frames(wire, 1) == [(3, 1, b"z" * 300)]
    started = time.monotonic()
    assert read_frames(wire, 0.1) == []
    assert 0.08 < time.monotonic() - started < 1.0
    wire.set_max_frame(100)
    b.sendall(second)
    with pytest.raises(UnexpectedFrame):
        read_frames(wire, 1)


def test_a_reader_that_waits_before_receiving_still_sees_what_was_received_already(pair, monkeypatch) -> None:
    """After a read found the socket empty, the next waits for it first: nothing already here waits with it."""
    a, b, wires = pair
    wire = Wire(a, max_frame=4096)
    wires.append(wire)
    recvs: list[int] = []
    real = wire._recv_into
    monkeypatch.setattr(wire, "_recv_into", lambda parser: recvs.append(1) or real(parser))
    assert read_frames(wire, 0.01) == []  # empty on its first try: the next read waits first
    assert recvs and wire._wait_first
    # Bytes already received but not parsed into frames (an interrupted reader's): taken at once.
    wire._rx.append(HEARTBEAT)
    started = time.monotonic()
    assert read_frames(wire, 5) == [(8, 0, b"")]
    assert time.monotonic() - started < 0.5
    # Two frames in one receive: the second is dispatched without asking the socket.
    assert read_frames(wire, 0.01) == []
    b.sendall(HEARTBEAT + _frame(3, 1, b"x"))
    got = []
    while len(got) < 2:
        got += read_frames(wire, 5)
    assert got == [(8, 0, b""), (3, 1, b"x")]
    # Waiting first costs no receive that finds nothing: a reply that comes later takes one.
    assert read_frames(wire, 0.01) == []
    threading.Timer(0.05, b.sendall, (HEARTBEAT,)).start()
    recvs.clear()
    assert read_frames(wire, 5) == [(8, 0, b"")]
    assert len(recvs) == 1
    # A wait that ends at once (the bytes were there): back to receiving first
    # ("at once" is timed: tried a few times, a preempted thread may miss it).
    for _ in range(50):
        b.sendall(HEARTBEAT)
        assert poll_readable(a, 1.0)
        assert read_frames(wire, 5) == [(8, 0, b"")]
        if not wire._wait_first:
            break
    assert not wire._wait_first


def test_the_wire_reader_is_woken_and_sees_the_end(pair) -> None:
    a, b, wires = pair
    failures: list[BaseException] = []
    wire = Wire(a, on_failed=failures.append)
    wires.append(wire)
    timer = threading.Timer(0.1, wire.wake_reader)
    timer.start()
    started = time.monotonic()
    assert read_frames(wire, None) == []  # woken, no frames
    assert time.monotonic() - started < 1.0
    timer.join()
    b.sendall(HEARTBEAT)
    assert poll_readable(a, 1.0)
    assert read_frames(wire, 1) == [(8, 0, b"")] and wire.last_rx > started
    b.close()
    with pytest.raises(OSError) as info:
        read_frames(wire, 1)
    assert info.value.errno == errno.ECONNRESET


def test_a_dead_wire_refuses_writers_and_reports_once(pair) -> None:
    a, b, wires = pair
    failures: list[BaseException] = []
    wire = Wire(a, on_failed=failures.append)
    wires.append(wire)
    wire.send([b"hello"])
    assert b.recv(5) == b"hello" and wire.pending_output == 0
    cause = ConnectionResetError("peer went away")
    wire.fail(cause)
    wire.fail(OSError("second"))
    assert failures == [cause] and wire.dead is cause
    with pytest.raises(ConnectionAbortedError) as info:
        wire.send([b"more"])
    assert info.value.__cause__ is cause
    with pytest.raises(ConnectionAbortedError):
        read_frames(wire, 0)
    wire.close()
    wire.close()
    wire.wake_reader()  # harmless after close


def test_a_reader_still_polling_keeps_the_descriptors_until_it_leaves(pair) -> None:
    """close() under a polling reader must not free descriptor numbers it still uses.

    Freed at once, the wake-up pipe's number went to the next connection's
    socket, and the late reader's drain of "its" pipe blocked on (and stole
    from) that socket's TLS handshake.
    """
    a, b, wires = pair
    wire = Wire(a)
    wires.append(wire)
    ended: list[object] = []

    def reader() -> None:
        try:
            ended.append(wire.read(WAIT, lambda todo: todo.clear()))
        except BaseException as exc:
            ended.append(exc)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    assert eventually(lambda: sys.getrefcount(wire._fds) > 2), "the reader never reached its poll"
    assert wire._fds is not None
    wake_r, wake_w = wire._fds.wake_r, wire._fds.wake_w
    wire.close()
    # still the reader's: a descriptor opened now gets another number
    r, w = os.pipe()
    try:
        assert not {r, w} & {wake_r, wake_w}
        os.fstat(wake_r)
    finally:
        os.close(r)
        os.close(w)
    wire.kill(ConnectionResetError("lost"))
    thread.join(WAIT)
    assert not thread.is_alive()
    assert ended == [False] or isinstance(ended[0], OSError), ended  # woken, or saw the loss
    with pytest.raises(OSError):
        os.fstat(wake_w)  # the last one out closed the pipe
    wire.wake_reader()  # harmless once released


def test_a_disowned_wire_leaves_the_socket_alone(pair) -> None:
    a, b, wires = pair
    wire = Wire(a)
    wires.append(wire)
    wire.disown(RuntimeError("forked"))
    with pytest.raises(ConnectionAbortedError):
        wire.send([b"x"])
    a.send(b"still open")  # the parent's socket was not shut down
    assert b.recv(10) == b"still open"


# -- group commit, back-pressure, interrupted flushes -------------------------------------------


class SendSpy:
    """Wraps the client socket's send/sendmsg: records calls, can hold or fail one."""

    def __init__(self, monkeypatch, fd: int) -> None:
        self.fd = fd
        self.calls: list[tuple[str, int, int]] = []  # (kind, buffers, bytes)
        self.hold: threading.Event | None = None
        self.held = threading.Event()
        self.script: list = []  # per call: None (pass through), int (short write), BaseException
        spy = self

        def send(sock, data, flags=0):
            return spy._send(sock, data, flags)

        def sendmsg(sock, buffers, *args):
            return spy._sendmsg(sock, buffers, *args)

        monkeypatch.setattr(socket.socket, "send", send)
        monkeypatch.setattr(socket.socket, "sendmsg", sendmsg)

    def _ours(self, sock) -> bool:
        try:
            return sock.fileno() == self.fd
        except OSError:
            return False

    def _act(self, sock, buffers: list) -> int:
        self.calls.append(("sendmsg" if len(buffers) > 1 else "send", len(buffers), sum(len(b) for b in buffers)))
        if self.hold is not None:
            hold, self.hold = self.hold, None
            self.held.set()
            assert hold.wait(WAIT)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, int):
            return _socket.socket.send(sock, b"".join(bytes(b) for b in buffers)[:step])
        if len(buffers) == 1:
            return _socket.socket.send(sock, buffers[0])
        return _socket.socket.sendmsg(sock, buffers)

    def _send(self, sock, data, flags=0):
        if not self._ours(sock):
            return _socket.socket.send(sock, data, flags)
        return self._act(sock, [data])

    def _sendmsg(self, sock, buffers, *args):
        if not self._ours(sock):
            return _socket.socket.sendmsg(sock, buffers, *args)
        return self._act(sock, list(buffers))


def test_writes_of_many_threads_are_group_committed(harness, monkeypatch) -> None:
    broker = harness.broker()
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    channels = [conn.channel() for _ in range(8)]
    spy = SendSpy(monkeypatch, conn.carrot.wire._fd)
    gate = spy.hold = threading.Event()
    first = harness.spawn(lambda: channels[0].basic_publish(amqp.Message(b"first"), routing_key="q"), "first")
    assert spy.held.wait(WAIT)  # the first writer is inside its system call
    others = [harness.spawn(lambda ch=ch, n=n: ch.basic_publish(amqp.Message(f"m{n}".encode()), routing_key="q"),
                            f"pub-{n}") for n, ch in enumerate(channels[1:], 1)]
    for worker in others:
        worker.result()  # returned at once: the first writer sends for them
    assert not first.done.is_set() and conn.carrot.wire.pending_output > 0
    gate.set()
    first.result()
    # one system call for the first publish, one for the seven queued meanwhile
    # (small batches are joined into one buffer, large ones gathered)
    assert len(spy.calls) == 2, spy.calls
    peer.wait_for(lambda: len(peer.published) == 8)
    assert sorted(p.body for p in peer.published) == sorted([b"first"] + [f"m{n}".encode() for n in range(1, 8)])
    assert peer.protocol_errors == [] and hooks.lost == []


def test_a_peer_that_stops_reading_pushes_back_on_writers(harness, monkeypatch) -> None:
    monkeypatch.setattr(wire_module, "HIGH_WATER", 256 * 1024)
    broker = harness.broker(recv_buffer=131072)
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    channels = [conn.channel() for _ in range(4)]
    peer.stop_reading()
    size, count = 64 * 1024, 40
    done = [0] * 4

    def publish(n: int) -> None:
        for i in range(count):
            channels[n].basic_publish(amqp.Message(bytes([n]) * size, message_id=str(i)), routing_key=f"r{n}")
            done[n] += 1

    workers = [harness.spawn(lambda n=n: publish(n), f"pub-{n}") for n in range(4)]
    wire = conn.carrot.wire
    eventually(lambda: wire.stalled_since is not None, what="the writes stall")
    time.sleep(0.3)
    progress = sum(done)
    peak = 0
    for _ in range(30):
        peak = max(peak, wire.pending_output)
        time.sleep(0.01)
    assert sum(done) == progress < 4 * count  # the writers wait for room...
    assert peak <= 256 * 1024 + 4 * (size + 1024)  # ...instead of queueing without bound
    peer.resume_reading()
    for worker in workers:
        worker.result(20)
    peer.wait_for(lambda: len(peer.published) == 4 * count, timeout=20)
    for n in range(4):
        mine = [p for p in peer.published if p.routing_key == f"r{n}"]
        assert [p.properties["message_id"] for p in mine] == [str(i) for i in range(count)]
        assert all(p.body == bytes([n]) * size for p in mine)
    assert peer.protocol_errors == [] and hooks.lost == []


class InterruptedWait:
    """Stands in for the wire's POLLOUT poller: the first wait is interrupted (Ctrl-C, a signal handler)."""

    def __init__(self, real) -> None:
        self.real = real
        self.armed = True

    def poll(self, timeout):
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt()
        return self.real.poll(timeout)


@pytest.mark.parametrize("completed_by", ["next-writer", "service-thread"])
def test_an_exception_in_the_middle_of_a_flush_leaves_no_half_frame(harness, monkeypatch, completed_by) -> None:
    """A big publish half sent, then interrupted while it waits for room in the socket."""
    broker = harness.broker()
    if completed_by == "service-thread":
        conn, hooks = harness.started(broker)
    else:  # no service thread: the half frame stays until the next writer comes
        conn, hooks = harness.connection(broker), None
    peer = broker.accept()
    ch, other = conn.channel(), conn.channel()
    peer.wait_flushed()
    received_before = peer.bytes_received
    spy = SendSpy(monkeypatch, conn.carrot.wire._fd)
    spy.script = [50, BlockingIOError()]  # 50 bytes (mid-frame), then the socket is full...
    monkeypatch.setattr(conn.carrot.wire, "_wpoll", InterruptedWait(conn.carrot.wire._wpoll))  # ...Ctrl-C
    body = os.urandom(100 * 1024)
    interrupted = harness.spawn(lambda: ch.basic_publish(amqp.Message(body), routing_key="first"), "interrupted")
    assert isinstance(interrupted.exception(), KeyboardInterrupt)
    peer.wait_for(lambda: peer.bytes_received >= received_before + 50)
    if completed_by == "next-writer":
        time.sleep(0.05)
        assert peer.published == [] and peer.bytes_received == received_before + 50  # half a frame so far
        assert conn.carrot.wire.pending_output > 0
        other.basic_publish(amqp.Message(b"second"), routing_key="second")
    peer.wait_for(lambda: len(peer.published) == (2 if completed_by == "next-writer" else 1), timeout=3)
    assert peer.published[0].body == body and peer.published[0].routing_key == "first"
    if completed_by == "next-writer":
        assert peer.published[1].body == b"second"
    assert peer.protocol_errors == [] and (hooks is None or hooks.lost == [])
    # (the sender accounts for the bytes just after the peer may have parsed them)
    eventually(lambda: conn.carrot.wire.pending_output == 0, what="nothing left to send")
    assert ch.carrot.reusable()  # a publish expects no reply: nothing can come to the wrong request


def test_an_exception_raised_by_the_send_call_leaves_the_stream_whole(harness, monkeypatch) -> None:
    """A send call that raises took nothing (a signal handler's exception as the call
    *returns* is raised after ``extend(map(send, ...))`` recorded what it took): the
    interrupted publish raises in its own thread, and the next flusher goes on exactly
    where the stream is, after a short write too."""
    broker = harness.broker()
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    ch, other = conn.channel(), conn.channel()
    spy = SendSpy(monkeypatch, conn.carrot.wire._fd)
    spy.script = [50, KeyboardInterrupt()]
    big = os.urandom(100 * 1024)
    interrupted = harness.spawn(lambda: ch.basic_publish(amqp.Message(big), routing_key="q"), "interrupted")
    assert isinstance(interrupted.exception(), KeyboardInterrupt)
    other.basic_publish(amqp.Message(b"next"), routing_key="q")
    peer.wait_for(lambda: len(peer.published) == 2, timeout=3, what="both messages reach the broker")
    assert [p.body for p in peer.published] == [big, b"next"]
    assert peer.protocol_errors == [] and hooks.lost == []


def test_a_publish_interrupted_right_after_queueing_does_not_wedge_the_connection(harness, monkeypatch) -> None:
    """A signal handler's exception delivered just as the frames were queued (at the next
    eval-breaker check, e.g. a ``with`` block's exit) must not stop the wire for everyone."""
    broker = harness.broker()
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    ch, other = conn.channel(), conn.channel()
    original = wire_module.Wire.enqueue
    armed = [True]

    def enqueue_then_interrupted(self, chunks, **kwargs):
        elected = original(self, chunks, **kwargs)
        if armed[0] and threading.current_thread().name == "pyamqp-test-interrupted":
            armed[0] = False
            raise KeyboardInterrupt()
        return elected

    monkeypatch.setattr(wire_module.Wire, "enqueue", enqueue_then_interrupted)
    writer = harness.spawn(lambda: ch.basic_publish(amqp.Message(b"first"), routing_key="q"), "interrupted")
    assert isinstance(writer.exception(), KeyboardInterrupt)
    other.basic_publish(amqp.Message(b"second"), routing_key="q")
    peer.wait_for(lambda: [p.body for p in peer.published][-1:] == [b"second"], timeout=3,
                  what="the next publish reaches the broker")
    assert [p.body for p in peer.published] == [b"first", b"second"]  # queued whole: sent whole
    assert peer.protocol_errors == [] and hooks.lost == []


def test_a_request_interrupted_while_being_sent_spoils_its_channel(harness, monkeypatch) -> None:
    broker = harness.broker()
    conn = harness.connection(broker)  # no service thread: the test decides who writes next
    peer = broker.accept()
    ch, other = conn.channel(), conn.channel()
    spy = SendSpy(monkeypatch, conn.carrot.wire._fd)
    spy.script = [10, BlockingIOError()]
    monkeypatch.setattr(conn.carrot.wire, "_wpoll", InterruptedWait(conn.carrot.wire._wpoll))
    request = harness.spawn(lambda: ch.queue_declare("interrupted"), "interrupted")
    assert isinstance(request.exception(), KeyboardInterrupt)
    assert ch.carrot.spoiled and not ch.carrot.reusable()  # its reply would come to nobody
    assert other.queue_declare("next").queue == "next"  # completes the half-sent request first
    assert [m["queue"] for m in peer.received("queue.declare")] == ["interrupted", "next"]
    assert peer.protocol_errors == []


# -- values the protocol cannot carry fail in the caller, naming the field ---------------------------


BAD_MESSAGES = [
    ({"application_headers": {"n": 2**64}}, ValueError, "application_headers['n']"),
    ({"application_headers": {"n": -(2**63) - 1}}, ValueError, "signed 64-bit"),
    ({"application_headers": {"s": {1, 2}}}, TypeError, "set is not an AMQP field value"),
    ({"application_headers": {"deep": {"list": [1, object()]}}}, TypeError, "application_headers['deep']['list'][1]"),
    ({"application_headers": {1: "int key"}}, TypeError, "keys must be str"),
    ({"application_headers": {"k" * 300: 1}}, ValueError, "255"),
    ({"application_headers": {"d": decimal.Decimal("1e-300")}}, ValueError, "scale"),
    ({"application_headers": {"d": decimal.Decimal(2**40)}}, ValueError, "32-bit decimal"),
    ({"application_headers": ["not", "a", "table"]}, TypeError, "application_headers must be a mapping"),
    ({"expiration": 60000}, TypeError, "expiration must be a str of milliseconds"),
    ({"priority": 300}, ValueError, "priority must be between 0 and 255"),
    ({"delivery_mode": "persistent"}, TypeError, "delivery_mode must be an int"),
    ({"timestamp": 2**65}, ValueError, "timestamp"),
    ({"content_type": 5}, TypeError, "content_type must be a str"),
    ({"correlation_id": "c" * 256}, ValueError, "correlation_id is 256 bytes long"),
]


@pytest.mark.parametrize("props,error,text", BAD_MESSAGES, ids=[t for _, _, t in BAD_MESSAGES])
def test_a_property_the_protocol_cannot_carry_fails_before_anything_is_written(harness, props, error, text) -> None:
    broker = harness.broker()
    conn, _ = harness.started(broker)
    peer = broker.accept()
    ch = conn.channel()
    with pytest.raises(error) as info:
        ch.basic_publish(amqp.Message(b"body", **props), routing_key="q")
    assert text in str(info.value)
    assert conn.carrot.wire.pending_output == 0 and not ch.carrot.unverified
    ch.basic_publish(amqp.Message(b"fine", application_headers={"ok": [1, "two", None, True, 1.5]}), routing_key="q")
    peer.wait_for(lambda: peer.published)
    assert [p.body for p in peer.published] == [b"fine"] and peer.protocol_errors == []


@pytest.mark.parametrize("kwargs,error,text", [
    ({"routing_key": "r" * 300}, ValueError, "routing_key is 300 bytes long"),
    ({"exchange": 5}, TypeError, "exchange must be a str"),
    ({"body": 12}, TypeError, "body must be bytes or str"),
    ({"body": "caf\u00e9", "content_encoding": "no-such-codec"}, ValueError, "content_encoding"),
])
def test_publish_arguments_are_checked(harness, kwargs, error, text) -> None:
    broker = harness.broker()
    conn, _ = harness.started(broker)
    broker.accept()
    ch = conn.channel()
    body = kwargs.pop("body", b"x")
    props = {"content_encoding": kwargs.pop("content_encoding")} if "content_encoding" in kwargs else {}
    with pytest.raises(error, match=text):
        ch.basic_publish(amqp.Message(body, **props), **{"routing_key": "q", **kwargs})
    assert conn.carrot.wire.pending_output == 0


def test_bodies_of_every_kind_go_out_as_bytes(harness) -> None:
    broker = harness.broker()
    conn, _ = harness.started(broker)
    peer = broker.accept()
    ch = conn.channel()
    when = datetime.datetime(2024, 5, 1, 12, 0, 0)
    ch.basic_publish(amqp.Message("caf\u00e9", application_headers={"when": when, "d": decimal.Decimal("1.5")}),
                     routing_key="str")
    ch.basic_publish(amqp.Message(bytearray(b"array")), routing_key="bytearray")
    ch.basic_publish(amqp.Message(None), routing_key="none")
    peer.wait_for(lambda: len(peer.published) == 3)
    text, array, empty = peer.published
    assert text.body == "caf\u00e9".encode() and text.properties["content_encoding"] == "utf-8"
    assert text.properties["application_headers"]["d"] == decimal.Decimal("1.5")
    assert (array.body, empty.body) == (b"array", b"")


def test_request_arguments_that_cannot_be_encoded_name_the_method(harness) -> None:
    broker = harness.broker()
    conn, _ = harness.started(broker)
    peer = broker.accept()
    ch = conn.channel()
    with pytest.raises(ValueError, match=r"Queue\.Declare argument 2 is 300 bytes long"):
        ch.queue_declare("q" * 300)
    with pytest.raises(TypeError, match=r"Exchange\.Declare argument 9\['x-bad'\]: set"):
        ch.exchange_declare("ex", "topic", arguments={"x-bad": {1}})
    with pytest.raises(ValueError, match=r"Basic\.Qos argument 2 must be between 0 and 65535"):
        ch.basic_qos(0, 70000, False)
    assert ch.carrot.reusable() and ch.queue_declare("fine").queue == "fine"
    assert [m["queue"] for m in peer.received("queue.declare")] == ["fine"]


def test_method_names_for_people() -> None:
    assert method_name((60, 40)) == "Basic.Publish"
    assert method_name((99, 99)) == "(99, 99)"
    assert encode_method(1, (20, 40), b"")[-1] == 0xCE
    assert frames_module.encode_args((20, 40), "", ()) == b""


def test_properties_a_peer_sent_out_of_spec_are_decoded_leniently_never_raised() -> None:
    """Invalid UTF-8 in header keys and values, a timestamp no datetime holds: decoded, never an exception.

    py-amqp raises on the reading thread for each (UnicodeDecodeError,
    OverflowError), which drops the connection; any client can publish them.
    """
    import types

    import amqp.serialization as serialization

    from carrot_kombu._pyamqp.frames import TolerantMessage

    real = serialization.calendar
    serialization.calendar = types.SimpleNamespace(timegm=lambda _: 2**64 - 1)
    try:
        sent = amqp.Message(b"", message_id=b"\xff", application_headers={
            b"k\xff": b"v", "nested": {b"\xfe": 1}, "t": datetime.datetime(2020, 1, 1)})
        encoded = bytes(sent._serialize_properties())
    finally:
        serialization.calendar = real
    message = TolerantMessage()
    message._load_properties(60, encoded, 0)
    headers = message.properties["application_headers"]
    assert message.properties["message_id"] == "\ufffd"
    assert headers["k\ufffd"] is not None and headers["nested"] == {"\ufffd": 1} and headers["t"] == 2**64 - 1
