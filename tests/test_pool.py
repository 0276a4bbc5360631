"""The bounded pool and leases, on the fault-injecting memory transport."""

from __future__ import annotations

import threading
import time

import kombu
import pytest
from amqp.exceptions import NotFound

from carrot_kombu import CarrotKombuError, Disconnected, Lease, PoolTimeout


@pytest.fixture
def connected(make_manager):
    def make(**options):
        manager, events = make_manager(**options)
        assert manager.wait_connected(5)
        return manager, events

    return make


def test_lease_is_a_usable_channel_for_kombu(connected):
    manager, _ = connected()
    exchange = kombu.Exchange("ex", type="direct")
    queue = kombu.Queue("jobs", exchange, routing_key="jobs")
    with manager.channel() as lease:
        assert isinstance(lease, Lease)
        queue(lease).declare()
        kombu.Producer(lease, exchange=exchange).publish({"n": 1}, routing_key="jobs")
        message = queue(lease).get(no_ack=True)
        assert message.payload == {"n": 1}


def test_pool_never_exceeds_its_limit_and_times_out(connected):
    manager, _ = connected(pool_limit=2)
    first, second = manager.open_channel(), manager.open_channel()
    with pytest.raises(PoolTimeout, match=r"all 2 channel slots stayed in use for 0.05s \(2 leased\); raise pool_limit"):
        manager.open_channel(timeout=0.05)
    assert manager.status().pool.leased == 2
    first.release()
    third = manager.open_channel(timeout=0)
    assert third.channel is first._channel  # reused, not a new channel
    assert "2 leased, 0 idle, limit 2" in repr(manager)
    second.release()
    third.release()
    assert "0 leased, 2 idle, limit 2" in repr(manager)


def test_waiting_lease_is_woken_by_a_release(connected):
    manager, _ = connected(pool_limit=1)
    held = manager.open_channel()
    got = []
    waiter = threading.Thread(target=lambda: got.append(manager.open_channel(timeout=5)))
    waiter.start()
    held.release()
    waiter.join(5)
    assert not waiter.is_alive() and isinstance(got[0], Lease)
    got[0].release()


def test_a_waiting_lease_is_served_while_other_threads_churn_the_pool(connected):
    """Two threads releasing and leasing again in a loop took every freed slot first: the waiter
    timed out after its whole timeout, however many channels were released meanwhile (red team 19.5).
    Now whoever waits is served first."""
    manager, _ = connected(pool_limit=2)
    stop = threading.Event()
    cycles = [0, 0]

    def churn(index: int) -> None:
        while not stop.is_set():
            lease = manager.open_channel(timeout=10)
            cycles[index] += 1
            stop.wait(0.001)  # the lease is used for a moment: both slots are nearly always taken
            lease.release()

    churners = [threading.Thread(target=churn, args=(i,)) for i in range(2)]
    for thread in churners:
        thread.start()
    try:
        # Wait until both churn (no sleep-and-hope: the counters say it).
        deadline = time.monotonic() + 5
        while min(cycles) < 50 and time.monotonic() < deadline:
            threading.Event().wait(0.01)
        assert min(cycles) >= 50, cycles
        for _ in range(5):
            before = sum(cycles)
            began = time.monotonic()
            lease = manager.open_channel(timeout=3)  # raised PoolTimeout after 3 s, 5 times in 5
            waited = time.monotonic() - began
            lease.release()
            assert waited < 2.5, (waited, sum(cycles) - before)
    finally:
        stop.set()
        for thread in churners:
            thread.join(10)


def test_waiting_lease_gets_disconnected_when_the_connection_is_lost(connected, faults):
    manager, events = connected(pool_limit=1, backoff={"min": 5.0, "max": 5.0})
    held = manager.open_channel()
    errors = []

    def wait_for_lease():
        try:
            manager.open_channel(timeout=10)
        except Exception as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait_for_lease)
    waiter.start()
    faults.cut()
    waiter.join(5)
    assert not waiter.is_alive()
    assert isinstance(errors[0], Disconnected)
    held.release()


def test_stale_lease_after_reconnect_raises_disconnected(connected, faults):
    manager, events = connected()
    old = manager.open_channel()
    old.queue_declare("q1")
    faults.cut()
    assert events.wait_count("disconnected", 1)
    with pytest.raises(Disconnected):
        old.queue_declare("q1")  # during the outage
    assert events.wait_count("connected", 2)
    with pytest.raises(Disconnected):
        old.queue_declare("q1")  # and after the reconnect: never into the new connection
    with pytest.raises(Disconnected):
        _ = old.channel
    assert not old.valid
    old.release()  # harmless
    with manager.channel() as fresh:
        fresh.queue_declare("q1")
    assert manager.status().pool.leased == 0


def test_release_is_idempotent_and_use_after_release_fails(connected):
    manager, _ = connected()
    lease = manager.open_channel()
    manager.release(lease)
    lease.release()
    assert manager.status().pool.idle == 1
    with pytest.raises(CarrotKombuError, match="released"):
        lease.queue_declare("x")
    assert "released" in repr(lease)


def test_channel_context_discards_a_channel_after_a_channel_error(connected):
    manager, _ = connected()
    with pytest.raises(NotFound):
        with manager.channel() as lease:
            chan = lease.channel
            raise NotFound("no queue")
    assert manager.status().pool.idle == 0  # discarded, not pooled
    with manager.channel() as lease:
        assert lease.channel is not chan


def test_ordinary_exceptions_keep_the_channel(connected):
    manager, _ = connected()
    with pytest.raises(KeyError):
        with manager.channel():
            raise KeyError("user bug")
    assert manager.status().pool.idle == 1


def test_closed_channel_is_never_handed_out_again(connected):
    manager, _ = connected()
    lease = manager.open_channel()
    chan = lease.channel
    chan.close()
    lease.release()
    with manager.channel() as again:
        assert again.channel is not chan


def test_stop_invalidates_outstanding_leases(connected):
    manager, _ = connected()
    lease = manager.open_channel()
    manager.stop()
    with pytest.raises(Disconnected):
        lease.queue_declare("x")
    lease.release()


def test_many_threads_share_the_pool(connected):
    manager, _ = connected(pool_limit=3)
    errors = []
    peak = []

    def work(i):
        try:
            for _n in range(50):
                with manager.channel(timeout=5) as lease:
                    peak.append(manager.status().pool.leased)
                    lease.queue_declare(f"q{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert max(peak) <= 3
    assert manager.status().pool.leased == 0


def test_concurrent_reapers_give_every_dropped_lease_back(connected):
    """Several threads reaping at once (acquire calls it, so does the supervisor): no token may be skipped."""
    import sys

    manager, _ = connected(pool_limit=300)
    pool = manager._core.pool
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows: the race shows up
    try:
        _reap_concurrently(manager, pool)
    finally:
        sys.setswitchinterval(interval)


def _reap_concurrently(manager, pool) -> None:
    for _round in range(5):
        leases = [manager.open_channel() for _ in range(200)]
        for lease in leases:
            lease.abandon()  # as a collected owner would: queued for the reapers
        del leases
        start = threading.Barrier(8)

        def reap() -> None:
            start.wait(5)
            pool.reap()

        threads = [threading.Thread(target=reap) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        pool.reap(wait=True)  # after the supervisor's tick, if it is reaping right now
        assert manager.status().pool.leased == 0


def test_a_release_interrupted_as_verification_starts_frees_the_slot(make_manager, monkeypatch):
    """Filed as 'verifying', then interrupted before the check was written: nothing would file it back.

    The slot stayed taken until the next reconnect; a few such interrupts and
    every lease timed out (helper-17, pool_limit=10 exhausted).
    """
    from carrot_kombu._memory import MemoryLink as VirtualLink

    class Interrupt(BaseException):
        pass

    def verify(self, chan, on_done):
        raise Interrupt()

    monkeypatch.setattr(VirtualLink, "needs_verify", lambda self, chan: True)
    monkeypatch.setattr(VirtualLink, "verify", verify)
    manager, _ = make_manager(pool_limit=1)
    assert manager.wait_connected(5)
    lease = manager.open_channel(timeout=2)
    with pytest.raises(Interrupt):
        lease.release()
    status = manager.status().pool
    assert (status.leased, status.verifying) == (0, 0), status
    monkeypatch.undo()
    manager.open_channel(timeout=2).release()  # the only slot is free again


def test_an_open_channel_interrupted_as_it_takes_its_opening_ticket_gives_the_slot_back(connected):
    """The ticket was taken outside the try that gives it back: a slot lost until a reconnect (helper-18)."""
    manager, _ = connected(pool_limit=1)
    pool = manager._core.pool
    manager.open_channel(timeout=1).release(discard=True)  # the books for this connection are started

    class Interrupt(BaseException):
        pass

    class Interrupting(set):
        def add(self, item):
            super().add(item)
            raise Interrupt()  # as a signal right after the C call returns

    pool._opening = Interrupting()
    with pytest.raises(Interrupt):
        manager.open_channel(timeout=1)
    pool._opening = set(pool._opening)
    assert not pool._opening
    manager.open_channel(timeout=1).release()  # the only slot is free


def test_a_lease_whose_del_was_interrupted_still_gives_its_slot_back(connected):
    """Lease.__del__ interrupted before it queued its token: reap() finds the lease gone anyway (17.16)."""
    import gc
    from collections import deque

    manager, _ = connected(pool_limit=1)
    pool = manager._core.pool

    class Interrupted(deque):
        def append(self, token):
            pass  # as a signal landing in __del__ before the append: the token never arrives

    lease = manager.open_channel(timeout=1)
    pool._reclaimed = Interrupted()
    del lease
    gc.collect()
    pool._reclaimed = deque()
    deadline = time.monotonic() + 5
    while manager.status().pool.leased and time.monotonic() < deadline:
        pool.reap()  # (returns at once while the supervisor's tick is reaping)
        time.sleep(0.01)
    assert manager.status().pool.leased == 0
    manager.open_channel(timeout=1).release()  # the only slot is free again


def test_a_pool_timeout_says_which_slots_are_not_leased(connected):
    """A slot held by a channel being verified is not blamed on the application's leases (17c F2)."""
    manager, _ = connected(pool_limit=2)
    pool = manager._core.pool
    lease = manager.open_channel()
    with pool._cond.lock:
        pool._verifying.add(object())  # a discarded channel whose close the broker has not answered yet
    try:
        with pytest.raises(PoolTimeout, match=r"\(1 leased, 1 being verified or closed\); raise pool_limit"):
            manager.open_channel(timeout=0.05)
        lease.release(discard=True)
        with pool._cond.lock:
            pool._verifying.clear()
            pool._verifying.update((object(), object()))
        with pytest.raises(PoolTimeout, match=r"\(0 leased, 2 being verified or closed\); the broker is slow"):
            manager.open_channel(timeout=0.05)
    finally:
        with pool._cond.lock:
            pool._verifying.clear()
            pool._cond.notify_all()
