"""The fenced py-amqp layer over TLS, against the fake broker's TLS (a throwaway CA).

OpenSSL forbids concurrent reads and writes on one SSL object, so the wire
serialises them under a lock, but only for calls that cannot block: half a
TLS record from a dead peer must never hold that lock, and many threads
must be able to publish and make requests at once.
"""

from __future__ import annotations

import os
import ssl
import time

import amqp
from amqp.exceptions import ConnectionForced

from carrot_kombu import Disconnected

from .test_pyamqp_support import WAIT, eventually, harness, no_leaks  # noqa: F401


def test_tls_connection_negotiates_and_round_trips(harness) -> None:
    broker = harness.broker(tls=True, frame_max=8192)
    conn, hooks = harness.started(broker)
    peer = broker.accept().wait_open()
    assert peer.tls and isinstance(conn.carrot.wire._sock, ssl.SSLSocket)
    ch = conn.channel()
    body = os.urandom(300 * 1024)
    received: list[amqp.Message] = []
    tag = ch.basic_consume("q", callback=received.append)
    ch.basic_publish(amqp.Message(body), routing_key="q")
    peer.wait_for(lambda: peer.published)
    peer.deliver(ch.channel_id, tag, body=body)
    conn.drain_events(WAIT)
    assert peer.published[0].body == body and received[0].body == body
    assert peer.protocol_errors == [] and peer.tls_error is None
    conn.close(timeout=WAIT)
    assert peer.wait_closed() == "closed"
    assert isinstance(hooks.wait_lost()[1], Disconnected)


def test_tls_half_record_then_silence_is_a_dead_peer_within_two_heartbeats(harness) -> None:
    broker = harness.broker(tls=True, heartbeat=1, manual={"queue.declare"})
    conn, hooks = harness.started(broker, heartbeat=1, reply_timeout=10)
    peer = broker.accept()
    ch = conn.channel()
    other = conn.channel()
    tag = ch.basic_consume("q", callback=lambda msg: None)
    request = harness.spawn(lambda: other.queue_declare("waiting"), "rpc")
    peer.expect("queue.declare")
    peer.send_partial_frame(ch.channel_id, "basic.deliver", tag, 1, False, "", "q", body=os.urandom(100 * 1024))
    cut_at = time.monotonic()
    # meanwhile writers are not held up by the reader's half record
    for _ in range(20):
        ch.basic_publish(amqp.Message(b"still writing"), routing_key="q")
    peer.wait_for(lambda: len(peer.published) == 20)
    at, lost, _ = hooks.wait_lost(2 * 1 + 1 + 1)
    assert isinstance(lost, ConnectionForced)
    assert at - cut_at <= 2 * 1 + 1
    error = request.exception()
    assert isinstance(error, Disconnected) and request.finished_at - at < 0.5


def test_tls_close_returns_promptly_with_half_a_record_pending(harness) -> None:
    broker = harness.broker(tls=True, heartbeat=5)
    conn, hooks = harness.started(broker, heartbeat=5)
    peer = broker.accept()
    ch = conn.channel()
    tag = ch.basic_consume("q", callback=lambda msg: None)
    peer.send_partial_frame(ch.channel_id, "basic.deliver", tag, 1, False, "", "q", body=os.urandom(50 * 1024))
    time.sleep(0.2)  # the reader now holds half a record
    started = time.monotonic()
    conn.close(timeout=0.5)  # the broker never answers (it is cut off)
    assert time.monotonic() - started < 0.5 + 0.5
    assert isinstance(hooks.wait_lost(0)[1], Disconnected)
    started = time.monotonic()
    conn.carrot.join(WAIT)
    assert time.monotonic() - started < 1.0


def test_tls_kill_wakes_a_waiting_reader_at_once(harness) -> None:
    broker = harness.broker(tls=True, manual={"queue.declare"})
    conn, hooks = harness.started(broker, reply_timeout=10)
    peer = broker.accept()
    ch = conn.channel()
    request = harness.spawn(lambda: ch.queue_declare("q"), "rpc")
    peer.expect("queue.declare")
    time.sleep(0.1)  # the caller reads the socket (TLS) itself
    killed_at = time.monotonic()
    conn.carrot.fail(Disconnected("killed by the test"))
    assert isinstance(request.exception(1), Disconnected)
    assert request.finished_at - killed_at < 0.5


def test_tls_many_threads_publish_and_make_requests_at_once(harness) -> None:
    broker = harness.broker(tls=True)
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    channels = [conn.channel() for _ in range(8)]

    def work(ch, n: int) -> list[str]:
        names = []
        for i in range(25):
            ch.basic_publish(amqp.Message(f"{n}:{i}".encode() * 100), routing_key=f"r{n}")
            if i % 5 == 0:
                names.append(ch.queue_declare(f"q{n}-{i}").queue)
        return names

    workers = [harness.spawn(lambda ch=ch, n=n: work(ch, n), f"tls-{n}") for n, ch in enumerate(channels)]
    for n, worker in enumerate(workers):
        assert worker.result(20) == [f"q{n}-{i}" for i in range(0, 25, 5)]
    peer.wait_for(lambda: len(peer.published) == 8 * 25, timeout=10)
    for n in range(8):  # per channel in order, each body intact
        bodies = [p.body for p in peer.published if p.routing_key == f"r{n}"]
        assert bodies == [f"{n}:{i}".encode() * 100 for i in range(25)]
    assert peer.protocol_errors == [] and peer.tls_error is None and hooks.lost == []


def test_tls_writes_survive_back_pressure(harness) -> None:
    broker = harness.broker(tls=True, recv_buffer=131072)
    conn, hooks = harness.started(broker)
    peer = broker.accept()
    ch = conn.channel()
    peer.stop_reading()
    body = os.urandom(4 << 20)
    publisher = harness.spawn(lambda: ch.basic_publish(amqp.Message(body), routing_key="big"), "pub")
    eventually(lambda: conn.carrot.wire.stalled_since is not None, what="the TLS write stalls")
    opener = harness.spawn(conn.channel, "opener")  # a request queues behind the stalled write
    time.sleep(0.2)
    assert not publisher.done.is_set() and not opener.done.is_set()
    peer.resume_reading()
    publisher.result(10)
    assert opener.result(10).is_open
    peer.wait_for(lambda: peer.published, timeout=10)
    assert peer.published[0].body == body
    assert peer.protocol_errors == [] and peer.tls_error is None and hooks.lost == []
