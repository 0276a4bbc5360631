"""The asyncio API on the real broker: integrity through proxy cuts and a restart, isolation, cancellation,
consuming across a forced reconnect, republish=False (at most once).

Every wait has a deadline; faults are injected through the fault proxy, a private node, or by closing
only this test's own connection (by its ``connection_name``) on the shared broker.
"""

from __future__ import annotations

import asyncio
import time

import kombu
import pytest

from carrot_kombu import AsyncConnectionManager, Disconnected, OutcomeUnknown, Rejected

from .broker import close_connection, unique
from .integrity_helpers import Collector
from .nodes import BrokerNode

pytestmark = pytest.mark.integration

FAST = {"backoff": {"min": 0.05, "max": 0.5}, "heartbeat": 2}


@pytest.fixture(scope="module")
def node():
    """A private node this module may restart."""
    node = BrokerNode()
    try:
        node.start()
        yield node
    finally:
        node.stop()


def _scratch(name: str) -> kombu.Queue:
    """A queue the broker removes by itself a minute after its last use (never left on the shared broker)."""
    return kombu.Queue(name, durable=False, queue_arguments={"x-expires": 60_000})


def _read_back(manager, queue, expected, timeout=20.0):
    """Every body in ``queue`` (duplicates kept) once ``expected`` all arrived and the queue went quiet."""
    with Collector(manager, queue) as got:
        missing = got.wait_for(expected, timeout)
        assert missing == set(), f"{len(missing)} confirmed message(s) lost from {queue}, e.g. {sorted(missing)[:5]}"
        got.wait_quiet(0.3, 3)
        return got.snapshot()


async def _publish_through(m, queue, faults, tasks=8, per_task=150, **publish_options):
    """``tasks`` tasks publish one by one, at least ``per_task`` each and until ``faults()`` ended.

    Returns the confirmed bodies, the ``OutcomeUnknown`` errors and how many were published.
    """
    confirmed: set[str] = set()
    failures: list[BaseException] = []
    faults_done = asyncio.Event()
    published = 0

    async def run_faults() -> None:
        try:
            await faults()
        finally:
            faults_done.set()

    async def publisher(t: int) -> None:
        nonlocal published
        n = 0
        while n < per_task or not faults_done.is_set():
            body = f"{t}-{n}"
            n += 1
            published += 1
            try:
                await m.publish(body, routing_key=queue, timeout=60, **publish_options)
            except OutcomeUnknown as exc:
                failures.append(exc)
            else:
                confirmed.add(body)

    await asyncio.gather(run_faults(), *[publisher(t) for t in range(tasks)])
    return confirmed, failures, published


@pytest.mark.asyncio
async def test_async_confirmed_publishes_survive_proxy_cuts_with_none_lost(rabbit, proxy):
    name = unique("ck-aio-cuts")
    reader, _, _ = rabbit()
    async with AsyncConnectionManager(proxy.url(), client_properties={"connection_name": name}, **FAST) as m:
        queue = unique("ck-aio-cuts")
        await m.declare(kombu.Queue(queue, durable=True, queue_arguments={"x-expires": 120_000}))

        async def cuts() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(5):
                await asyncio.sleep(0.25)
                await loop.run_in_executor(None, proxy.cut)

        confirmed, failures, published = await _publish_through(m, queue, cuts)
        assert not failures and len(confirmed) == published >= 8 * 150
        assert m.status().reconnects >= 1
    got = _read_back(reader, queue, confirmed)
    assert set(got) >= confirmed


@pytest.mark.asyncio
async def test_async_confirmed_publishes_survive_a_private_node_restart(node):

    queue = unique("ck-aio-restart")
    async with AsyncConnectionManager(node.url, **FAST) as m:
        await m.declare(kombu.Queue(queue, durable=True, queue_arguments={"x-expires": 120_000}))
        loop = asyncio.get_running_loop()

        async def restart() -> None:
            await asyncio.sleep(0.3)
            await loop.run_in_executor(None, node.stop_app)
            await asyncio.sleep(0.5)
            await loop.run_in_executor(None, node.start_app)

        confirmed, failures, published = await _publish_through(m, queue, restart, tasks=4, per_task=300)
        assert not failures and len(confirmed) == published >= 4 * 300
        assert await m.wait_connected(30) and m.status().reconnects >= 1
        got = _read_back(m.manager, queue, confirmed, timeout=30)
        assert set(got) >= confirmed


@pytest.mark.asyncio
async def test_one_tasks_refused_publish_never_fails_anothers(rabbit):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    m = AsyncConnectionManager.wrap(manager)
    queue = unique("ck-aio-iso")
    await m.declare(_scratch(queue))

    async def good(n: int) -> int:
        await m.publish(str(n), routing_key=queue, timeout=20)
        return n

    async def bad() -> None:
        await m.publish("refused", exchange=unique("ck-no-such-ex"), routing_key="k", timeout=20)

    for _ in range(3):
        results = await asyncio.gather(*[good(n) for n in range(30)], bad(), *[good(n) for n in range(30, 60)],
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(errors) == 1 and isinstance(errors[0], Rejected) and errors[0].reply_code == 404, errors
        assert sorted(r for r in results if isinstance(r, int)) == list(range(60))


@pytest.mark.asyncio
async def test_refused_publishes_never_fail_sync_and_async_publishers_sharing_the_manager(rabbit):
    """Red team 21 F1: threads and tasks publishing on one manager while another caller's 404s keep
    closing the confirm channel got ``struct.error`` (a channel id read as None mid-close): 2,478 in 8 s."""
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    m = AsyncConnectionManager.wrap(manager)
    queue = unique("ck-aio-mixed")
    await m.declare(_scratch(queue))
    until = time.monotonic() + 4.0
    errors: list[BaseException] = []
    refused: list[BaseException] = []
    confirmed = [0]

    def thread_publisher() -> None:
        while time.monotonic() < until:
            try:
                manager.publish("t", routing_key=queue, timeout=20)
                confirmed[0] += 1
            except Exception as exc:  # noqa: BLE001 - every error is the finding
                errors.append(exc)

    def thread_refused() -> None:
        while time.monotonic() < until:
            try:
                manager.publish("x", exchange=unique("ck-no-such-ex"), routing_key="k", timeout=20)
            except Rejected as exc:
                refused.append(exc)
            time.sleep(0.005)

    async def task_publisher() -> None:
        while time.monotonic() < until:
            try:
                await m.publish("a", routing_key=queue, timeout=20)
                confirmed[0] += 1
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    loop = asyncio.get_running_loop()
    threads = [loop.run_in_executor(None, thread_publisher) for _ in range(3)]
    threads.append(loop.run_in_executor(None, thread_refused))
    await asyncio.gather(*threads, *[task_publisher() for _ in range(10)])
    assert errors == [], f"{len(errors)} good publishes failed, e.g. {errors[:3]!r}"
    assert refused and all(exc.reply_code == 404 for exc in refused)
    assert confirmed[0] > 100


@pytest.mark.asyncio
async def test_a_cancelled_publish_is_forgotten_and_the_loop_goes_on(rabbit, proxy):
    manager, _, _ = rabbit(proxy.url())
    assert manager.wait_connected(10)
    m = AsyncConnectionManager.wrap(manager)
    queue = unique("ck-aio-cancel")
    await m.declare(_scratch(queue))
    publisher = manager._core.publisher
    proxy.latency(1.0)  # the confirm takes a second: the task is cancelled while it awaits it
    task = asyncio.ensure_future(m.publish("cancelled", routing_key=queue, timeout=30))
    deadline = time.monotonic() + 5
    while not any(p.written for p in list(publisher._pending.values())):
        assert time.monotonic() < deadline, "the publish was never written"
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert publisher.pending_count() == 0  # forgotten at once: never published again
    proxy.heal()
    await m.publish("after", routing_key=queue, timeout=20)
    got = _read_back(manager, queue, {"after"})
    assert got.count("cancelled") <= 1  # written once: stored at most once


@pytest.mark.asyncio
async def test_the_consume_iterator_goes_on_across_a_forced_reconnect(rabbit):
    manager, events, name = rabbit(**FAST)
    assert manager.wait_connected(10)
    m = AsyncConnectionManager.wrap(manager)
    queue = unique("ck-aio-consume")
    await m.declare(_scratch(queue))
    await m.publish_many([str(n) for n in range(10)], routing_key=queue)
    seen: set[str] = set()
    loop = asyncio.get_running_loop()
    async with m.consume(_scratch(queue), prefetch_count=5) as messages:
        while len(seen) < 5:
            message = await asyncio.wait_for(messages.get(), 10)
            seen.add(message.body)
            await message.ack()
        await loop.run_in_executor(None, close_connection, name)  # only this test's own connection
        assert await loop.run_in_executor(None, events.wait_count, "connected", 2, 20.0)
        await m.publish_many([str(n) for n in range(10, 20)], routing_key=queue)
        while len(seen) < 20:
            message = await asyncio.wait_for(messages.get(), 20)
            seen.add(message.body)
            await message.ack()
    assert seen == {str(n) for n in range(20)}
    assert not messages.consumer.active


@pytest.mark.asyncio
async def test_republish_false_is_at_most_once_through_proxy_cuts(rabbit, proxy):
    reader, _, _ = rabbit()
    name = unique("ck-aio-once")
    async with AsyncConnectionManager(proxy.url(), client_properties={"connection_name": name}, **FAST) as m:
        queue = unique("ck-aio-once")
        await m.declare(kombu.Queue(queue, durable=True, queue_arguments={"x-expires": 120_000}))

        async def cuts() -> None:
            loop = asyncio.get_running_loop()
            for _ in range(5):
                await asyncio.sleep(0.2)
                await loop.run_in_executor(None, proxy.cut)

        confirmed, unknown, published = await _publish_through(m, queue, cuts, republish=False)
        assert all(isinstance(e, OutcomeUnknown) and isinstance(e, Disconnected) for e in unknown)
        assert len(confirmed) + len(unknown) == published >= 8 * 150
        assert m.status().reconnects >= 1
    got = _read_back(reader, queue, confirmed)
    assert set(got) >= confirmed
    assert len(got) == len(set(got)), "a republish=False message arrived twice"


@pytest.mark.asyncio
async def test_a_blocked_connection_never_blocks_the_loop(node):
    """Resource alarm on a private node: publishes that would wait go to the helper thread; the loop runs on."""
    from carrot_kombu import Blocked, PublishTimeout

    loop = asyncio.get_running_loop()
    queue = unique("ck-aio-blocked")
    async with AsyncConnectionManager(node.url, blocked_timeout=3, **FAST) as m:
        await m.declare(_scratch(queue))
        await m.publish("warm", routing_key=queue)
        await loop.run_in_executor(None, node.alarm, True)
        try:
            # The broker blocks the connection when it next publishes.
            trigger = asyncio.ensure_future(m.publish("trigger", routing_key=queue, timeout=30))
            deadline = time.monotonic() + 10
            while not m.status().blocked:
                assert time.monotonic() < deadline, "the broker never blocked the connection"
                await asyncio.sleep(0.01)
            waiting = [asyncio.ensure_future(m.publish(str(n), routing_key=queue, timeout=1)) for n in range(5)]
            gaps = []
            until = time.monotonic() + 1.5
            while time.monotonic() < until:  # the loop keeps turning while they wait
                start = time.monotonic()
                await asyncio.sleep(0.01)
                gaps.append(time.monotonic() - start)
            assert max(gaps) < 0.5, f"the loop stalled for {max(gaps):.2f}s"
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, PublishTimeout) and r.outcome == "not_sent" for r in results), results
            error = (await asyncio.gather(trigger, return_exceptions=True))[0]
            assert isinstance(error, Blocked), repr(error)  # bounded by blocked_timeout, not its 30 s
        finally:
            await loop.run_in_executor(None, node.alarm, False)
        assert await m.wait_connected(30)
        await m.publish("after", routing_key=queue, timeout=20)
