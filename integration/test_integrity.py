"""Integrity regressions, on the real broker: defects of an earlier version, one test per defect.

Each test states what a user expects; none is marked xfail or skipped.
Faults come from ``rabbitmqctl close_connection`` on our own connections,
the fault proxy, and one private node (small ``max_message_size``, memory
alarm) that the shared broker never sees.  Every wait has a deadline.

    .venv/bin/python -m pytest integration/test_integrity.py -q -p no:cacheprovider
"""

from __future__ import annotations

import datetime
import gc
import logging
import threading
import time
import weakref

import amqp
import kombu
import pytest
from amqp.exceptions import MessageNacked, NotFound, PreconditionFailed

from carrot_kombu import (
    Blocked,
    ChannelLimitReached,
    ConnectionManager,
    ConnectionState,
    Disconnected,
    Nacked,
    PoolTimeout,
    PublishError,
    PublishTimeout,
    Rejected,
    ReplyTimeout,
)

from .broker import close_connection, connection_pids, drain, rabbitmqctl, unique
from .integrity_helpers import (
    Background,
    Collector,
    Interrupted,
    broker_queue_names,
    carrot_threads,
    declare_queue,
    interrupt_after,
    queue_depth,
    timed,
    wait_until,
)
from .nodes import BrokerNode
from .test_core import run_threads

#: ``max_message_size`` of the private node (bytes).
MAX_MESSAGE_SIZE = 65536


@pytest.fixture(scope="module")
def small_node():
    """A private node with a small ``max_message_size``; one test also raises its memory alarm."""
    node = BrokerNode(extra_conf=(f"max_message_size = {MAX_MESSAGE_SIZE}",))
    try:
        node.start()
        yield node
    finally:
        node.stop()


def pending_publishes(manager: ConnectionManager) -> int:
    """Messages admitted by ``publish`` and not settled yet (there is no public view of this)."""
    return manager._core.publisher.pending_count()


def read_back(manager: ConnectionManager, queue: str, expected: set, timeout: float = 10.0) -> list:
    """Every body in ``queue`` once ``expected`` all arrived and the queue went quiet (duplicates kept)."""
    with Collector(manager, queue) as got:
        missing = got.wait_for(expected, timeout)
        assert missing == set(), f"{len(missing)} message(s) missing from {queue}, e.g. {sorted(missing)[:5]}"
        got.wait_quiet(0.3, 3)
        return got.snapshot()


# -- 1. confirm numbering ----------------------------------------------------------------------------


def test_publishes_failing_before_the_wire_do_not_shift_confirm_numbering(rabbit, small_node):
    """Blocked, a routing key over 255 bytes, a routing key that is no str: no delivery tag is taken."""
    manager, _, _ = rabbit(small_node.url, blocked_timeout=0.5)
    assert manager.wait_connected(10)
    stored = declare_queue(manager, unique("ck-num-ok"))
    full = {"x-max-length": 1, "x-overflow": "reject-publish"}  # the second message is nacked
    full_for_manager = declare_queue(manager, unique("ck-num-full"), **full)
    full_for_lease = declare_queue(manager, unique("ck-num-full"), **full)

    def lease_publish(body: str, routing_key, lease) -> None:
        lease.basic_publish_confirm(amqp.Message(body), exchange="", routing_key=routing_key, timeout=5)

    lease = manager.open_channel(timeout=5)
    try:
        manager.publish("warm-manager", routing_key=stored, timeout=5)
        lease_publish("warm-lease", stored, lease)

        small_node.alarm(True)
        try:
            # The broker blocks the connection when it next publishes; that message, written, waits
            # for its confirm no longer than blocked_timeout (not its own 30 s).
            trigger = Background(lambda: manager.publish("trigger", routing_key=stored, timeout=30))
            assert wait_until(lambda: manager.blocked, 10), "the broker never blocked the connection"
            assert trigger.wait(5), "the publish that triggered the block was not bounded by blocked_timeout"
            assert isinstance(trigger.error, Blocked) and "may have been stored" in str(trigger.error), \
                repr(trigger.error)
            with pytest.raises(Blocked):
                manager.publish("blocked-manager", routing_key=stored, timeout=5)
            with pytest.raises(Blocked):
                lease_publish("blocked-lease", stored, lease)
            # A publish timeout shorter than blocked_timeout is kept too.
            error, elapsed = timed(lambda: manager.publish("blocked-short", routing_key=stored, timeout=0.2))
            assert isinstance(error, PublishTimeout) and error.outcome == "not_sent", repr(error)
            assert elapsed < 0.45, f"publish(timeout=0.2) returned after {elapsed:.2f}s while blocked"
            # A lease that needs a new channel keeps its own timeout too, and says why (found by attack).
            extra = []
            try:
                start = time.monotonic()
                with pytest.raises(Blocked):
                    while len(extra) < 20:  # idle channels come first; the first new one meets the block
                        extra.append(manager.open_channel(timeout=0.3))
                assert time.monotonic() - start < 1.0
            finally:
                for held in extra:
                    held.release()
        finally:
            small_node.alarm(False)

        with pytest.raises(ValueError, match="routing_key"):
            manager.publish("long-manager", routing_key="k" * 256, timeout=5)
        with pytest.raises(TypeError, match="routing_key"):
            manager.publish("int-manager", routing_key=42, timeout=5)
        with pytest.raises(ValueError, match="routing_key"):
            lease_publish("long-lease", "k" * 256, lease)
        with pytest.raises(TypeError, match="routing_key"):
            lease_publish("int-lease", 42, lease)

        # Confirms still settle the message they belong to.
        manager.publish("first-manager", routing_key=full_for_manager, timeout=5)
        with pytest.raises(Nacked):
            manager.publish("second-manager", routing_key=full_for_manager, timeout=5)
        manager.publish("after-manager", routing_key=stored, timeout=5)
        lease_publish("first-lease", full_for_lease, lease)
        with pytest.raises(MessageNacked):
            lease_publish("second-lease", full_for_lease, lease)
        lease_publish("after-lease", stored, lease)
    finally:
        lease.release()

    for queue, expected in (
        (stored, {"warm-manager", "warm-lease", "trigger", "after-manager", "after-lease"}),
        (full_for_manager, {"first-manager"}),
        (full_for_lease, {"first-lease"}),
    ):
        assert sorted(read_back(manager, queue, expected)) == sorted(expected)


# -- 2. one refused publish fails alone --------------------------------------------------------------


@pytest.mark.parametrize("fault", ["missing_exchange", "too_large", "unattributed"])
def test_a_publish_the_broker_refuses_fails_only_its_caller(rabbit, request, monkeypatch, fault):
    """404 (no such exchange) or 406 (over max_message_size): Rejected at once, in that call only.

    ``unattributed``: as if the broker's text named nothing we recognise.  The
    messages in flight are published again one at a time, so the refusal
    still falls on the one caller that caused it.
    """
    if fault == "unattributed":
        import carrot_kombu.publisher as publisher_module

        monkeypatch.setattr(publisher_module, "_culprits", lambda error, unsettled: unsettled if len(unsettled) == 1 else [])
    if fault == "too_large":
        manager, events, _ = rabbit(request.getfixturevalue("small_node").url)
        code, named = 406, str(MAX_MESSAGE_SIZE)
    else:
        manager, events, _ = rabbit()
        code, named = 404, unique("ck-no-such-ex")
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-refused"))

    def refused() -> None:
        if fault == "too_large":
            manager.publish(b"x" * (MAX_MESSAGE_SIZE + 1024), routing_key=queue, timeout=3)
        else:
            manager.publish("refused", exchange=named, routing_key="k", timeout=3)

    progress = [0]
    lock = threading.Lock()

    def work(worker: int) -> None:
        for i in range(200):
            manager.publish(f"{worker}-{i}", routing_key=queue, timeout=15)
            with lock:
                progress[0] += 1

    errors: list[BaseException] = []
    workers = Background(lambda: errors.extend(run_threads(work, 4, timeout=40)))
    for round_ in range(3):
        assert wait_until(lambda: progress[0] >= 100 * (round_ + 1) or workers.done.is_set(), 15)
        error, elapsed = timed(refused)
        assert isinstance(error, Rejected), f"round {round_}: {error!r}"
        assert isinstance(error, PublishError)
        assert error.reply_code == code and named in error.reply_text, f"round {round_}: {error}"
        assert elapsed < 2, f"round {round_}: Rejected came after {elapsed:.1f}s (publish timeout 3s)"
    assert workers.wait(45)
    assert workers.error is None and errors == [], f"other publishers failed: {workers.error!r} {errors!r}"
    expected = {f"{w}-{i}" for w in range(4) for i in range(200)}
    assert set(read_back(manager, queue, expected, 15)) == expected  # at-least-once; nothing refused stored

    start = time.monotonic()
    for i in range(500):
        manager.publish(f"after-{i}", routing_key=queue, timeout=10)
    elapsed = time.monotonic() - start
    assert elapsed < 5, f"500 confirmed publishes took {elapsed:.1f}s after the refusals"
    assert events.count("disconnected") == 0


# -- 3. an unencodable message ------------------------------------------------------------------------


def test_an_unencodable_message_fails_in_its_caller_and_is_never_sent(rabbit):
    manager, events, name = rabbit()
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-unencodable"))
    manager.publish("before", routing_key=queue, timeout=5)
    pids = connection_pids(name)

    # Another thread holds a lease through it all.
    held, go = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def hold() -> None:
        with manager.channel(timeout=5) as lease:
            held.set()
            go.wait(30)
            seen["valid"] = lease.valid
            seen["count"] = lease.queue_declare(queue, passive=True).message_count

    holder = Background(hold)
    assert held.wait(10)

    cases = [
        ("a header int of 2**64", dict(headers={"huge": 2**64}), ValueError, "huge"),
        ("a set header value", dict(headers={"tags": {"a", "b"}}), TypeError, "tags"),
        ("an int expiration", dict(expiration=60000), TypeError, "expiration"),
        ("a routing key of 256 bytes", dict(routing_key="r" * 256), ValueError, "routing_key"),
        ("an exchange name of 256 bytes", dict(exchange="e" * 256), ValueError, "exchange"),
        ("a NaN header", dict(headers={"ratio": float("nan")}), ValueError, "ratio"),
        ("an infinite nested header", dict(headers={"deep": [{"x": float("inf")}]}), ValueError, "deep"),
        ("an expiration that is not digits", dict(expiration="-5"), ValueError, "expiration"),
        ("delivery_mode 3", dict(delivery_mode=3), ValueError, "delivery_mode"),
        ("an unknown property", dict(priorty=5), TypeError, "priorty"),
        ("a bytes exchange", dict(exchange=b"amq.direct"), TypeError, "exchange"),
        ("headers larger than a frame", dict(headers={"big": "h" * 200_000}), ValueError, "frame_max"),
    ]
    for what, kwargs, kind, field in cases:
        kwargs.setdefault("routing_key", queue)
        error, elapsed = timed(lambda: manager.publish(f"bad: {what}", timeout=5, **kwargs))
        assert isinstance(error, kind), f"{what}: {error!r}"
        assert field in str(error), f"{what}: the error does not name {field!r}: {error}"
        assert elapsed < 1, f"{what}: took {elapsed:.1f}s to fail"
    with manager.channel(timeout=5) as lease:
        with pytest.raises(ValueError, match="huge"):
            lease.basic_publish(amqp.Message("bad: on a lease", application_headers={"huge": 2**64}),
                                exchange="", routing_key=queue)
        assert lease.queue_declare(queue, passive=True).queue == queue  # the same lease goes on

    go.set()
    assert holder.wait(10)
    assert holder.error is None, f"a lease held by another thread broke: {holder.error!r}"
    assert seen == {"valid": True, "count": 1}
    assert events.count("disconnected") == 0

    # Never published later, not even after a reconnect.
    assert close_connection(name) == pids[0], "the connection was replaced"
    assert events.wait_count("connected", 2, timeout=15)
    manager.publish("after", routing_key=queue, timeout=10)
    assert sorted(read_back(manager, queue, {"before", "after"})) == ["after", "before"]


# -- 4. publish_many admission --------------------------------------------------------------------------


@pytest.mark.parametrize("threads, batch, max_pending", [(4, 200, 10), (5, 500, 1000)])
def test_concurrent_publish_many_never_deadlocks(rabbit, threads, batch, max_pending):
    """Every batch returns as soon as it is confirmed, round after round.

    A batch that returns only when its timeout runs out, its messages long
    confirmed, lost a wake-up: with ``timeout=None`` it would never return.
    """
    manager, _, _ = rabbit(max_pending=max_pending)
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-many"))
    timeout, rounds = 5.0, 10
    for round_ in range(rounds):
        took: dict[int, float] = {}

        def work(worker: int, round_: int = round_) -> None:
            start = time.monotonic()
            manager.publish_many([f"{round_}-{worker}-{i}" for i in range(batch)], routing_key=queue,
                                 timeout=timeout)
            took[worker] = time.monotonic() - start

        errors = run_threads(work, threads, timeout=3 * timeout)
        assert errors == [], f"round {round_}: {errors!r}"
        slow = {worker: round(seconds, 1) for worker, seconds in took.items() if seconds > timeout / 2}
        assert not slow, f"round {round_}: publish_many of {batch} took {slow} s (timeout {timeout}s)"
    expected = {f"{r}-{w}-{i}" for r in range(rounds) for w in range(threads) for i in range(batch)}
    assert set(read_back(manager, queue, expected, 20)) == expected


# -- 5. stop() ends waiting publishers ----------------------------------------------------------------------


def test_stop_ends_waiting_publishers_at_once(rabbit, proxy):
    manager, _, _ = rabbit(proxy.url(), max_pending=1)
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-stop"))
    manager.publish("warm", routing_key=queue, timeout=5)
    proxy.blackhole()  # the broker goes silent: no confirm comes back

    held = Background(lambda: manager.publish("held", routing_key=queue, timeout=30))
    assert wait_until(lambda: pending_publishes(manager) == 1, 5)
    waiting = Background(lambda: manager.publish("waiting", routing_key=queue, timeout=30))
    assert not waiting.wait(0.3), f"the second publish did not wait for a slot: {waiting.error!r}"

    stopped_at = time.monotonic()
    stopper = Background(lambda: manager.stop(timeout=4))
    for label, publish in (("waiting", waiting), ("held", held)):
        assert publish.wait(2), f"the {label} publish did not end after stop()"
        assert isinstance(publish.error, Disconnected), f"{label}: {publish.error!r}"
        after = publish.ended_at - stopped_at
        assert after < 1.0, f"the {label} publish ended {after:.1f}s after stop()"
    assert stopper.wait(10) and stopper.error is None

    error, elapsed = timed(lambda: manager.publish("late", routing_key=queue, timeout=30))
    assert isinstance(error, Disconnected), repr(error)
    assert elapsed < 0.5, f"a publish after stop() took {elapsed:.1f}s to fail"


# -- 6. an interrupted request ---------------------------------------------------------------------------------


@pytest.mark.parametrize("interruption", ["signal", "reply_timeout"])
def test_an_interrupted_request_never_answers_the_next_borrower(rabbit, proxy, interruption):
    """A request abandoned mid-wait: its late reply must never answer the next borrower's request.

    ``signal``: a SIGALRM handler raises inside the wait (the way Celery's soft
    time limit interrupts a task); ``reply_timeout``: the reply comes after
    ``reply_timeout``.  The reply about queue A arrives late, while the next
    borrower (``pool_limit=1``: the same slot) asks about queue B.
    """
    if interruption == "signal":
        manager, events, _ = rabbit(proxy.url(), pool_limit=1)
        rounds, late, expected = 12, 0.05, Interrupted
    else:
        manager, events, _ = rabbit(proxy.url(), pool_limit=1, reply_timeout=0.5)
        rounds, late, expected = 5, 0.8, ReplyTimeout
    assert manager.wait_connected(10)
    queue_a = declare_queue(manager, unique("ck-rpc-a"))
    queue_b = declare_queue(manager, unique("ck-rpc-b"))
    manager.publish_many(["a1", "a2", "a3"], routing_key=queue_a, timeout=5)
    try:
        for round_ in range(rounds):
            lease = manager.open_channel(timeout=10)
            proxy.latency(late)
            try:
                with pytest.raises(expected):
                    if interruption == "signal":
                        with interrupt_after(0.01 + 0.01 * (round_ % 6)):
                            lease.queue_declare(queue_a, passive=True)
                    else:
                        lease.queue_declare(queue_a, passive=True)
            finally:
                if interruption == "reply_timeout":
                    proxy.heal()
                lease.release()
            with manager.channel(timeout=10) as lease:
                answer = lease.queue_declare(queue_b, passive=True)
                again = lease.queue_declare(queue_b, passive=True)
            assert (answer.queue, answer.message_count) == (queue_b, 0), f"round {round_}: {answer}"
            assert (again.queue, again.message_count) == (queue_b, 0), f"round {round_}: {again}"
    finally:
        proxy.heal()
    assert events.count("disconnected") == 0


def test_the_first_publish_keeps_its_own_timeout_while_the_confirm_channel_opens(rabbit, proxy):
    """The confirm channel is opened on first use; a slow broker must not stretch ``publish(timeout=1)`` to reply_timeout."""
    manager, _, _ = rabbit(proxy.url(), reply_timeout=10)
    assert manager.wait_connected(10)
    proxy.latency(3)
    try:
        start = time.monotonic()
        with pytest.raises(PublishTimeout) as info:
            manager.publish(b"first", routing_key=unique("ck-first"), timeout=1)
        took = time.monotonic() - start
    finally:
        proxy.heal()
    assert took < 1.5, took
    assert info.value.outcome == "not_sent"
    manager.publish(b"second", routing_key=unique("ck-first"), timeout=10)  # the channel came meanwhile


def test_open_channel_keeps_its_timeout_while_the_broker_is_slow(rabbit, proxy):
    """``open_channel(timeout=1)`` waits for the broker's channel.open-ok no longer than 1 s (not reply_timeout)."""
    manager, events, _ = rabbit(proxy.url(), reply_timeout=10, pool_limit=2)
    assert manager.wait_connected(10)
    proxy.latency(3)
    try:
        for _ in range(3):  # more than pool_limit: an abandoned open must not keep its slot
            start = time.monotonic()
            with pytest.raises(PoolTimeout, match="channel.open"):
                manager.open_channel(timeout=1)
            assert time.monotonic() - start < 1.5
    finally:
        proxy.heal()
    leases = [manager.open_channel(timeout=10) for _ in range(2)]
    for lease in leases:
        lease.queue_declare(unique("ck-slow-open"), exclusive=True)
        lease.release()
    assert events.count("disconnected") == 0


@pytest.mark.parametrize("mode", ["publish", "lease", "stopstart"])
def test_a_storm_of_interrupts_never_wedges_a_thread_or_the_manager(amqp_url, mode):
    """Hundreds of exceptions raised into the main thread mid-publish (Ctrl-C, soft time limits).

    In a subprocess (a wedged one must not take pytest with it): whatever an
    interrupt hit, another thread's ``publish(timeout=2)`` keeps returning
    within its timeout, nothing is left holding a lock, and ``stop()`` is
    prompt.  An interrupt that lands while the main thread handles a frame
    drops the connection (documented); it must stay a small minority.
    """
    import json
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "integration.signal_storm", amqp_url, "6", mode],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["wedged"], report
    assert proc.returncode == 0, (report, proc.stderr[-3000:])
    assert report["interrupted"] >= 50, report
    assert report["probes"] >= 10 and report["probe_max"] <= 2.6, report
    assert report["stop_seconds"] < 5, report
    if mode == "stopstart":
        # stop()/start() interrupted anywhere: one event dispatcher at the end (two
        # once raced for the stop mark, and the last stop() waited for ever).
        assert report["dispatchers"] == 1, report
    # Measured: 2-10 % of interrupts land inside a frame's handling (lease mode on a 2-core
    # machine under load: 2-10 of ~90, the same at the start of this round, 12638fa, and
    # now); nothing else may drop the connection (a reused channel id: "504 second
    # 'channel.open' seen", found by attack).
    assert report["other_drops"] == [], report
    assert report["disconnects"] <= max(8, report["interrupted"] // 6), report


# -- 7. a late channel error ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mistake", ["publish_to_missing_exchange", "ack_of_unknown_tag"])
def test_a_late_channel_error_never_reaches_the_next_borrower(rabbit, mistake):
    manager, events, _ = rabbit(pool_limit=1)  # the next borrower gets the same slot
    assert manager.wait_connected(10)
    own = declare_queue(manager, unique("ck-next"))
    missing = unique("ck-no-such-ex")
    for round_ in range(20):
        lease = manager.open_channel(timeout=10)
        if mistake == "publish_to_missing_exchange":
            lease.basic_publish(amqp.Message("lost"), exchange=missing, routing_key="k")
        else:
            lease.basic_ack(987654)
        lease.release()
        with manager.channel(timeout=10) as lease:
            try:
                lease.queue_declare(own, durable=False, auto_delete=False, arguments={"x-expires": 120_000})
                lease.queue_purge(own)
                assert lease.basic_get(own, no_ack=True) is None
                assert lease.queue_declare(own, passive=True).queue == own
            except Exception as exc:
                pytest.fail(f"round {round_}: the next borrower got {type(exc).__name__}: {exc}")
    assert events.count("disconnected") == 0


# -- 8. consumer.cancel() ------------------------------------------------------------------------------------


class _Round:
    """One consume/cancel round: acks every delivery but the first, kept to be acked after cancel()."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kept = None
        self.count = 0
        self.enough = threading.Event()
        self.errors: list[BaseException] = []

    def on_message(self, body, message) -> None:
        try:
            with self.lock:
                keep = self.kept is None
                if keep:
                    self.kept = (body, message)
                self.count += 1
                if self.count >= 5:
                    self.enough.set()
            if not keep:
                message.ack()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)


def test_consumer_cancel_never_kills_the_connection(rabbit):
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-cancel"))
    manager.publish_many([f"m-{i}" for i in range(1000)], routing_key=queue, timeout=10)
    feeding_done = threading.Event()

    def feed() -> None:  # messages keep flowing: the queue never runs dry
        n = 1000
        while not feeding_done.wait(0.05):
            if queue_depth(manager, queue) < 500:
                manager.publish_many([f"m-{i}" for i in range(n, n + 500)], routing_key=queue, timeout=10)
                n += 500

    feeder = Background(feed)
    kept = []
    try:
        for round_ in range(40):
            r = _Round()
            consumer = manager.consume(kombu.Queue(queue), r.on_message, prefetch_count=20, declare=False)
            assert r.enough.wait(5), f"round {round_}: only {r.count} deliveries"
            consumer.cancel()
            body, message = r.kept
            message.ack()  # after cancel(): dropped; the broker delivers it again
            kept.append(body)
            assert r.errors == [], f"round {round_}: {r.errors!r}"
    finally:
        feeding_done.set()
        assert feeder.wait(15)
    assert feeder.error is None, repr(feeder.error)
    assert events.count("disconnected") == 0
    assert manager.status().state is ConnectionState.CONNECTED
    with Collector(manager, queue) as got:
        assert got.wait_for(kept, 15) == set(), "a message acked after cancel() was lost"
        assert set(kept) <= set(got.redelivered)


# -- 9. channel_max / frame_max ------------------------------------------------------------------------------


def test_channel_max_and_frame_max_are_negotiated_and_enforced(rabbit):
    manager, events, _ = rabbit(channel_max=3, pool_limit=3)
    assert manager.wait_connected(10)
    assert manager.status().channel_max == 3
    queue = declare_queue(manager, unique("ck-chmax"))
    manager.publish("x", routing_key=queue, timeout=5)  # the confirm channel: 1 of 3
    leases = [manager.open_channel(timeout=5) for _ in range(2)]  # 3 of 3
    try:
        with pytest.raises(PoolTimeout, match="channel_max"):
            manager.open_channel(timeout=1)
        with pytest.raises(ChannelLimitReached):
            manager.consume(kombu.Queue(queue), lambda body, message: None, declare=False)
        assert manager.status().state is ConnectionState.CONNECTED
        for lease in leases:
            assert lease.valid
            assert lease.queue_declare(queue, passive=True).queue == queue
        manager.publish("y", routing_key=queue, timeout=5)

        # An idle pooled channel keeps its id: discard one to make room (the id is free at close-ok).
        leases.pop().release(discard=True)
        consumers = []

        def subscribed() -> bool:
            try:
                consumers.append(manager.consume(kombu.Queue(queue), lambda body, message: None, declare=False))
            except ChannelLimitReached:
                return False
            return True

        assert wait_until(subscribed, 5)
        consumers[0].cancel()
    finally:
        for lease in leases:
            lease.release()
    assert events.count("disconnected") == 0

    manager, _, _ = rabbit(frame_max=8192)
    assert manager.wait_connected(10)
    assert manager.status().frame_max == 8192
    big = declare_queue(manager, unique("ck-frame"))
    body = bytes(range(256)) * 256  # 64 KiB: nine body frames
    manager.publish(body, routing_key=big, timeout=10)
    with manager.channel(timeout=5) as lease:
        lease.basic_publish(amqp.Message(body[::-1]), exchange="", routing_key=big)
        assert [bytes(b) for b in drain(lease, big, 2)] == [body, body[::-1]]


# -- 10. a rejected declare ------------------------------------------------------------------------------------


def test_a_rejected_declare_is_not_kept(rabbit):
    manager, events, name = rabbit()
    degraded = []
    manager.on("degraded", lambda what, error: degraded.append((what, error)))
    assert manager.wait_connected(10)
    good = kombu.Queue(unique("ck-good"), durable=False, queue_arguments={"x-expires": 120_000})
    manager.declare(good)
    exchange = unique("ck-ex")
    with manager.channel(timeout=5) as lease:
        lease.exchange_declare(exchange, "direct", durable=False, auto_delete=False)
    try:
        with pytest.raises(PreconditionFailed):
            manager.declare(kombu.Exchange(exchange, type="fanout", durable=False))
        with manager.channel(timeout=5) as lease:
            lease.queue_delete(good.name)  # the registered queue must come back on the next connection
        close_connection(name)
        assert events.wait_count("connected", 2, timeout=15)
        status = manager.status()
        assert status.state is ConnectionState.CONNECTED and status.degraded == ()
        assert events.count("connect_failed") == 0 and degraded == []
        manager.publish("usable", routing_key=good.name, timeout=5)
        assert queue_depth(manager, good.name) == 1
    finally:
        with manager.channel(timeout=5) as lease:
            lease.exchange_delete(exchange)


# -- 11. server-named queues and consume's declare ------------------------------------------------------------


def test_server_named_queues_leave_no_orphans_and_consume_declares(rabbit, proxy):
    manager, events, _ = rabbit(proxy.url())
    assert manager.wait_connected(10)
    queue = kombu.Queue("")  # kombu's defaults: durable, not auto-delete
    manager.declare(queue)
    names = [queue.name]
    for round_ in range(2):
        proxy.cut()
        assert events.wait_count("connected", round_ + 2, timeout=10)
        names.append(queue.name)
    assert all(n.startswith("amq.gen-") for n in names) and len(set(names)) == 3, names
    old = set(names[:-1])
    assert wait_until(lambda: not broker_queue_names() & old, 10, interval=0.1), (
        f"orphan server-named queues: {broker_queue_names() & old}")
    assert names[-1] in broker_queue_names()

    fresh = kombu.Queue(unique("ck-fresh"), durable=False, auto_delete=True)
    got = threading.Event()
    consumer = manager.consume(fresh, lambda body, message: (message.ack(), got.set()))
    manager.publish("hello", routing_key=fresh.name, timeout=5)
    assert got.wait(5), "consume() did not declare the queue it consumes"
    consumer.cancel()

    missing = unique("ck-missing")
    with pytest.raises(NotFound):
        manager.consume(kombu.Queue(missing), lambda body, message: None, declare=False)
    proxy.cut()  # nothing registered: nobody subscribes to it on the next connection
    assert events.wait_count("connected", 4, timeout=10)
    assert wait_until(lambda: not any(t.name.endswith(missing) for t in carrot_threads()), 5)
    assert manager.status().degraded == ()
    assert events.count("consumer_cancelled") == 0
    assert missing not in broker_queue_names()


# -- 12. leaks ----------------------------------------------------------------------------------------------


def test_a_lease_dropped_without_release_is_reclaimed(rabbit, caplog):
    caplog.set_level(logging.WARNING, logger="carrot_kombu")
    manager, _, _ = rabbit(pool_limit=2)
    assert manager.wait_connected(10)
    lease = manager.open_channel(timeout=5)
    lease.queue_declare(unique("ck-dropped"), durable=False, auto_delete=True)
    assert manager.status().pool.leased == 1
    del lease
    gc.collect()
    assert wait_until(lambda: manager.status().pool.leased == 0, 5), manager.status().pool
    assert any("without release" in r.getMessage() for r in caplog.records), caplog.text
    leases = [manager.open_channel(timeout=2) for _ in range(2)]  # the whole pool is usable again
    for lease in leases:
        lease.release()


def test_a_manager_dropped_without_stop_ends_its_threads_and_connection(amqp_url):
    name = unique("ck-conn")
    before = carrot_threads()
    manager = ConnectionManager(amqp_url, client_properties={"connection_name": name}).start(wait=10)
    queue = kombu.Queue(unique("ck-drop"), durable=False, auto_delete=True)
    consumer = manager.consume(queue, lambda body, message: message.ack())
    manager.publish("x", routing_key=queue.name, timeout=5)
    with manager.channel(timeout=5) as lease:
        lease.queue_declare(queue.name, passive=True)
    del lease, consumer
    ours = carrot_threads() - before
    assert ours and connection_pids(name)
    collected = weakref.ref(manager)
    del manager
    gc.collect()
    try:
        assert collected() is None, f"the manager is still referenced: {gc.get_referrers(collected())}"
        assert wait_until(lambda: not any(t.is_alive() for t in ours), 5), (
            f"threads still running: {[t.name for t in ours if t.is_alive()]}")
        assert wait_until(lambda: connection_pids(name) == [], 5, interval=0.2), "the connection is still open"
    finally:
        left = collected()
        if left is not None:
            left.stop(timeout=5)


# -- hammering through forced closes --------------------------------------------------------------------------


def test_threads_hammering_leases_and_publish_through_forced_closes(rabbit):
    """8 threads use leases and publish while the broker closes the connection twice.

    Every publish that returned is in the queue; no call outlives its own
    timeout (lease: ``open_channel`` 2 s + ``reply_timeout`` 3 s per request).
    """
    manager, events, name = rabbit(pool_limit=4, reply_timeout=3)
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-hammer"))
    lock = threading.Lock()
    returned: set[str] = set()
    overruns: list[str] = []
    unexpected: list[BaseException] = []
    stop = threading.Event()

    def check(what: str, fn, limit: float, allowed: tuple) -> bool:
        error, elapsed = timed(fn)
        with lock:
            if elapsed > limit + 1.0:
                overruns.append(f"{what} took {elapsed:.1f}s (limit {limit}s): {error!r}")
            if error is not None and not isinstance(error, allowed):
                unexpected.append(error)
        return error is None

    def use_a_lease() -> None:
        with manager.channel(timeout=2) as lease:
            lease.queue_declare(queue, passive=True)

    def work(worker: int) -> None:
        i = 0
        while not stop.wait(0.005):  # leaves some CPU to rabbitmqctl
            i += 1
            body = f"{worker}-{i}"
            check("a lease", use_a_lease, 2 + 3 + 3, (Disconnected, PoolTimeout))
            if check("a publish", lambda: manager.publish(body, routing_key=queue, timeout=5), 5,
                     (Disconnected, PublishTimeout)):
                with lock:
                    returned.add(body)

    (first_pid,) = connection_pids(name)  # looked up before the load: rabbitmqctl is slow under it

    def close_twice() -> None:
        try:
            for k in range(2):
                wait_until(lambda: len(returned) >= 200 * (k + 1), 10)
                if k == 0:
                    rabbitmqctl("close_connection", first_pid, "test forced close")
                else:
                    close_connection(name)
                assert events.wait_count("connected", k + 2, timeout=15), "no reconnect"
            wait_until(lambda: len(returned) >= 600, 10)
        finally:
            stop.set()

    closer = Background(close_twice)
    errors = run_threads(work, 8, timeout=60)
    assert closer.wait(30) and closer.error is None, repr(closer.error)
    assert errors == []
    assert events.count("connected") == 3
    assert unexpected == [], unexpected[:5]
    assert overruns == [], overruns[:5]
    with Collector(manager, queue) as got:
        missing = got.wait_for(returned, 20)
    assert missing == set(), f"{len(missing)} confirmed message(s) lost, e.g. {sorted(missing)[:5]}"


@pytest.mark.parametrize("leftover", ["unacked_get", "tx_select", "basic_qos", "confirm_select"])
def test_what_a_borrower_leaves_on_a_channel_never_reaches_the_next(rabbit, leftover):
    """An unacked basic_get, transaction mode or a prefetch: the channel is closed on release, never pooled.

    Pooled, an unacked message stays unacked (never redelivered) as long as
    the connection lives; a channel in tx mode holds the next borrower's
    publishes until a commit that never comes.
    """
    manager, events, _ = rabbit(pool_limit=1)
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-leftover"))
    manager.publish(b"m1", routing_key=queue, timeout=10)
    with manager.channel() as lease:
        first_channel = lease.channel
        if leftover == "unacked_get":
            assert lease.basic_get(queue).body == b"m1"  # never acked
        elif leftover == "tx_select":
            lease.tx_select()
        elif leftover == "confirm_select":
            lease.confirm_select()  # the next borrower's tx_select would get 406 (found by attack)
        else:
            lease.basic_qos(0, 1, False)
    with manager.channel() as lease:
        assert lease.channel is not first_channel
        if leftover == "unacked_get":
            again = lease.basic_get(queue, no_ack=True)
            assert again is not None and again.body == b"m1" and again.delivery_info["redelivered"]
        elif leftover == "confirm_select":
            lease.tx_select()
            lease.basic_publish(amqp.Message(b"m2", content_type="application/data", content_encoding="binary"),
                                routing_key=queue)
            lease.tx_commit()
        else:
            lease.basic_publish(amqp.Message(b"m2", content_type="application/data", content_encoding="binary"),
                                routing_key=queue)
    if leftover != "unacked_get":
        bodies = {m for m in read_back(manager, queue, {b"m1", b"m2"})}
        assert bodies == {b"m1", b"m2"}  # m2 was not held by a transaction
    with manager.channel() as lease:
        lease.basic_get(queue, no_ack=True)  # an acked-on-receipt get leaves nothing: pooled
        kept = lease.channel
    with manager.channel() as lease:
        assert lease.channel is kept
    assert events.count("disconnected") == 0


def test_a_consumer_whose_channel_the_broker_closes_subscribes_again(rabbit):
    """An ack with an unknown tag makes the broker close the consumer's channel (406).

    The consumer used to stop receiving for ever, silently. It must report it
    (``consumer_cancelled``, ``degraded``), subscribe again and get the
    requeued message and the next ones; a poison message that closes the
    channel every time is retried with backoff, not in a tight loop.
    """
    manager, events, _ = rabbit(backoff={"min": 0.2, "max": 1.0})
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-cons-closed"))
    got: list[str] = []
    bad_acks = [0]
    lock = threading.Condition()

    def callback(body, message):
        with lock:
            got.append(body)
            lock.notify_all()
        if body == "bad" and bad_acks[0] < 1:
            bad_acks[0] += 1
            # Not a delivery of this channel: 406 closes it.  Written on the shared channel itself,
            # around message.channel (which refuses it): the recovery is what is tested here.
            message.channel._chan.basic_ack(999999)
        else:
            message.ack()

    consumer = manager.consume(queue, callback, declare=False)
    try:
        manager.publish("a", routing_key=queue, timeout=5)
        manager.publish("bad", routing_key=queue, timeout=5)
        manager.publish("b", routing_key=queue, timeout=5)
        with lock:
            assert lock.wait_for(lambda: got.count("bad") == 2 and "b" in got, 10), got
        assert wait_until(lambda: manager.status().degraded == (), 5), manager.status().degraded
        assert events.count("consumer_cancelled") == 1 and events.count("disconnected") == 0
    finally:
        consumer.cancel()

    # A poison message: every delivery makes the broker close the channel.
    poison = declare_queue(manager, unique("ck-cons-poison"))
    deliveries = [0]

    def poisoned(body, message):
        deliveries[0] += 1
        message.channel._chan.basic_ack(999999)  # around message.channel, as above

    consumer = manager.consume(poison, poisoned, declare=False)
    try:
        manager.publish("poison", routing_key=poison, timeout=5)
        time.sleep(3)  # the rate is the assertion: what a tight loop would do in 3 s
        assert 2 <= deliveries[0] <= 8, f"{deliveries[0]} redeliveries in 3 s with Backoff(0.2, 1.0)"
    finally:
        consumer.cancel()


def test_a_message_whose_properties_are_not_utf8_never_drops_the_connection(rabbit, amqp_url):
    """Any client can publish ``message_id=b"\\xff\\xfe"``; py-amqp cannot decode it on delivery.

    It used to drop the connection on the reading thread, and the consumer got
    it again on every reconnect, for ever. It is delivered, the invalid bytes
    replaced by U+FFFD; our own publish refuses such a value up front.
    """
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue = declare_queue(manager, unique("ck-not-utf8"))
    with pytest.raises(ValueError, match="message_id must be UTF-8"):
        manager.publish(b"x", routing_key=queue, message_id=b"\xff\xfe", timeout=5)
    raw = amqp.Connection(amqp_url.split("://", 1)[1].split("@", 1)[1].rstrip("/").split("/")[0],
                          userid="guest", password="guest")
    raw.connect()
    try:
        ch = raw.channel()
        ch.basic_publish(amqp.Message(b"poison", message_id=b"\xff\xfe", content_type="application/data",
                                      content_encoding="binary"), routing_key=queue)
        # A header timestamp no datetime can hold (found by the second attack): py-amqp raises
        # OverflowError decoding it. Made by patching py-amqp's encoder here, as a foreign client could.
        import amqp.serialization as serialization
        import types

        real_calendar = serialization.calendar
        serialization.calendar = types.SimpleNamespace(timegm=lambda _: 2**64 - 1)
        try:
            ch.basic_publish(amqp.Message(b"far-future", application_headers={"t": datetime.datetime(2020, 1, 1)},
                                          content_type="application/data", content_encoding="binary"),
                             routing_key=queue)
        finally:
            serialization.calendar = real_calendar
        ch.basic_publish(amqp.Message(b"{not json", content_type="application/json"), routing_key=queue)
        ch.basic_publish(amqp.Message(b"after", content_type="application/data", content_encoding="binary"),
                         routing_key=queue)
    finally:
        raw.close()
    got = []
    done = threading.Event()

    def callback(body, message):
        got.append((body, message.properties.get("message_id"), message.headers.get("t")))
        message.ack()
        if len(got) == 3:
            done.set()

    # prefetch 1: the undecodable JSON body must be rejected, not hold the only slot for ever
    consumer = manager.consume(queue, callback, declare=False, prefetch_count=1)
    try:
        assert done.wait(10), got
    finally:
        consumer.cancel()
    assert got == [(b"poison", "\ufffd\ufffd", None), (b"far-future", None, 2**64 - 1), (b"after", None, None)]
    assert events.count("disconnected") == 0
    with manager.channel() as lease:
        assert lease.queue_declare(queue, passive=True).message_count == 0  # the bad JSON was rejected
