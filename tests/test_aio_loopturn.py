"""An event loop reads its own confirms while it publishes (``_pyamqp.loopturn``), on the fake broker.

Who reads is asserted through the thread that settles each confirm: the
loop's own while it keeps publishing; the connection's service thread again
once the loop stops publishing, or stops running (blocked by user code),
without any message waiting past its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, AsyncIterator

import pytest

from carrot_kombu import AsyncConnectionManager
from carrot_kombu._pyamqp import loopturn, reader
from carrot_kombu._pyamqp.replies import Waiter
from carrot_kombu.publisher import Publisher
from tests.fakebroker import FakeBroker
from tests.support import until as _until

FAST = {"backoff": {"min": 0.01, "max": 0.05, "jitter": False}}
#: Longest the service thread may take to read again after the loop stopped (two looks, and margin).
TAKE_BACK = 10 * loopturn.LOOP_CHECK


@pytest.fixture
def confirm_threads(monkeypatch):
    """The thread ident that settled each confirm, in order."""
    seen: list[int] = []
    original = Publisher._on_confirm

    def recording(self, delivery_tag, multiple, ack):
        seen.append(threading.get_ident())
        original(self, delivery_tag, multiple, ack)

    monkeypatch.setattr(Publisher, "_on_confirm", recording)
    return seen


def _state(m):
    return m.manager._core.live.current()._state


@contextlib.asynccontextmanager
async def _loop_reading(publishes: int) -> AsyncIterator[tuple[AsyncConnectionManager, Any]]:
    """A manager on the fake broker whose loop has taken its turn to read, after ``publishes`` publishes.

    Yields:
        The manager and its connection's reader state.
    """
    with FakeBroker(heartbeat=0) as broker:
        async with AsyncConnectionManager(broker.url, heartbeat=0, **FAST) as m:
            for _ in range(publishes):
                await m.publish(b"x", routing_key="q", timeout=5)
            state = _state(m)
            assert state._loop_turn is not None
            yield m, state


@pytest.mark.asyncio
async def test_the_loop_reads_its_confirms_while_it_publishes_and_gives_reading_back_after(confirm_threads):
    loop_thread = threading.get_ident()
    with FakeBroker(heartbeat=0) as broker:
        async with AsyncConnectionManager(broker.url, heartbeat=0, **FAST) as m:
            for _ in range(50):
                await m.publish(b"x", routing_key="q", timeout=5)
            state = _state(m)
            turn = state._loop_turn
            assert turn is not None and turn.loop is asyncio.get_running_loop()
            # The first confirm may race the service thread stepping aside; the rest are the loop's.
            assert confirm_threads[10:] and set(confirm_threads[10:]) == {loop_thread}

            # Not publishing any more: the service thread reads again, the loop stops watching.
            assert await _until(lambda: state._loop_turn is None, TAKE_BACK)
            assert await _until(lambda: turn._fd == -1)
            del confirm_threads[:]
            future = m.manager.publish_async(b"y", routing_key="q", timeout=5)
            await asyncio.wait_for(asyncio.wrap_future(future), 5)
            assert confirm_threads and loop_thread not in confirm_threads

            # Publishing again: the loop takes its turn again.
            del confirm_threads[:]
            for _ in range(20):
                await m.publish(b"z", routing_key="q", timeout=5)
            assert state._loop_turn is not None and state._loop_turn is not turn
            assert loop_thread in confirm_threads


@pytest.mark.asyncio
async def test_a_blocked_loop_does_not_leave_the_connection_unread(confirm_threads):
    """User code blocking the loop: another thread's publish is still confirmed, by the service thread."""
    loop_thread = threading.get_ident()
    async with _loop_reading(20) as (m, state):
        done = threading.Event()

        def other_thread() -> None:
            m.manager.publish_async(b"y", routing_key="q", timeout=5).result(5)
            done.set()

        del confirm_threads[:]
        started = time.monotonic()
        threading.Thread(target=other_thread, daemon=True).start()
        # Blocks the loop on purpose (what the test is about), for at most 5 s.
        assert done.wait(5), "the confirm waited for the blocked loop"
        assert time.monotonic() - started < TAKE_BACK + 1.0
        assert confirm_threads and loop_thread not in confirm_threads
        assert state._loop_turn is None
        await m.publish(b"z", routing_key="q", timeout=5)  # and the loop reads again afterwards
        assert state._loop_turn is not None


@pytest.mark.asyncio
async def test_callers_waiting_on_other_threads_are_served_while_the_loop_reads():
    """Blocking publishes read for themselves; the loop, finding the read lock held, is re-armed after."""
    with FakeBroker(heartbeat=0) as broker:
        async with AsyncConnectionManager(broker.url, heartbeat=0, **FAST) as m:
            await m.publish(b"x", routing_key="q", timeout=5)
            errors: list[BaseException] = []

            def blocking_publisher() -> None:
                try:
                    for _ in range(100):
                        m.manager.publish(b"sync", routing_key="q", timeout=5)
                except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(exc)

            threads = [threading.Thread(target=blocking_publisher, daemon=True) for _ in range(2)]
            for thread in threads:
                thread.start()
            for _ in range(200):
                await asyncio.wait_for(m.publish(b"async", routing_key="q", timeout=5), 5)
            for thread in threads:
                await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
            assert not errors and not any(thread.is_alive() for thread in threads)
            state = _state(m)
            turn = state._loop_turn
            assert turn is not None and state._loop_parked is None
            pumps = turn.pumps
            for _ in range(5):
                await m.publish(b"async", routing_key="q", timeout=5)
            assert turn.pumps > pumps  # still (again) the loop's turn


@pytest.mark.asyncio
async def test_a_burst_is_dispatched_over_several_loop_iterations(monkeypatch, confirm_threads):
    """At most FRAMES_PER_TURN frames per callback: the rest in the next iterations, none lost."""
    monkeypatch.setattr(loopturn, "FRAMES_PER_TURN", 1)
    monkeypatch.setattr(reader, "LOOP_CHECK", 5.0)  # no look by the service thread during the test
    loop_thread = threading.get_ident()
    with FakeBroker(heartbeat=0, confirm_delay=0.02) as broker:
        async with AsyncConnectionManager(broker.url, heartbeat=0, **FAST) as m:
            for _ in range(3):  # the first may go before the confirm channel is open (no flush of ours)
                await m.publish(b"x", routing_key="q", timeout=5)
            turn = _state(m)._loop_turn
            assert turn is not None
            pumps = turn.pumps
            del confirm_threads[:]
            # 30 tasks: one write, then 30 ack frames arriving together.
            await asyncio.wait_for(asyncio.gather(*(m.publish(b"x", routing_key="q", timeout=5)
                                                    for _ in range(30))), 10)
            assert _state(m)._loop_turn is turn
            assert confirm_threads == [loop_thread] * 30
            assert turn.pumps - pumps >= 30  # one frame per callback


@pytest.mark.asyncio
async def test_a_connection_lost_while_the_loop_reads_republishes_and_the_loop_reads_the_next_one():
    with FakeBroker(heartbeat=0) as broker:
        async with AsyncConnectionManager(broker.url, heartbeat=0, **FAST) as m:
            loop = asyncio.get_running_loop()
            peer = await loop.run_in_executor(None, broker.accept)
            for _ in range(10):
                await m.publish(b"x", routing_key="q", timeout=5)
            old = _state(m)._loop_turn
            assert old is not None
            peer.set_confirms(None)  # withheld on this connection
            pending = asyncio.ensure_future(m.publish(b"again", routing_key="q", timeout=10))
            await loop.run_in_executor(None, lambda: peer.wait_for(
                lambda: any(p.body == b"again" for p in peer.published)))
            await loop.run_in_executor(None, peer.drop)
            await asyncio.wait_for(pending, 10)  # published again on the next connection, and confirmed
            assert await _until(lambda: old._fd == -1)  # the lost connection's watch ended
            for _ in range(5):
                await m.publish(b"y", routing_key="q", timeout=5)
            new = _state(m)._loop_turn
            assert new is not None and new is not old


@pytest.mark.asyncio
async def test_a_connection_carrying_a_consumer_is_read_by_the_service_thread(confirm_threads):
    """Deliveries come in bursts of up to the prefetch count: their dispatch stays off the loop."""
    loop_thread = threading.get_ident()
    async with _loop_reading(10) as (m, state):
        messages = m.consume("aio-loopturn-q", prefetch_count=5, declare=False)
        await messages.start()
        # Given back at the service thread's next look, even while the loop keeps publishing.
        deadline = time.monotonic() + TAKE_BACK
        while state._loop_turn is not None and time.monotonic() < deadline:
            await m.publish(b"x", routing_key="q", timeout=5)
        assert state._loop_turn is None
        del confirm_threads[:]
        for _ in range(20):
            await m.publish(b"y", routing_key="q", timeout=5)
        assert state._loop_turn is None
        assert confirm_threads and loop_thread not in confirm_threads
        await messages.cancel()


class _Never(Waiter):
    """A reply that never comes: its caller reads the connection until its deadline."""

    def ready(self) -> bool:
        return False


@pytest.mark.asyncio
async def test_a_caller_reading_on_another_thread_serves_the_loop_and_the_loop_reads_again_after(confirm_threads):
    loop_thread = threading.get_ident()
    async with _loop_reading(5) as (m, state):
        leading, released = threading.Event(), threading.Event()
        hold = 1.0

        def caller() -> None:
            # Holds the read lock for ``hold`` seconds, reading (and dispatching) for everybody.
            def lead() -> None:
                leading.set()
                state._lead(_Never(), time.monotonic() + hold)

            state._read_lock.acquire()
            try:
                lead()
            finally:
                state._read_lock.release()
                state._promote()
                released.set()

        del confirm_threads[:]
        started = time.monotonic()
        threading.Thread(target=caller, daemon=True).start()
        assert await _until(leading.is_set)
        for _ in range(5):
            await m.publish(b"y", routing_key="q", timeout=5)
        assert time.monotonic() - started < hold, "the test's reader let go too soon"
        assert confirm_threads and loop_thread not in confirm_threads  # the other thread read them
        assert await _until(released.is_set)
        del confirm_threads[:]
        for _ in range(5):
            await m.publish(b"z", routing_key="q", timeout=5)
        assert confirm_threads == [loop_thread] * 5  # re-armed: the loop reads again
        assert state._loop_parked is None


@pytest.mark.asyncio
async def test_a_loop_finding_the_read_lock_held_stops_watching_and_is_rearmed_by_its_release(
        monkeypatch, confirm_threads):
    monkeypatch.setattr(reader, "LOOP_CHECK", 5.0)  # no look by the service thread during the test
    loop_thread = threading.get_ident()
    async with _loop_reading(5) as (m, state):
        turn = state._loop_turn
        held, release, released = threading.Event(), threading.Event(), threading.Event()

        def holder() -> None:
            # Holds the read lock without reading, then lets go as every reader does.
            with state._read_lock:
                held.set()
                release.wait(5)
            state._promote()
            released.set()

        threading.Thread(target=holder, daemon=True).start()
        assert await _until(held.is_set)
        del confirm_threads[:]
        pending = asyncio.ensure_future(m.publish(b"y", routing_key="q", timeout=5))
        # The confirm arrives; the loop cannot take the lock: it stops watching (no spinning).
        assert await _until(lambda: state._loop_parked is turn)
        assert not pending.done() and not turn._watching
        release.set()
        await asyncio.wait_for(pending, 5)
        assert confirm_threads == [loop_thread]  # re-armed by the release: the loop read it
        assert await _until(released.is_set)
        assert state._loop_parked is None and turn._watching and state._loop_turn is turn
