"""Liveness and prompt answers on real brokers: defects of an earlier version, as regression tests.

Each test states what a user expects, and every wait has a deadline:

* kombu callbacks run in the thread that calls ``manager.drain_events``,
  one at a time, in order, never on the connection's reading threads;
* a dead peer (also over TLS, silent in the middle of a record) is noticed
  within ``2 x heartbeat + 1 s``; ``stop(timeout)`` returns within the timeout
  whatever the socket does;
* ``publish`` fails at once when the manager already knows the answer, and
  ``Disconnected.reason`` is never ``None``;
* ``start(wait=...)``, ``reply_timeout`` and pool timeouts bound every wait;
* recovery after a broker restart is quick, a refused login is retried slowly;
* no fragment of a password shows anywhere; configuration mistakes are
  refused at construction.

Faults: the :class:`~integration.proxy.FaultProxy` (blackhole, and
``blackhole_after`` for a stream cut mid-frame / mid-TLS-record) and one private
RabbitMQ node with a TLS listener (:func:`~integration.nodes.private_nodes`),
shared by the tests of this module.  Measured figures go to ``build/figures``
(``liveness_*.json``).
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import kombu
import pytest

from carrot_kombu import (
    Backoff,
    CarrotKombuError,
    ConfigurationError,
    ConnectionManager,
    ConnectionState,
    Disconnected,
    PoolTimeout,
    PublishTimeout,
    ReplyTimeout,
)

from .broker import drain, drain_until, unique
from .figures import record
from .nodes import BrokerNode, free_port, private_nodes
from .proxy import FaultProxy

KIB256 = b"\xa5" * (256 * 1024)
MIB = b"\xa5" * (1 << 20)
#: Slack for thread scheduling on a loaded 2-core machine.
SLACK = 0.3


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    """One private node (plain and TLS listeners) for restarts and TLS; always stopped."""
    with private_nodes(1, tls=True) as (only,):
        yield only


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
    started = time.monotonic()
    fn(*args, **kwargs)
    return time.monotonic() - started


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(step)
    return True


def stamps(manager: ConnectionManager, event: str) -> list[float]:
    """``time.monotonic()`` of each ``event`` as it is delivered."""
    times: list[float] = []
    manager.on(event, lambda *_: times.append(time.monotonic()))
    return times


def tls_options(node: BrokerNode) -> dict[str, Any]:
    assert node.certs is not None
    return {"ca_certs": str(node.certs["ca"]), "server_hostname": "localhost"}


# -- 1. kombu callbacks run in the draining thread ---------------------------------------------


def test_kombu_callbacks_run_in_the_draining_thread_in_order_and_never_nest(rabbit):
    manager, events, _ = rabbit(heartbeat=1)
    assert manager.wait_connected(10)
    queue = kombu.Queue(unique("ck-live-order"), auto_delete=True)
    side = unique("ck-live-side")
    with manager.channel() as lease:
        queue(lease).declare()
        lease.queue_declare(side, exclusive=True)  # every lease shares the connection
    manager.publish_many(list(range(300)), routing_key=queue.name, timeout=30)

    received: list[int] = []
    threads: set[int] = set()
    depth = max_depth = 0

    def on_message(body: int, message: Any) -> None:
        nonlocal depth, max_depth
        depth += 1
        max_depth = max(max_depth, depth)
        try:
            threads.add(threading.get_ident())
            received.append(body)
            if body % 30 == 0:
                # blocking calls from inside a callback: a lease, an RPC, kombu and confirmed publishes
                with manager.channel(timeout=5) as lease:
                    lease.queue_declare(side, passive=True)
                    kombu.Producer(lease).publish({"from": body}, routing_key=side)
                manager.publish({"from": body}, routing_key=side, timeout=10)
            if body == 150:
                time.sleep(2.5)  # the drainer is busy for > 2 x heartbeat: heartbeats must not depend on it
            message.ack()
        finally:
            depth -= 1

    with manager.channel() as consumer_lease:
        with kombu.Consumer(consumer_lease, queues=[queue], callbacks=[on_message]):
            assert drain_until(manager, lambda: len(received) == 300, timeout=40), f"{len(received)} of 300"
    assert received == list(range(300)), "callbacks ran out of order"
    assert max_depth == 1, "a callback ran inside another callback"
    assert threads == {threading.get_ident()}, "callbacks ran on another thread"
    with manager.channel() as lease:
        assert len(drain(lease, side, 20, timeout=10)) == 20
    assert "disconnected" not in events.names()
    status = manager.status()
    assert status.state is ConnectionState.CONNECTED and status.reconnects == 0


# -- 2. a dead peer, also over TLS in the middle of a record -----------------------------------


def test_the_proxy_forwards_exactly_n_bytes_then_goes_silent():
    """The harness first: ``blackhole_after`` cuts the broker's stream at an exact offset."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with FaultProxy("127.0.0.1", server.getsockname()[1]) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                peer, _ = server.accept()
                with peer:
                    tripped = proxy.blackhole_after(100_003)
                    peer.sendall(bytes(300_000))
                    assert tripped.wait(5)
                    got = 0
                    client.settimeout(0.5)
                    try:
                        while True:
                            chunk = client.recv(65536)
                            assert chunk, "the proxy closed instead of going silent"
                            got += len(chunk)
                    except socket.timeout:
                        pass
                    assert got == 100_003


def _big_traffic(manager: ConnectionManager, proxy: FaultProxy, traffic: str, cut_after: int) -> list[BaseException]:
    """256 KiB messages arriving, by ``manager.consume`` or by ``basic_get`` in a loop on a thread.

    The first message to arrive arms ``proxy.blackhole_after(cut_after)``: an
    odd offset into a stream of 256 KiB messages, so the stream stops in the
    middle of a frame (and of a TLS record).  Returns where the ``basic_get``
    loop puts the error that ended it.
    """
    queue = kombu.Queue(unique("ck-live-big"), durable=False, exclusive=True)
    with manager.channel() as lease:
        queue(lease).declare()
    manager.publish_many([KIB256] * 16, routing_key=queue.name, timeout=30)
    ended: list[BaseException] = []
    armed = threading.Event()

    def arrived() -> None:
        if not armed.is_set():
            armed.set()
            proxy.blackhole_after(cut_after)

    if traffic == "consumer":
        def on_message(body: Any, message: Any) -> None:
            arrived()
            message.ack()

        manager.consume(queue, on_message, prefetch_count=4)
    else:
        def get_loop() -> None:
            try:
                with manager.channel() as lease:
                    while True:
                        if lease.basic_get(queue.name, no_ack=True) is not None:
                            arrived()
            except BaseException as exc:
                ended.append(exc)

        threading.Thread(target=get_loop, name="basic-get-loop", daemon=True).start()
    return ended


@pytest.mark.parametrize(
    "tls, traffic", [(True, "consumer"), (True, "basic_get"), (False, "consumer")],
    ids=["tls-consumer", "tls-basic_get", "tcp-consumer"],
)
def test_a_peer_silent_mid_message_is_detected_within_two_heartbeats(node, rabbit, tls, traffic):
    with FaultProxy("127.0.0.1", node.tls_port if tls else node.port) as proxy:
        if tls:
            url = f"amqps://guest:guest@127.0.0.1:{proxy.port}//"
            manager, events, _ = rabbit(url, heartbeat=2, ssl_options=tls_options(node))
        else:
            manager, events, _ = rabbit(proxy.url(), heartbeat=2)
        lost_at = stamps(manager, "disconnected")
        assert manager.wait_connected(15)
        getter_ended = _big_traffic(manager, proxy, traffic, cut_after=300_001)
        assert proxy.tripped.wait(10), "the stream was not cut"
        assert events.wait_count("disconnected", 1, timeout=8), "dead peer not detected"
        detected = lost_at[0] - proxy.tripped_at
        record(f"liveness_dead_peer_{'tls' if tls else 'tcp'}_{traffic}", heartbeat_s=2, detected_s=round(detected, 3))
        assert detected <= 2 * 2 + 1, f"dead peer detected after {detected:.2f}s (heartbeat 2s)"
        (error,) = events.args("disconnected")[0]
        assert "heartbeat" in str(error).lower()
        if traffic == "basic_get":
            # the caller waiting for the half-received message hears of the loss, not of its reply_timeout
            assert wait_until(lambda: bool(getter_ended), 1), "basic_get still waits"
            assert isinstance(getter_ended[0], Disconnected), repr(getter_ended[0])
        # reconnecting now, into the black hole (the handshake stalls): stop must not care
        took = timed(manager.stop, timeout=2)
        assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"


def test_stop_returns_in_time_while_a_tls_peer_is_silent_mid_record(node, rabbit):
    with FaultProxy("127.0.0.1", node.tls_port) as proxy:
        url = f"amqps://guest:guest@127.0.0.1:{proxy.port}//"
        manager, events, _ = rabbit(url, heartbeat=2, ssl_options=tls_options(node))
        assert manager.wait_connected(15)
        getter_ended = _big_traffic(manager, proxy, "basic_get", cut_after=200_003)
        assert proxy.tripped.wait(10), "the stream was not cut"
        time.sleep(0.5)  # half a record is all the socket has; not yet declared dead
        assert manager.connected and not getter_ended
        took = timed(manager.stop, timeout=2)
        assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"
        assert manager.state is ConnectionState.STOPPED
        assert wait_until(lambda: bool(getter_ended), 1), "basic_get still waits after stop()"
        assert isinstance(getter_ended[0], Disconnected), repr(getter_ended[0])


# -- 3. publish does not wait for an answer the manager already knows -------------------------


def test_publish_fails_at_once_after_a_fatal_refusal(rabbit):
    manager, events, _ = rabbit("amqp://guest:wrong-password@127.0.0.1:5672//", start=False)
    manager.start()
    # a publish made before the refusal is known ends when it is known
    started = time.monotonic()
    with pytest.raises(Disconnected) as early:
        manager.publish(b"x", routing_key=unique("ck-live"), timeout=30)
    assert time.monotonic() - started < 2
    assert early.value.reason is not None and "ACCESS_REFUSED" in str(early.value.reason)
    assert events.wait_count("connect_failed", 1, timeout=10)
    status = manager.status()
    assert status.state is ConnectionState.FAILED and status.fatal
    started = time.monotonic()
    with pytest.raises(Disconnected) as info:
        manager.publish(b"x", routing_key=unique("ck-live"), timeout=30)
    took = time.monotonic() - started
    assert took < 0.5, f"publish took {took:.2f}s to raise"
    assert info.value.reason is not None and "ACCESS_REFUSED" in str(info.value.reason)


def test_publish_fails_at_once_after_the_policy_gave_up(rabbit):
    manager, events, _ = rabbit(f"amqp://guest:guest@127.0.0.1:{free_port()}//", backoff=Backoff(max_tries=1))
    assert events.wait_count("connect_failed", 1, timeout=10)
    assert events.args("connect_failed")[0][1] is None  # delay None: gave up
    assert manager.status().gave_up
    started = time.monotonic()
    with pytest.raises(Disconnected) as info:
        manager.publish(b"x", routing_key="anything", timeout=30)
    took = time.monotonic() - started
    assert took < 0.5, f"publish took {took:.2f}s to raise"
    assert info.value.reason is not None and "refused" in str(info.value.reason).lower()


def test_disconnected_reason_is_never_none(rabbit, proxy):
    proxy.blackhole()
    manager, _, _ = rabbit(proxy.url(), connection_timeout=60)
    errors: list[Disconnected] = []
    with pytest.raises(Disconnected) as info:  # right after start()
        manager.open_channel(timeout=1)
    errors.append(info.value)
    assert wait_until(lambda: proxy.accepted >= 1, 5), "no connection attempt"
    assert manager.state is ConnectionState.CONNECTING  # first attempt, stuck in the handshake
    for use in (
        lambda: manager.open_channel(timeout=1),
        lambda: manager.start(wait=0.3),
        lambda: manager.drain_events(timeout=0.1),
    ):
        with pytest.raises(Disconnected) as info:
            use()
        errors.append(info.value)
    with pytest.raises(PublishTimeout) as waited:  # waiting for a connection can help here
        manager.publish(b"x", routing_key="anything", timeout=0.3)
    assert waited.value.outcome == "not_sent"
    manager.stop(timeout=2)
    with pytest.raises(Disconnected) as info:
        manager.open_channel()
    errors.append(info.value)
    for error in errors:
        assert error.reason is not None, f"{error!r} has no reason"
        assert error.__cause__ is not None


# -- 4. start(wait=...) ------------------------------------------------------------------------


def test_start_wait_returns_connected_and_a_lease_works_at_once(rabbit):
    manager, _, _ = rabbit(start=False)
    assert manager.start(wait=5) is manager
    assert manager.connected
    with manager.open_channel(timeout=0.5) as lease:
        lease.queue_declare(unique("ck-live"), exclusive=True)


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_start_wait_against_an_unreachable_broker_raises_after_the_wait(rabbit, proxy, how):
    if how == "silent":
        proxy.blackhole()
        url = proxy.url()
    else:
        url = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
    manager, _, _ = rabbit(url, start=False, backoff=Backoff())
    started = time.monotonic()
    with pytest.raises(Disconnected) as info:
        manager.start(wait=1)
    took = time.monotonic() - started
    assert 0.9 <= took <= 1 + SLACK, f"start(wait=1) raised after {took:.2f}s"
    assert info.value.reason is not None
    if how == "refused":
        assert "refused" in str(info.value.reason).lower()


# -- 5. bounded waits: reply_timeout and the pool ----------------------------------------------


def test_reply_timeout_discards_the_channel_and_pool_timeout_says_the_connection_looks_dead(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), reply_timeout=2, heartbeat=3, pool_limit=2)
    assert manager.wait_connected(10)
    queue = unique("ck-live-rt")
    stuck, other = manager.open_channel(), manager.open_channel()  # the pool is now exhausted
    other.queue_declare(queue, exclusive=True)
    stuck_channel = stuck.channel
    proxy.blackhole()
    silent_since = time.monotonic()
    with pytest.raises(ReplyTimeout) as info:
        stuck.queue_declare(queue, passive=True)
    took = time.monotonic() - silent_since
    assert isinstance(info.value, TimeoutError)
    assert 1.9 <= took <= 2 + SLACK, f"ReplyTimeout after {took:.2f}s (reply_timeout=2)"
    started = time.monotonic()
    with pytest.raises(CarrotKombuError):  # that channel is done for: a reply may still come
        stuck.queue_declare(queue, passive=True)
    assert time.monotonic() - started < 0.1
    with pytest.raises(PoolTimeout) as pool_info:  # silent for less than a heartbeat (3 s) so far
        manager.open_channel(timeout=0.2)
    assert "looks dead" not in str(pool_info.value), str(pool_info.value)
    # no frame for more than a heartbeat by the time this times out
    time.sleep(max(0.0, silent_since + 2.5 - time.monotonic()))
    with pytest.raises(PoolTimeout) as pool_info:
        manager.open_channel(timeout=1)
    assert "looks dead" in str(pool_info.value), str(pool_info.value)
    stuck.release()
    counts = manager.status().pool
    assert (counts.leased, counts.idle) == (1, 0)
    proxy.heal()  # before 2 x heartbeat: the connection survives
    other.release()
    leases = [manager.open_channel(timeout=5) for _ in range(2)]
    assert all(lease.channel is not stuck_channel for lease in leases), "the discarded channel was handed out"
    leases[0].queue_declare(queue, passive=True)
    for lease in leases:
        lease.release()
    assert "disconnected" not in events.names()


# -- 6. recovery speed, and slow retries of a refused login -------------------------------------


def _tcp_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_usable_within_a_second_of_a_restarted_node_accepting_connections(node, rabbit):
    manager, events, _ = rabbit(node.url, backoff=Backoff())  # 1 s -> 30 s
    assert manager.wait_connected(15)
    starter = threading.Thread(target=node.ctl, args=("start_app",), daemon=True)
    node.stop_app()
    try:
        assert events.wait_count("disconnected", 1, timeout=10)
        time.sleep(5)
        starter.start()
        deadline = time.monotonic() + 60
        while not _tcp_accepts(node.port):
            assert time.monotonic() < deadline, "the node did not come back"
            time.sleep(0.05)
        accepting = time.monotonic()
        usable = None
        while usable is None and time.monotonic() < accepting + 15:
            try:
                with manager.channel(timeout=1) as lease:
                    lease.queue_declare(unique("ck-live"), exclusive=True)
                usable = time.monotonic()
            except Disconnected:
                time.sleep(0.01)
    finally:
        if starter.is_alive():
            starter.join(60)
        if not _tcp_accepts(node.port):
            node.start_app()  # the node is up for the next test whatever happened
    assert usable is not None, "not usable within 15 s of the node accepting connections"
    took = usable - accepting
    record("liveness_restart_recovery", backoff="Backoff()", usable_after_accepting_s=round(took, 3))
    assert took <= 1.0, f"usable {took:.2f}s after the node accepted TCP connections again"


def test_a_refused_login_is_retried_no_faster_than_backoff_max(rabbit):
    manager, events, _ = rabbit("amqp://guest:wrong-password@127.0.0.1:5672//", backoff=Backoff(min=0.1, max=2))
    time.sleep(3)
    attempts = events.args("connect_failed")
    assert 1 <= len(attempts) <= 2, f"{len(attempts)} refused logins in 3 s with Backoff(max=2)"
    assert all(delay >= 2 for _, delay in attempts)


def test_a_port_that_accepts_but_does_not_speak_amqp_is_retried_on_the_backoff_schedule(rabbit):
    """TCP accepted, then the handshake fails (a TLS port, another service, a broker closing at once).

    The TCP readiness probe must not end backoff waits here: the port always
    accepts, so that would retry every probe interval, forever.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            client.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")  # not AMQP: the handshake fails at once
            client.close()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        manager, events, _ = rabbit(f"amqp://guest:guest@127.0.0.1:{port}//",
                                    backoff=Backoff(min=1, max=1, jitter=False), connection_timeout=2)
        time.sleep(3.5)
        attempts = len(events.args("connect_failed"))
        manager.stop(timeout=5)
    finally:
        stop.set()
        server.join(5)
        listener.close()
    assert 2 <= attempts <= 5, f"{attempts} attempts in 3.5 s with a 1 s backoff (the probe must not shorten it)"


def test_tls_to_a_plain_amqp_port_is_retried_on_the_backoff_schedule(rabbit, amqp_url):
    """``amqps://`` at a plain port fails the TLS handshake (an ssl.SSLError whose ``reason`` is a str).

    Retried with backoff like any failure after TCP; it once crashed the supervisor for good.
    """
    import ssl as _ssl

    url = amqp_url.replace("amqp://", "amqps://", 1)
    manager, events, _ = rabbit(url, ssl_options={"cert_reqs": _ssl.CERT_NONE},
                                backoff=Backoff(min=0.5, max=0.5, jitter=False))
    time.sleep(2.2)
    attempts = len(events.args("connect_failed"))
    status = manager.status()
    assert 3 <= attempts <= 6, (attempts, status.last_error)
    assert "crashed" not in (status.last_error or "") and not status.gave_up
    assert any(t.name == "carrot-kombu-supervisor" for t in threading.enumerate())


# -- 7. secrets --------------------------------------------------------------------------------

SECRET_URL = "amqp://guest:S3cr;et@127.0.0.1:5672//"
FRAGMENTS = ("S3cr", "et@")


def _exception_texts(exc: BaseException) -> list[str]:
    """Everything an exception shows: its chain (reason, cause, context) in every form."""
    texts, todo, seen = [], [exc], set()
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        texts += [str(current), repr(current), repr(getattr(current, "args", ()))]
        texts.append("".join(traceback.format_exception(type(current), current, current.__traceback__)))
        todo += [getattr(current, "reason", None), current.__cause__, current.__context__]
    return texts


def test_no_fragment_of_a_password_shows_anywhere(rabbit, caplog):
    caplog.set_level(logging.DEBUG)
    manager, events, _ = rabbit(SECRET_URL, backoff=Backoff(min=0.1, max=0.5))
    assert events.wait_count("connect_failed", 2, timeout=10)
    texts: list[str] = []
    for use in (
        lambda: manager.start(wait=0.2),
        lambda: manager.open_channel(),
        lambda: manager.publish(b"x", routing_key="anything", timeout=5),
        lambda: manager.drain_events(timeout=0.1),
    ):
        with pytest.raises(Disconnected) as info:
            use()
        texts += _exception_texts(info.value)
    texts += [repr(manager), json.dumps(manager.status().as_dict()), str(manager.status())]
    for name in ("connect_failed", "disconnected"):
        for args in events.args(name):
            for arg in args:
                texts += _exception_texts(arg) if isinstance(arg, BaseException) else [repr(arg)]
    manager.stop(timeout=2)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts += [formatter.format(rec) for rec in caplog.records]
    cli = str(Path(sys.executable).with_name("carrot-kombu"))
    for extra in ([], ["--json"]):
        result = subprocess.run([cli, "check", SECRET_URL, "--timeout", "3", *extra],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode != 0 and "ACCESS_REFUSED" in result.stdout, result.stdout + result.stderr
        texts += [result.stdout, result.stderr]
    assert any("ACCESS_REFUSED" in text for text in texts)  # the texts do say what happened
    leaks = [text for text in texts if any(fragment in text for fragment in FRAGMENTS)]
    assert not leaks, f"password fragments in: {leaks[:3]}"


# -- 8. configuration --------------------------------------------------------------------------


def test_carrot_ssl_names_connect_over_verified_tls(node, rabbit):
    assert node.certs is not None
    url = f"amqps://guest:guest@127.0.0.1:{node.tls_port}//"
    carrot_names = {"cacertfile": str(node.certs["ca"]), "verify": "verify_peer"}
    manager, _, _ = rabbit(url, start=False, ssl_options={**carrot_names, "server_name_indication": "localhost"})
    manager.start(wait=10)
    with manager.channel(timeout=1) as lease:
        lease.queue_declare(unique("ck-live"), exclusive=True)
    assert manager.status().broker.startswith("amqps://")
    # verified for real: the certificate does not name this host
    wrong, events, _ = rabbit(url, ssl_options={**carrot_names, "server_name_indication": "wrong.example"})
    assert events.wait_count("connect_failed", 1, timeout=10)
    assert isinstance(events.args("connect_failed")[0][0], ssl.SSLCertVerificationError)
    assert not wrong.connected


@pytest.mark.parametrize(
    "options, url_suffix, field",
    [
        ({"ssl_options": {"cafile": __file__}}, "", "cafile"),
        ({"socket_options": {"BOGUS": 1}}, "", "BOGUS"),
        ({}, "?heartbeat=", "heartbeat"),
    ],
    ids=["ssl-cafile", "socket-option", "empty-heartbeat"],
)
def test_configuration_mistakes_are_refused_at_construction(proxy, options, url_suffix, field):
    threads = threading.active_count()
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(proxy.url() + url_suffix, **options)
    assert field in str(info.value)
    assert proxy.accepted == 0 and threading.active_count() == threads  # nothing was attempted


# -- stop(timeout) returns within the timeout, whatever the socket does --------------------------


@pytest.mark.parametrize("peer", ["healthy", "silent"])
def test_stop_returns_in_time_when_connected_and_idle(rabbit, proxy, peer):
    manager, events, _ = rabbit(proxy.url())
    assert manager.wait_connected(10)
    if peer == "silent":
        proxy.blackhole()
    took = timed(manager.stop, timeout=2)
    assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"
    assert manager.state is ConnectionState.STOPPED
    assert "stopped" in events.names(), "stop() returned before delivering the 'stopped' event"


def test_stop_returns_in_time_during_a_blackholed_handshake(rabbit, proxy):
    proxy.blackhole()
    manager, events, _ = rabbit(proxy.url(), connection_timeout=60)
    assert wait_until(lambda: proxy.accepted >= 1, 5), "no connection attempt"
    time.sleep(0.2)
    took = timed(manager.stop, timeout=2)
    assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"
    assert manager.state is ConnectionState.STOPPED
    assert "stopped" in events.names(), "stop() returned before delivering the 'stopped' event"


def test_stop_returns_in_time_while_a_publish_waits_for_its_confirm(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url())
    assert manager.wait_connected(10)
    queue = unique("ck-live-confirm")
    manager.publish(b"warm-up", routing_key=queue, timeout=10)  # the confirm channel exists
    proxy.blackhole()
    outcome: list[BaseException] = []

    def publish() -> None:
        try:
            manager.publish(b"x", routing_key=queue, timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    time.sleep(0.5)  # written, waiting for a confirm that cannot come
    assert publisher.is_alive() and not outcome
    took = timed(manager.stop, timeout=2)
    assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"
    publisher.join(1)
    assert not publisher.is_alive(), "the publish still waits after stop()"
    assert len(outcome) == 1 and isinstance(outcome[0], Disconnected), outcome
    assert outcome[0].reason is not None


def test_stop_returns_in_time_and_frees_publishers_stuck_writing_to_a_silent_peer(rabbit, proxy):
    manager, _, _ = rabbit(proxy.url())
    assert manager.wait_connected(10)
    queue = unique("ck-live-stuck")
    manager.publish(b"warm-up", routing_key=queue, timeout=10)
    proxy.blackhole()
    outcomes: list[BaseException] = []

    def publish() -> None:
        try:  # more than the kernel buffers and the library's 4 MiB of back-pressure hold
            manager.publish_many([MIB] * 12, routing_key=queue, timeout=60)
        except BaseException as exc:
            outcomes.append(exc)

    publishers = [threading.Thread(target=publish, daemon=True) for _ in range(3)]
    for publisher in publishers:
        publisher.start()
    time.sleep(2)  # the socket stopped taking bytes long ago
    assert all(publisher.is_alive() for publisher in publishers) and not outcomes
    took = timed(manager.stop, timeout=2)
    assert took <= 2 + SLACK, f"stop(timeout=2) took {took:.2f}s"
    deadline = time.monotonic() + 1
    for publisher in publishers:
        publisher.join(max(0.0, deadline - time.monotonic()))
    stuck = sum(publisher.is_alive() for publisher in publishers)
    assert not stuck, f"{stuck} of 3 publishes still blocked 1 s after stop() returned"
    assert all(isinstance(exc, Disconnected) for exc in outcomes), outcomes
