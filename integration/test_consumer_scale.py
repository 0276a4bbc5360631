"""Many consumers on one manager: shared channels, and one consumer's channel error isolated.

500 consumers share channels (``CONSUMERS_PER_CHANNEL`` each).  The broker
closing one of them for one consumer's fault (its queue deleted: a
``basic.cancel`` for it alone) must affect only that consumer: every other
consumer gets every message of every round exactly once, in order.  An ack
of a tag twice through ``message.channel`` (once a 406 that closed the whole
shared channel) is refused before it is sent.
"""

from __future__ import annotations

import threading
import time
from typing import Any


from .broker import channel_count, close_connection, connection_pids, unique
from .figures import record, resources
from .integrity_helpers import wait_until


N = 500


class Fleet:
    """N consumers of N queues, each recording its bodies (in order) and acking them."""

    def __init__(self, manager: Any, prefix: str, on_body: Any = None, count: int = N) -> None:
        self.manager = manager
        self.queues = [f"{prefix}-{n}" for n in range(count)]
        self.got: dict[str, list[Any]] = {q: [] for q in self.queues}
        self.lock = threading.Condition()
        self.on_body = on_body
        with manager.channel(timeout=10) as lease:
            for q in self.queues:
                lease.queue_declare(q, durable=False, auto_delete=False, arguments={"x-expires": 120_000})
        self.consumers = [manager.consume(q, self._callback(q), declare=False, prefetch_count=10)
                          for q in self.queues]

    def _callback(self, queue: str) -> Any:
        def on_message(body: Any, message: Any) -> None:
            if self.on_body is not None and self.on_body(queue, body, message):
                pass  # settled by on_body
            else:
                message.ack()
            with self.lock:
                self.got[queue].append(body)
                self.lock.notify_all()
        return on_message

    def publish_round(self, n: int, skip: tuple[str, ...] = ()) -> None:
        for q in self.queues:
            if q not in skip:
                self.manager.publish(n, routing_key=q, timeout=10)

    def wait_round(self, n: int, skip: tuple[str, ...] = (), timeout: float = 30) -> None:
        want = [q for q in self.queues if q not in skip]
        with self.lock:
            ok = self.lock.wait_for(lambda: all(n in self.got[q] for q in want), timeout)
        missing = [q for q in want if n not in self.got[q]]
        assert ok, f"round {n}: {len(missing)} consumers got nothing, e.g. {missing[:3]}"

    def cleanup(self) -> None:
        for consumer in self.consumers:
            consumer.cancel()
        with self.manager.channel(timeout=10) as lease:
            for q in self.queues:
                lease.queue_delete(q)


def _assert_exactly(fleet: Fleet, rounds: list[int], skip: tuple[str, ...]) -> None:
    with fleet.lock:
        wrong = {q: got for q, got in fleet.got.items() if q not in skip and got != rounds}
    assert not wrong, f"{len(wrong)} consumers lost or duplicated messages, e.g. {list(wrong.items())[:3]}"


def test_a_deleted_queue_affects_only_its_consumer_among_500_sharing_channels(rabbit) -> None:
    manager, events, name = rabbit()
    assert manager.wait_connected(10)
    fleet = Fleet(manager, unique("ck-scale-del"))
    try:
        # Channels are shared: far fewer than one per consumer.
        (pid,) = connection_pids(name)
        channels = channel_count(pid)
        assert channels <= N // 8
        fleet.publish_round(0)
        fleet.wait_round(0)
        victim = fleet.queues[7]
        with manager.channel(timeout=10) as lease:
            lease.queue_delete(victim)
        assert events.wait_count("consumer_cancelled", 1, 10)
        fleet.publish_round(1, skip=(victim,))
        fleet.wait_round(1, skip=(victim,))
        fleet.publish_round(2, skip=(victim,))
        fleet.wait_round(2, skip=(victim,))
        assert events.args("consumer_cancelled") == [(victim,)]
        _assert_exactly(fleet, [0, 1, 2], skip=(victim,))
        assert fleet.got[victim] == [0]
        assert events.count("disconnected") == 0
        record("consumer_isolation_deleted_queue", consumers=N, channels=channels, cancelled=len(
            events.args("consumer_cancelled")), lost=0, duplicates=0)
    finally:
        fleet.cleanup()


def test_a_tag_acked_twice_is_refused_and_affects_no_consumer_among_500_sharing_channels(rabbit) -> None:
    """``message.channel.basic_ack`` of a tag already acked: refused before it is sent (no 406 on the shared channel)."""
    from carrot_kombu import ConsumerChannelRefused

    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    prefix = unique("ck-scale-406")
    culprit = f"{prefix}-3"
    doubled = threading.Event()
    refused: list[BaseException] = []

    def ack_twice(queue: str, body: Any, message: Any) -> bool:
        if queue == culprit and body == "bad" and not doubled.is_set():
            message.ack()
            try:
                message.channel.basic_ack(message.delivery_tag)  # again: once a 406 closing the shared channel
            except ConsumerChannelRefused as exc:
                refused.append(exc)
            doubled.set()
            return True
        return False

    fleet = Fleet(manager, prefix, on_body=ack_twice)
    try:
        fleet.publish_round(0)
        fleet.wait_round(0)
        manager.publish("bad", routing_key=culprit, timeout=10)
        assert doubled.wait(10)
        assert len(refused) == 1 and "basic_ack(delivery_tag=" in str(refused[0])
        fleet.publish_round(1)
        fleet.wait_round(1)
        fleet.publish_round(2)
        fleet.wait_round(2)
        assert events.count("consumer_cancelled") == 0 and manager.status().degraded == ()
        _assert_exactly(fleet, [0, 1, 2], skip=(culprit,))
        assert fleet.got[culprit] == [0, "bad", 1, 2]  # acked once: never redelivered
        assert events.count("disconnected") == 0
        record("consumer_isolation_double_ack", consumers=N, cancelled=events.count("consumer_cancelled"),
               refused=len(refused), lost=0, duplicates=0)
    finally:
        fleet.cleanup()


def test_1000_consumers_all_deliver_again_soon_after_a_forced_close(rabbit) -> None:
    """``rabbitmqctl close_connection`` on our own connection: every consumer back, nothing lost or doubled.

    The restore is pipelined (a round trip per channel of consumers, not per
    consumer); the time is recorded for ``docs/reliability.rst``, not asserted.
    """
    manager, events, name = rabbit(backoff={"min": 0.05, "max": 1.0})
    assert manager.wait_connected(10)
    before = resources()
    fleet = Fleet(manager, unique("ck-scale-close"), count=1000)
    try:
        fleet.publish_round(0)
        fleet.wait_round(0)
        loaded = resources()
        close_connection(name, "carrot_kombu consumer scale test")
        assert wait_until(lambda: events.count("disconnected") == 1, 30)
        lost_at = time.monotonic()
        fleet.publish_round(1)
        fleet.wait_round(1, timeout=60)
        back_s = time.monotonic() - lost_at
        _assert_exactly(fleet, [0, 1], skip=())
        record("consumers_forced_close", consumers=len(fleet.queues), back_s=round(back_s, 2),
               threads_added=loaded["threads"] - before["threads"],
               rss_kib_per_consumer=round((loaded["rss_mb"] - before["rss_mb"]) * 1024 / len(fleet.queues), 1))
    finally:
        fleet.cleanup()
