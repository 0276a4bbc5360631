"""The core promises on the real RabbitMQ broker."""

from __future__ import annotations

import socket
import threading
import time

import kombu
import pytest
from amqp.exceptions import AccessRefused, NotAllowed, NotFound

from carrot_kombu import Backoff, ConnectionState, Disconnected

from .broker import channel_count, close_connection, connection_pids, drain_until, unique

MIB = b"x" * (1 << 20)


def run_threads(target, n, timeout=120):
    """Run ``target(i)`` on n threads; return their exceptions; fail on a hang."""
    errors: list[BaseException] = []

    def wrap(i):
        try:
            target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [t for t in threads if t.is_alive()]
    assert not hung, f"{len(hung)} thread(s) still running after {timeout}s: deadlock"
    return errors


def test_publish_and_consume_through_leases(rabbit):
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    exchange = kombu.Exchange(unique("ck-ex"), type="direct", auto_delete=True)
    queue = kombu.Queue(unique("ck-q"), exchange, routing_key="k", auto_delete=True)
    received = []
    got = threading.Event()

    threads = set()

    def on_message(body, message):
        threads.add(threading.current_thread())
        received.append(body)
        message.ack()
        if len(received) == 3:
            got.set()

    with manager.channel() as consumer_lease:
        with kombu.Consumer(consumer_lease, queues=[queue], callbacks=[on_message]):
            with manager.channel() as lease:
                producer = kombu.Producer(lease, exchange=exchange)
                for n in range(3):
                    producer.publish({"n": n}, routing_key="k")
            # kombu's contract: callbacks run in the thread that drains, in order
            deadline = time.monotonic() + 10
            while not got.is_set() and time.monotonic() < deadline:
                try:
                    manager.drain_events(timeout=1)
                except socket.timeout:
                    pass
            assert got.is_set()
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert threads == {threading.current_thread()}
    status = manager.status()
    assert status.server_product == "RabbitMQ" and status.channel_max and status.frame_max
    assert status.heartbeat == 10


def test_broker_forced_close_recovers_with_a_fresh_lease(rabbit):
    manager, events, name = rabbit(backoff=Backoff(min=0.1, max=1.0))
    assert manager.wait_connected(10)
    old = manager.open_channel()
    queue = unique("ck-q")
    old.queue_declare(queue, auto_delete=True)
    close_connection(name, "carrot_kombu test forced close")
    assert events.wait_count("disconnected", 1, timeout=10)
    (error,) = events.args("disconnected")[0]
    assert "CONNECTION_FORCED" in str(error) and "test forced close" in str(error)
    assert events.wait_count("connected", 2, timeout=10)
    assert events.names()[-3:] == ["disconnected", "connecting", "connected"]
    with pytest.raises(Disconnected):
        old.queue_declare(queue, auto_delete=True)
    with pytest.raises(Disconnected):
        old.basic_publish(old.prepare_message(b"x"), routing_key=queue)
    with manager.channel() as fresh:
        fresh.queue_declare(queue, auto_delete=True)
        fresh.queue_delete(queue)
    assert manager.status().reconnects == 1
    assert len(connection_pids(name)) == 1


def test_unreachable_broker_raises_disconnected_at_once(rabbit):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager, events, _ = rabbit(f"amqp://guest:guest@127.0.0.1:{port}//")
    assert events.wait_count("connect_failed", 1, timeout=10)
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(Disconnected) as info:
            manager.open_channel()
        assert time.monotonic() - started < 0.1
        assert isinstance(info.value.reason, ConnectionRefusedError)
    assert manager.state in (ConnectionState.DISCONNECTED, ConnectionState.CONNECTING)


def test_wrong_password_is_fatal_visible_and_not_a_hot_loop(rabbit):
    secret = "definitely-wrong-pw"
    manager, events, _ = rabbit(
        f"amqp://guest:{secret}@127.0.0.1:5672//", backoff=Backoff(min=0.05, max=30.0)
    )
    assert events.wait_count("connect_failed", 1, timeout=10)
    error, delay = events.args("connect_failed")[0]
    assert isinstance(error, AccessRefused) and delay == 30.0
    status = manager.status()
    assert status.state is ConnectionState.FAILED and status.fatal
    assert "ACCESS_REFUSED" in status.last_error and secret not in str(status.as_dict())
    with pytest.raises(Disconnected) as info:
        manager.open_channel()
    assert isinstance(info.value.reason, AccessRefused) and secret not in str(info.value)
    # no second attempt within 3 s although Backoff.min is 50 ms
    assert not events.wait_count("connect_failed", 2, timeout=3)
    assert manager.status().attempts == 1


def test_unknown_vhost_is_fatal(rabbit, amqp_url):
    manager, events, _ = rabbit(amqp_url.rstrip("/") + "/" + unique("no-such-vhost"))
    assert events.wait_count("connect_failed", 1, timeout=10)
    error, _ = events.args("connect_failed")[0]
    assert isinstance(error, NotAllowed)
    assert manager.status().fatal


def test_channel_closed_by_broker_is_discarded_connection_survives(rabbit):
    manager, events, name = rabbit(pool_limit=2)
    assert manager.wait_connected(10)
    with pytest.raises(NotFound):
        with manager.channel() as lease:
            broken = lease.channel
            lease.queue_declare(unique("ck-missing"), passive=True)
    assert manager.status().pool.idle == 0
    with manager.channel() as lease:
        assert lease.channel is not broken
        lease.queue_declare(unique("ck-q"), auto_delete=True)
    assert events.count("disconnected") == 0
    assert channel_count(connection_pids(name)[0]) == 1


def test_threads_publishing_mib_messages_and_declaring_on_one_connection(rabbit):
    """Raw py-amqp hangs here (shared socket timeout, racing readers)."""
    manager, events, name = rabbit(pool_limit=10)
    assert manager.wait_connected(10)
    queues = [unique("ck-mib") for _ in range(8)]

    def work(i):
        with manager.channel(timeout=30) as lease:
            lease.queue_declare(queues[i], auto_delete=False)
            for _ in range(10):
                lease.basic_publish(lease.prepare_message(MIB), routing_key=queues[i])
                lease.queue_declare(unique("ck-tmp"), exclusive=True)

    assert run_threads(work, 8) == []
    with manager.channel() as lease:
        for q in queues:
            # message counts lag asynchronous publishes: wait for them, with a deadline
            deadline = time.monotonic() + 10
            while lease.queue_declare(q, passive=True)[1] < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert lease.queue_declare(q, passive=True)[1] == 10
            lease.queue_delete(q)
    assert events.count("disconnected") == 0


def test_concurrent_rpcs_never_steal_replies(rabbit):
    manager, events, _ = rabbit(pool_limit=16)
    assert manager.wait_connected(10)

    def work(i):
        queue = unique(f"ck-rpc{i}")
        with manager.channel(timeout=30) as lease:
            for n in range(100):
                name, _, _ = lease.queue_declare(queue, auto_delete=True)
                assert name == queue  # each thread gets *its own* reply
                lease.basic_publish(lease.prepare_message(str(n).encode()), routing_key=queue)
                msg = lease.basic_get(queue, no_ack=True)
                assert msg is not None and msg.body == str(n).encode()
            lease.queue_delete(queue)

    assert run_threads(work, 16) == []


def test_confirmed_publishing_from_threads(rabbit):
    manager, events, _ = rabbit(transport_options={"confirm_publish": True}, pool_limit=8)
    assert manager.wait_connected(10)
    queue = unique("ck-confirm")
    with manager.channel() as lease:
        lease.queue_declare(queue, auto_delete=False)

    def work(i):
        with manager.channel(timeout=30) as lease:
            producer = kombu.Producer(lease)
            for n in range(100):
                producer.publish({"i": i, "n": n}, routing_key=queue)

    assert run_threads(work, 8) == []
    with manager.channel() as lease:
        _, count, _ = lease.queue_declare(queue, passive=True)
        lease.queue_delete(queue)
    assert count == 800


def test_broker_never_sees_more_channels_than_pool_limit(rabbit):
    manager, events, name = rabbit(pool_limit=4)
    assert manager.wait_connected(10)
    queue = unique("ck-limit")
    stop = threading.Event()

    def work(i):
        while not stop.is_set():
            with manager.channel(timeout=30) as lease:
                lease.queue_declare(queue, auto_delete=True)
                lease.basic_publish(lease.prepare_message(b"x" * 1024), routing_key=queue)

    workers = threading.Thread(target=lambda: run_threads(work, 16), daemon=True)
    workers.start()
    try:
        pid = connection_pids(name)[0]
        samples = [channel_count(pid) for _ in range(5)]
    finally:
        stop.set()
        workers.join(60)
    assert not workers.is_alive()
    with manager.channel() as lease:
        lease.queue_delete(queue)  # auto_delete never fires for a queue nobody consumed
    assert 1 <= max(samples) <= 4
    assert manager.status().pool.limit == 4


def test_heartbeats_do_not_depend_on_the_application(rabbit):
    """With heartbeat=1 the broker drops a client silent for ~2 s; a busy app must not be."""
    manager, events, name = rabbit(heartbeat=1)
    assert manager.wait_connected(10)
    assert manager.status().heartbeat == 1
    deadline = time.monotonic() + 2.5
    n = 0
    while time.monotonic() < deadline:  # the application hogs the CPU...
        n += sum(range(1000))
    time.sleep(2.5)  # ...then blocks without touching the connection
    assert events.count("disconnected") == 0
    assert len(connection_pids(name)) == 1
    with manager.channel() as lease:
        lease.queue_declare(unique("ck-hb"), auto_delete=True)


def test_consumer_gets_every_delivery_even_those_right_after_consume_ok(rabbit, caplog):
    """Deliveries racing ConsumeOk must reach the callback, not be rejected."""
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue = unique("ck-consume")
    for no_ack in (True, False) * 6:  # the race is timing-dependent: give it many chances
        with manager.channel() as lease:
            lease.queue_declare(queue, auto_delete=False)
            for n in range(500):
                lease.basic_publish(lease.prepare_message(b"%d" % n), routing_key=queue)
        got: list[bytes] = []
        done = threading.Event()

        def on_message(message, got=got, done=done, no_ack=no_ack):
            got.append(message.body)
            if not no_ack:
                message.channel.basic_ack(message.delivery_tag)
            if len(got) == 500:
                done.set()

        with manager.channel() as lease:
            if not no_ack:
                lease.basic_qos(0, 100, False)
            tag = lease.basic_consume(queue, no_ack=no_ack, callback=on_message)
            assert drain_until(manager, done.is_set), f"only {len(got)} of 500 delivered (no_ack={no_ack})"
            lease.basic_cancel(tag)
            _, left, _ = lease.queue_declare(queue, passive=True)
        assert sorted(got) == sorted(b"%d" % n for n in range(500))
        assert left == 0
    with manager.channel() as lease:
        lease.queue_delete(queue)
    assert "without callback" not in caplog.text.lower()
    assert events.count("disconnected") == 0


def test_a_failing_consumer_callback_does_not_drop_the_connection(rabbit):
    """The callback's error reaches the thread that drains (kombu's contract), not the connection."""
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue = unique("ck-cb")
    seen = []
    second = threading.Event()

    def on_message(message):
        seen.append(message.body)
        message.channel.basic_ack(message.delivery_tag)
        if len(seen) == 1:
            raise FileNotFoundError("the user's callback failed")  # an OSError
        second.set()

    with manager.channel() as lease:
        lease.queue_declare(queue, auto_delete=True)
        tag = lease.basic_consume(queue, callback=on_message)
        with manager.channel() as producer:
            producer.basic_publish(producer.prepare_message(b"1"), routing_key=queue)
            producer.basic_publish(producer.prepare_message(b"2"), routing_key=queue)
        with pytest.raises(FileNotFoundError, match="the user's callback failed"):
            drain_until(manager, second.is_set)
        assert drain_until(manager, second.is_set)
        lease.basic_cancel(tag)
    assert seen == [b"1", b"2"]
    assert events.count("disconnected") == 0
