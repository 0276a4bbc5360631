"""The asyncio API (carrot_kombu.aio) and publish_async / republish=False, on memory:// and faulty://."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import kombu
import pytest

from carrot_kombu import (
    AsyncConnectionManager,
    ConfigurationError,
    Disconnected,
    OutcomeUnknown,
    PublishTimeout,
)
from carrot_kombu._deadline import Deadline
from carrot_kombu._link import Outbound
from carrot_kombu.publisher import Publisher, _Pending
from tests.fakebroker import FakeBroker
from tests.support import until as _until

FAST = {"backoff": {"min": 0.01, "max": 0.05, "jitter": False}}


@pytest.mark.asyncio
async def test_publish_confirmed_then_consume_ack_and_break_cancels_the_subscription():
    async with AsyncConnectionManager("memory://", **FAST) as m:
        assert m.status().state.value == "CONNECTED"
        assert repr(m).startswith("<AsyncConnectionManager [CONNECTED memory://") and "owned" in repr(m)
        await m.declare(kombu.Queue("aio-work"))
        for n in range(3):
            await m.publish({"n": n}, routing_key="aio-work")
        await m.publish_many([{"n": 3}, {"n": 4}], routing_key="aio-work")
        got = []
        messages = m.consume("aio-work", prefetch_count=10)
        async for message in messages:
            got.append(message.body)
            await message.ack()
            if len(got) == 5:
                break
        assert got == [{"n": n} for n in range(5)]
        # The iteration ended: the loop finalizes the iterator, which cancels the subscription.
        assert await _until(lambda: messages.consumer is not None and not messages.consumer.active)
    assert m.status().state.value == "STOPPED"


@pytest.mark.asyncio
async def test_bad_input_raises_at_once_naming_the_field_and_nothing_is_sent():
    async with AsyncConnectionManager("memory://", **FAST) as m:
        with pytest.raises(TypeError, match="republish"):
            await m.publish(b"x", routing_key="q", republish="no")
        with pytest.raises(TypeError, match="headers"):
            await m.publish(b"x", routing_key="q", headers=[1])
        with pytest.raises(TypeError, match="routing_key"):
            await m.publish(b"x", routing_key=5)
        with pytest.raises(TypeError, match="timeout"):
            await m.publish(b"x", routing_key="q", timeout="soon")
        with pytest.raises(TypeError, match="prefetch_count"):
            m.consume("q", prefetch_count="10")
        with pytest.raises(ConfigurationError, match="prefetch_count"):
            m.consume("q", prefetch_count=0)
        assert m.manager._core.publisher.pending_count() == 0
    with pytest.raises(TypeError, match="start_timeout"):
        AsyncConnectionManager("memory://", start_timeout="x")
    with pytest.raises(ConfigurationError):
        AsyncConnectionManager("memory://", heartbeat=-1)
    with pytest.raises(TypeError, match="republish"):
        AsyncConnectionManager("memory://").manager.publish(b"x", republish=None)


@pytest.mark.asyncio
async def test_one_tasks_bad_publish_never_fails_anothers():
    async with AsyncConnectionManager("memory://", **FAST) as m:
        await m.declare(kombu.Queue("aio-iso"))

        async def good(n):
            await m.publish({"n": n}, routing_key="aio-iso")
            return n

        async def bad():
            await m.publish(object(), routing_key="aio-iso")  # JSON cannot carry it

        results = await asyncio.gather(*[good(n) for n in range(20)], bad(), *[good(n) for n in range(20, 40)],
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and not isinstance(errors[0], Disconnected)
        assert sorted(r for r in results if isinstance(r, int)) == list(range(40))
        with m.manager.channel() as lease:
            assert lease.queue_declare("aio-iso", passive=True).message_count == 40


@pytest.mark.asyncio
async def test_start_waits_bounded_and_a_refused_connection_raises(make_manager, faults):
    faults.refuse = -1
    started = time.monotonic()
    with pytest.raises(Disconnected, match="not connected within 0.3s"):
        async with AsyncConnectionManager("faulty://", start_timeout=0.3, **FAST):
            pass  # pragma: no cover
    assert time.monotonic() - started < 3
    manager, _ = make_manager()
    m = AsyncConnectionManager.wrap(manager)
    assert await m.wait_connected(0.2) is False
    faults.refuse = 0
    assert await m.wait_connected(5) is True


@pytest.mark.asyncio
async def test_async_with_fails_within_start_timeout_against_a_peer_that_never_answers():
    """TCP accepted (the listen backlog), no AMQP answer: Disconnected after start_timeout, not connection_timeout."""
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        began = time.monotonic()
        with pytest.raises(Disconnected, match="not connected within 0.5s"):
            async with AsyncConnectionManager(url, start_timeout=0.5, connection_timeout=10, heartbeat=0, **FAST):
                pass
        assert time.monotonic() - began < 0.5 + 1.0 + 1.0  # start_timeout + FAILED_START_STOP + slack


@pytest.mark.asyncio
async def test_publish_while_disconnected_times_out_not_sent_and_is_forgotten(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    m = AsyncConnectionManager.wrap(manager)
    with pytest.raises(PublishTimeout) as info:
        await m.publish(b"x", routing_key="q", timeout=0.2)
    assert info.value.outcome == "not_sent"
    assert manager._core.publisher.pending_count() == 0


@pytest.mark.asyncio
async def test_a_cancelled_publish_is_forgotten_never_published_later(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    manager.declare(kombu.Queue("aio-cancel"))
    m = AsyncConnectionManager.wrap(manager)
    task = asyncio.ensure_future(m.publish(b"cancelled", routing_key="aio-cancel", timeout=30))
    assert await _until(lambda: manager._core.publisher.pending_count() == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert manager._core.publisher.pending_count() == 0
    faults.refuse = 0
    assert await m.wait_connected(5)
    await m.publish(b"after", routing_key="aio-cancel")
    with manager.channel() as lease:
        assert lease.queue_declare("aio-cancel", passive=True).message_count == 1


@pytest.mark.asyncio
async def test_publishes_waiting_for_a_connection_are_confirmed_once_it_comes(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    manager.declare(kombu.Queue("aio-later"))
    m = AsyncConnectionManager.wrap(manager)
    tasks = [asyncio.ensure_future(m.publish({"n": n}, routing_key="aio-later")) for n in range(10)]
    assert await _until(lambda: manager._core.publisher.pending_count() == 10)
    faults.refuse = 0
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert await m.wait_connected(5)  # confirms may come before the link is reported live
    with manager.channel() as lease:
        assert lease.queue_declare("aio-later", passive=True).message_count == 10


@pytest.mark.asyncio
async def test_a_full_pending_table_is_waited_for_off_the_loop(make_manager, faults):
    """max_pending=2 with 5 publishers: the loop keeps running (a ticker advances) while they wait."""
    faults.refuse = -1
    manager, events = make_manager(max_pending=2)
    assert events.wait_count("connect_failed", 1)
    manager.declare(kombu.Queue("aio-full"))
    m = AsyncConnectionManager.wrap(manager)
    tasks = [asyncio.ensure_future(m.publish({"n": n}, routing_key="aio-full", timeout=10)) for n in range(5)]
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.ensure_future(ticker())
    assert await _until(lambda: ticks > 20)  # the loop is not held by the three waiting for a slot
    assert manager._core.publisher.pending_count() == 2
    faults.refuse = 0
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    t.cancel()
    assert await m.wait_connected(5)
    with manager.channel() as lease:
        assert lease.queue_declare("aio-full", passive=True).message_count == 5


@pytest.mark.asyncio
async def test_a_message_waiting_for_a_slot_is_never_written_after_its_caller_is_gone(make_manager, faults):
    """max_pending=2, both slots taken: the helper holds the rest; cancelled / not_sent ones never go out."""
    faults.refuse = -1
    manager, events = make_manager(max_pending=2)
    assert events.wait_count("connect_failed", 1)
    manager.declare(kombu.Queue("aio-gone"))
    m = AsyncConnectionManager.wrap(manager)
    kept = [asyncio.ensure_future(m.publish({"kept": n}, routing_key="aio-gone", timeout=10)) for n in range(2)]
    assert await _until(lambda: manager._core.publisher.pending_count() == 2)
    cancelled_task = asyncio.ensure_future(m.publish({"gone": "task"}, routing_key="aio-gone", timeout=10))
    timed_out = asyncio.ensure_future(m.publish({"gone": "timeout"}, routing_key="aio-gone", timeout=0.2))
    cancelled_future = manager.publish_async({"gone": "future"}, routing_key="aio-gone", timeout=10)
    await asyncio.sleep(0.05)  # the three are held by the helper thread (no free slot)
    cancelled_task.cancel()
    assert cancelled_future.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled_task
    with pytest.raises(PublishTimeout) as info:
        await timed_out
    assert info.value.outcome == "not_sent"
    faults.refuse = 0
    await asyncio.wait_for(asyncio.gather(*kept), 10)
    await m.publish({"after": 1}, routing_key="aio-gone", timeout=10)  # written after anything held before it
    assert manager._core.publisher.pending_count() == 0
    with manager.channel() as lease:
        bodies = []
        while (message := lease.basic_get("aio-gone", no_ack=True)) is not None:
            bodies.append(message.body)
    assert len(bodies) == 3, bodies


@pytest.mark.asyncio
async def test_events_iterator_sees_connected_and_ends_after_stopped(make_manager, faults):
    manager, _ = make_manager(start=False)
    m = AsyncConnectionManager.wrap(manager)
    seen = []

    async def watch():
        async for event in m.events():
            seen.append(event.name)

    watcher = asyncio.ensure_future(watch())
    await asyncio.sleep(0)  # the iterator subscribes on its first step
    manager.start()
    assert await m.wait_connected(5)
    assert await _until(lambda: "connected" in seen)
    await asyncio.get_running_loop().run_in_executor(None, manager.stop)
    await asyncio.wait_for(watcher, 5)
    assert seen[-1] == "stopped" and seen.index("connecting") < seen.index("connected")


@pytest.mark.asyncio
async def test_the_consumer_buffer_is_bounded_by_prefetch_and_async_with_cancels():
    async with AsyncConnectionManager("memory://", **FAST) as m:
        await m.declare(kombu.Queue("aio-bound"))
        await m.publish_many([{"n": n} for n in range(30)], routing_key="aio-bound")
        async with m.consume("aio-bound", prefetch_count=4) as messages:
            assert await _until(lambda: len(messages._buffer) == 4)
            first = await messages.get()
            assert len(messages._buffer) <= 4
            await first.ack()
            assert first.redelivered is False and first.delivery_tag is not None
            rest = []
            for _ in range(29):
                message = await asyncio.wait_for(messages.get(), 5)
                rest.append(message.body["n"])
                await message.ack()
            assert rest == list(range(1, 30))
            assert len(messages._buffer) == 0
        assert not messages.consumer.active
        with pytest.raises(StopAsyncIteration):
            await messages.get()


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["async with", "async for"])
async def test_a_task_cancelled_while_subscribing_leaves_no_subscription(mode):
    async with AsyncConnectionManager("memory://", **FAST) as m:
        await m.declare(kombu.Queue("aio-cancel-sub"))
        manager = m.manager
        made = []
        subscribing = threading.Event()
        release = threading.Event()
        consume = manager.consume

        def slow_consume(*args, **kwargs):
            # The subscription is in progress (in the executor) when the task is cancelled.
            subscribing.set()
            assert release.wait(5)
            consumer = consume(*args, **kwargs)
            made.append(consumer)
            return consumer

        manager.consume = slow_consume

        async def handler():
            if mode == "async with":
                async with m.consume("aio-cancel-sub", prefetch_count=2) as messages:
                    async for message in messages:
                        await message.ack()
            else:
                async for message in m.consume("aio-cancel-sub", prefetch_count=2):
                    await message.ack()

        task = asyncio.ensure_future(handler())
        assert await _until(subscribing.is_set)
        task.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _until(lambda: len(made) == 1)
        assert await _until(lambda: not made[0].active), "the subscription outlived its cancelled task"
        assert not m._consumers


@pytest.mark.asyncio
async def test_a_wrapped_manager_keeps_running_after_the_async_side_stops(make_manager):
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    async with AsyncConnectionManager.wrap(manager) as m:
        await m.declare(kombu.Queue("aio-shared"))
        await m.publish(b"async", routing_key="aio-shared")
    assert manager.connected
    manager.publish(b"sync", routing_key="aio-shared")
    with manager.channel() as lease:
        assert lease.queue_declare("aio-shared", passive=True).message_count == 2
    with pytest.raises(TypeError, match="ConnectionManager"):
        AsyncConnectionManager.wrap(object())


# -- publish_async (concurrent.futures) ------------------------------------------------------


def test_publish_async_resolves_and_calls_back_on_the_callback_thread(make_manager):
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    manager.declare(kombu.Queue("pa"))
    futures = [manager.publish_async({"n": n}, routing_key="pa") for n in range(20)]
    threads = []
    futures[-1].add_done_callback(lambda f: threads.append(threading.current_thread().name))
    done, not_done = concurrent.futures.wait(futures, timeout=5)
    assert not not_done and all(f.result() is None for f in futures)
    deadline = time.monotonic() + 5
    while not threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads and threads[0] == "carrot-kombu-callbacks"
    with manager.channel() as lease:
        assert lease.queue_declare("pa", passive=True).message_count == 20


def test_a_slow_done_callback_delays_no_other_futures_timeout(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    release = threading.Event()
    entered = threading.Event()

    def slow(future):
        entered.set()
        release.wait(10)

    try:
        manager.publish_async(b"a", routing_key="q", timeout=0.05).add_done_callback(slow)
        assert entered.wait(5)  # the slow callback is running
        began = time.monotonic()
        with pytest.raises(PublishTimeout):
            manager.publish_async(b"b", routing_key="q", timeout=0.3).result(5)
        assert time.monotonic() - began < 2.0  # its own timeout, not the other caller's callback
    finally:
        release.set()


def test_a_done_callback_may_wait_for_another_publish_async(make_manager):
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    manager.declare(kombu.Queue("pa-nested"))
    inner = []
    called = threading.Event()

    def publish_again(future):
        try:
            inner.append(manager.publish_async(b"inner", routing_key="pa-nested", timeout=5).result(5))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            inner.append(exc)
        called.set()

    manager.publish_async(b"outer", routing_key="pa-nested").add_done_callback(publish_again)
    assert called.wait(10)
    assert inner == [None]


def test_publish_async_errors_are_the_sync_ones(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    with pytest.raises(TypeError, match="republish"):
        manager.publish_async(b"x", republish=1)
    with pytest.raises(kombu.exceptions.EncodeError):  # what the sync publish raises for it
        manager.publish_async(object())
    future = manager.publish_async(b"x", routing_key="q", timeout=0.2)
    with pytest.raises(PublishTimeout) as info:
        future.result(timeout=5)
    assert info.value.outcome == "not_sent"
    cancelled = manager.publish_async(b"y", routing_key="q", timeout=30)
    assert manager._core.publisher.pending_count() == 1
    assert cancelled.cancel()
    assert manager._core.publisher.pending_count() == 0
    manager.stop()
    with pytest.raises(Disconnected):
        manager.publish_async(b"z", routing_key="q")
    # The cancelled future's timer went with it: nothing keeps the completion thread up.
    completions = manager._core.publisher.completions
    deadline = time.monotonic() + 5
    while completions._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert completions._worker is None


def test_publish_async_of_a_stopping_manager_fails_with_disconnected(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    future = manager.publish_async(b"x", routing_key="q", timeout=30)
    manager.stop()
    with pytest.raises(Disconnected, match="stopped"):
        future.result(timeout=5)


# -- republish=False: the publisher's books ---------------------------------------------------------


class _Channel:
    """A confirm channel that records writes and never confirms by itself."""

    reply_timeout = 1.0

    def __init__(self):
        self.written = []
        self.next_tag = 1

    def write(self, messages, on_queued, deadline=None, flush=True):
        first = self.next_tag
        self.next_tag += len(messages)
        on_queued(first, True)
        self.written.extend(messages)

    def failure(self):
        return None


def _publisher_with_channel():
    publisher = Publisher(max_pending=10)
    channel = _Channel()
    publisher._channel = channel
    publisher._generation = 1
    return publisher, channel


def test_republish_false_is_settled_unknown_after_a_loss_and_never_written_again():
    publisher, channel = _publisher_with_channel()
    reports = []
    pendings = [_Pending(1, Outbound("", "q", {}, b"once"), republish=False),
                _Pending(2, Outbound("", "q", {}, b"again"))]
    submission, rest = publisher.submit(pendings, Deadline.after(30), reports.append)
    assert rest == [] and len(channel.written) == 2 and reports == []
    publisher.detach(1)  # the connection is lost before any confirm
    assert pendings[0].outcome == "unknown" and pendings[1].outcome is None
    # The next channel gets only the message that may be published again.
    again = _Channel()

    class _Link:
        generation = 2

        def open_confirm_channel(self, hooks):
            return again

    publisher.attach(_Link())
    assert [m.body for m in again.written] == [b"again"]
    publisher._on_confirm(1, False, True)
    assert reports == [submission]
    assert isinstance(submission.error, OutcomeUnknown) and isinstance(submission.error, Disconnected)
    assert submission.error.outcome == "unknown" and "republish=False" in str(submission.error)


def test_republish_false_not_yet_written_is_sent_once_on_the_next_connection():
    publisher = Publisher(max_pending=10)  # no channel: nothing is written
    pending = _Pending(1, Outbound("", "q", {}, b"once"), republish=False)
    reports = []
    submission, rest = publisher.submit([pending], Deadline.after(30), reports.append)
    publisher.detach()
    assert pending.outcome is None
    channel = _Channel()

    class _Link:
        generation = 1

        def open_confirm_channel(self, hooks):
            return channel

    publisher.attach(_Link())
    assert [m.body for m in channel.written] == [b"once"]
    publisher._on_confirm(1, False, True)
    assert reports == [submission] and submission.error is None


def test_a_submission_reports_once_even_when_expiry_races_the_confirm():
    publisher, channel = _publisher_with_channel()
    reports = []
    pending = _Pending(1, Outbound("", "q", {}, b"x"))
    submission, _ = publisher.submit([pending], Deadline.after(30), reports.append)
    submission.expire()
    publisher._on_confirm(1, False, True)
    assert reports == [submission] and isinstance(submission.error, PublishTimeout)
    assert submission.error.outcome == "unknown"  # it was written
    assert publisher.pending_count() == 0


@pytest.mark.asyncio
async def test_a_consumer_thread_waiting_for_a_buffer_slot_ends_when_its_consumer_is_cancelled_elsewhere(
        make_manager):
    """The manager's own Consumer cancelled behind the async side's back (not through it): the thread ends."""
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    m = AsyncConnectionManager.wrap(manager)
    await m.declare(kombu.Queue("aio-cancelled-elsewhere"))
    await m.publish_many([{"n": n} for n in range(10)], routing_key="aio-cancelled-elsewhere")
    messages = m.consume("aio-cancelled-elsewhere", prefetch_count=2)
    await messages.start()
    assert await _until(lambda: len(messages._buffer) == 2)  # its thread now waits for a slot

    def consumer_threads():
        # The dispatcher threads (shared by a manager's consumers): the one
        # running the blocked callback, then none once the only consumer is gone.
        return [t for t in threading.enumerate() if t.name.startswith("carrot-kombu-consumer")]

    assert consumer_threads()
    await asyncio.get_running_loop().run_in_executor(None, messages.consumer.cancel)
    assert await _until(lambda: not consumer_threads(), timeout=5)
    await messages.cancel()


def test_a_consumer_whose_loop_closed_without_cancelling_ends_and_gives_deliveries_back(make_manager):
    manager, _ = make_manager("memory://")
    assert manager.wait_connected(5)
    manager.declare(kombu.Queue("aio-orphan"))

    async def handler():
        m = AsyncConnectionManager.wrap(manager)
        consumer = m.consume("aio-orphan", prefetch_count=5)
        await m.publish(b"first", routing_key="aio-orphan")
        message = await consumer.get()
        await message.ack()
        return consumer  # a bug in the app, or a loop torn down: never cancelled

    consumer = asyncio.run(handler())
    assert consumer.consumer.active
    for n in range(3):
        manager.publish({"n": n}, routing_key="aio-orphan")
    deadline = time.monotonic() + 5
    while consumer.consumer.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not consumer.consumer.active  # the subscription ended with its loop
    with manager.channel() as lease:
        bodies = []
        while (message := lease.basic_get("aio-orphan", no_ack=True)) is not None:
            bodies.append(message.body)
    assert sorted(bodies) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']  # all given back, none lost


def test_the_helper_threads_end_when_the_manager_stops(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager(max_pending=1)
    assert events.wait_count("connect_failed", 1)
    first = manager.publish_async(b"a", routing_key="q", timeout=30)
    second = manager.publish_async(b"b", routing_key="q", timeout=30)  # waits for a slot on the helper thread

    publisher = manager._core.publisher

    def helpers():
        return [h._worker for h in (publisher.completions, publisher.waiting, publisher.callbacks)
                if h._worker is not None]

    assert publisher.completions._worker is not None  # its timers
    manager.stop()
    for future in (first, second):
        with pytest.raises(Disconnected):
            future.result(timeout=5)
    deadline = time.monotonic() + 5
    while helpers() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not helpers()


def test_handoff_runs_work_in_order_and_timers_unless_cancelled():
    from carrot_kombu._deadline import clock
    from carrot_kombu._handoff import Handoff

    handoff = Handoff("carrot-kombu-test-handoff", idle=0.2)
    done = threading.Event()
    ran = []
    handoff.call_at(clock() + 0.05, lambda: (ran.append("timer"), done.set()))
    cancelled = handoff.call_at(clock() + 0.01, lambda: ran.append("cancelled"))
    handoff.cancel(cancelled)
    for n in range(3):
        handoff.call(lambda n=n: ran.append(n))
    handoff.call(lambda: 1 / 0)  # logged; the thread goes on
    assert done.wait(5)
    assert ran == [0, 1, 2, "timer"]
    handoff.retire()
    deadline = time.monotonic() + 5
    while any(t.name == "carrot-kombu-test-handoff" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "carrot-kombu-test-handoff" for t in threading.enumerate())


@pytest.mark.asyncio
async def test_an_ack_never_blocks_the_loop_while_the_outgoing_buffer_is_full(monkeypatch):
    from carrot_kombu._pyamqp import wire as wire_module

    monkeypatch.setattr(wire_module, "HIGH_WATER", 64 * 1024)
    loop = asyncio.get_running_loop()
    with FakeBroker(heartbeat=0, recv_buffer=65536) as broker:
        m = AsyncConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0, **FAST)
        starting = asyncio.ensure_future(m.start(5))
        peer = await loop.run_in_executor(None, broker.accept)
        await starting
        watchdog = None
        try:
            messages = m.consume("aio-ack-q", prefetch_count=5, declare=False)
            await messages.start()
            consume = await loop.run_in_executor(None, lambda: peer.wait_for(lambda: peer.received("basic.consume")))
            for _ in range(2):
                await loop.run_in_executor(None, lambda: peer.deliver(consume[0].channel, consume[0]["consumer_tag"],
                                                                      body=b"x"))
            got = [await asyncio.wait_for(messages.get(), 5) for _ in range(2)]
            await m.publish(b"first", routing_key="q", timeout=5)  # the confirm channel is open
            # A stalled peer and another thread's big publishes: the buffer is over its high-water mark.
            peer.stop_reading()
            wire = m.manager._core.live.current()._state.wire
            futures = []
            flood = threading.Thread(
                target=lambda: futures.extend(m.manager.publish_async(b"B" * 256 * 1024, routing_key="q", timeout=30)
                                              for _ in range(40)), daemon=True)
            flood.start()
            assert await _until(lambda: wire.stalled_since is not None and wire.pending_output > 64 * 1024)
            # Without the fix the ack waits on the loop for room: bounded here by resuming the peer.
            watchdog = threading.Timer(3.0, peer.resume_reading)
            watchdog.start()
            ack = asyncio.ensure_future(got[0].ack())
            before = loop.time()
            await asyncio.sleep(0.1)
            assert loop.time() - before < 1.0, "the ack blocked the event loop"
            peer.resume_reading()
            await asyncio.wait_for(ack, 10)
            await got[1].ack()
            await loop.run_in_executor(None, lambda: peer.wait_for(lambda: len(peer.received("basic.ack")) == 2))
            flood.join(10)
            for future in futures:
                await asyncio.wait_for(asyncio.wrap_future(future), 10)
            await messages.cancel()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            peer.resume_reading()
            await m.stop(5)
