"""Consumer recovery and confirmed publishing across real connection losses."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import kombu
import pytest

from carrot_kombu import Backoff, PublishTimeout, Unroutable

from .broker import drain, unique
from .figures import record



def test_zero_loss_publishing_through_20_cuts(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.5), keep_args=False)
    queue = kombu.Queue(unique("ck-zero-loss"), auto_delete=False, durable=False)
    manager.declare(queue)
    assert manager.wait_connected(10)
    confirmed: list[str] = []
    failures: Counter[str] = Counter()
    lock = threading.Lock()
    total, threads = 10_000, 4
    started = threading.Event()
    publishing = threading.Event()
    publishing.set()

    def publish(worker):
        started.set()
        for n in range(total // threads):
            message_id = f"{worker}-{n}-{uuid.uuid4().hex[:6]}"
            try:
                manager.publish(message_id.encode(), routing_key=queue.name, timeout=30)
            except PublishTimeout as exc:
                with lock:
                    failures[exc.outcome] += 1
                continue
            with lock:
                confirmed.append(message_id)

    workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    assert started.wait(10)
    cuts = 0
    while cuts < 20 and any(w.is_alive() for w in workers):
        time.sleep(0.1)
        cuts += proxy.cut()
    for w in workers:
        w.join(120)
    assert not any(w.is_alive() for w in workers), "publishers hang"
    with manager.channel() as lease:
        bodies = drain(lease, queue.name, len(confirmed), timeout=30)
        while True:  # and whatever duplicates follow
            extra = lease.basic_get(queue.name, no_ack=True)
            if extra is None:
                break
            bodies.append(extra.body)
        lease.queue_delete(queue.name)
    received = Counter(b.decode() for b in bodies)
    lost = [m for m in confirmed if m not in received]
    duplicates = sum(c - 1 for c in received.values() if c > 1)
    record("zero_loss", published=total, confirmed=len(confirmed), cuts=cuts, lost=len(lost),
           duplicates=duplicates, timeouts=dict(failures))
    assert cuts == 20, f"publishing finished after {cuts} cuts"
    assert lost == []
    assert len(confirmed) == total


def test_consumer_on_server_named_queue_survives_10_disconnects(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.5))
    exchange = kombu.Exchange(unique("ck-events"), type="fanout", auto_delete=True)
    queue = kombu.Queue("", exchange, exclusive=True)
    manager.declare(queue)
    received: list[bytes] = []
    cond = threading.Condition()

    def on_message(body, message):
        with cond:
            received.append(body)
            cond.notify_all()
        message.ack()

    consumer = manager.consume(queue, on_message, prefetch_count=10)
    assert manager.wait_connected(10)
    for round_ in range(11):
        if round_:
            proxy.cut()
            assert events.wait_count("connected", round_ + 1, timeout=10)
        manager.publish(b"round %d" % round_, exchange=exchange, timeout=10)
        with cond:
            assert cond.wait_for(lambda: b"round %d" % round_ in received, 10), f"round {round_} not received"
    consumer.cancel()
    assert len(set(received)) == 11


def test_stale_ack_is_dropped_and_the_message_redelivered(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.5))
    queue = kombu.Queue(unique("ck-stale-ack"), auto_delete=False)
    manager.declare(queue)
    assert manager.wait_connected(10)
    deliveries = []
    done = threading.Event()

    def on_message(body, message):
        deliveries.append(message.delivery_info.get("redelivered"))
        if len(deliveries) == 1:
            proxy.cut()  # the connection dies while we hold the delivery
            assert events.wait_count("disconnected", 1, timeout=10)
        message.ack()  # stale the first time: dropped, never sent to the new channel
        if len(deliveries) == 2:
            done.set()

    manager.publish(b"once", routing_key=queue.name, timeout=10)  # confirmed before anyone consumes
    consumer = manager.consume(queue, on_message)
    assert done.wait(15)
    consumer.cancel()
    assert deliveries == [False, True]
    # consumers resubscribe before `connected`: wait for it before taking a lease
    assert events.wait_count("connected", 2, timeout=10)
    assert events.count("disconnected") == 1  # no 406 closed the new channel or connection
    with manager.channel() as lease:
        assert lease.queue_declare(queue.name, passive=True)[1] == 0  # acked on the new connection
        lease.queue_delete(queue.name)


def test_mandatory_unroutable_and_publish_timeout_outcomes(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.5), connection_timeout=2)
    assert manager.wait_connected(10)
    with pytest.raises(Unroutable, match="NO_ROUTE"):
        manager.publish(b"x", routing_key=unique("ck-nowhere"), mandatory=True, timeout=10)
    proxy.blackhole()  # written, never confirmed
    with pytest.raises(PublishTimeout) as info:
        manager.publish(b"y", routing_key=unique("ck-q"), timeout=1)
    assert info.value.outcome == "unknown"
    proxy.heal()
    proxy.refuse()
    proxy.cut()
    assert events.wait_count("disconnected", 1, timeout=10)
    with pytest.raises(PublishTimeout) as info:
        manager.publish(b"z", routing_key=unique("ck-q"), timeout=0.5)
    assert info.value.outcome == "not_sent"
    proxy.heal()


def test_publish_many_is_confirmed_and_survives_cuts(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.5))
    queue = kombu.Queue(unique("ck-many"), auto_delete=False)
    manager.declare(queue)
    assert manager.wait_connected(10)
    sent = []
    for batch in range(8):
        bodies = [b"%d-%d" % (batch, n) for n in range(500)]
        if batch in (2, 5):
            threading.Timer(0.005, proxy.cut).start()  # cut while the batch is in flight
        manager.publish_many(bodies, routing_key=queue.name, timeout=30)
        sent.extend(bodies)
    with manager.channel() as lease:
        got = drain(lease, queue.name, len(sent), timeout=30)
        while (extra := lease.basic_get(queue.name, no_ack=True)) is not None:
            got.append(extra.body)
        lease.queue_delete(queue.name)
    assert set(sent) <= set(got)  # every confirmed message is there (duplicates allowed)
    assert events.count("disconnected") == 2


def test_broker_cancel_resubscribes_a_declared_queue(rabbit):
    manager, events, _ = rabbit()
    queue = kombu.Queue(unique("ck-cancel"), auto_delete=False)
    manager.declare(queue)
    got = []
    cond = threading.Condition()

    def on_message(body, message):
        with cond:
            got.append(body)
            cond.notify_all()
        message.ack()

    consumer = manager.consume(queue, on_message)
    assert manager.wait_connected(10)
    manager.publish(b"before", routing_key=queue.name, timeout=10)
    with cond:
        assert cond.wait_for(lambda: b"before" in got, 10)
    with manager.channel() as lease:
        lease.queue_delete(queue.name)  # the broker cancels our consumer
    assert events.wait_count("consumer_cancelled", 1, timeout=10)
    assert events.args("consumer_cancelled")[0] == (queue.name,)
    deadline = time.monotonic() + 10
    while consumer._generation is None and time.monotonic() < deadline:  # resubscribed
        time.sleep(0.02)
    manager.publish(b"after", routing_key=queue.name, timeout=10)
    with cond:
        assert cond.wait_for(lambda: b"after" in got, 10), "not resubscribed after the broker's cancel"
    consumer.cancel()
    assert events.count("disconnected") == 0
    with manager.channel() as lease:
        lease.queue_delete(queue.name)


def test_consuming_a_missing_queue_fails_now_and_leaves_nothing_behind(rabbit):
    from amqp.exceptions import NotFound

    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    with pytest.raises(NotFound):
        manager.consume(unique("ck-missing"), lambda body, message: None, declare=False)
    assert manager._core.consumers.snapshot() == []
    with manager.channel() as lease:  # the connection is fine
        lease.queue_declare(unique("ck-ok"), auto_delete=True)
    assert events.count("disconnected") == 0
