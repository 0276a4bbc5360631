"""An exception raised into a caller at *every* point a signal handler could raise it.

Ctrl-C, a ``SIGALRM`` handler or Celery's soft time limit raise into the main
thread wherever it is.  Whatever that point, the invariants a user relies on:
the caller gets the exception, nothing stays held (the reader lock, that the
connection's reading depends on), and another thread's request on the same
connection still gets its answer.  The only permitted casualty is the one the
docs name: an interrupt in the middle of handing a frame to its waiter drops
the connection (it then recovers); even then nothing may stay held.

The walk is deterministic (:mod:`tests.interrupts`): interrupt point 1, 2,
... of the call, on a fresh channel each time, until the call passes all its
points uninterrupted.  A random signal storm (``integration/signal_storm.py``)
found a leaked reader lock in 3 runs out of 16; this finds it in every run.
"""

from __future__ import annotations

import threading
from time import monotonic
from typing import Callable

import amqp
import pytest

from carrot_kombu import Disconnected
from carrot_kombu._pyamqp import ConnState, SupervisedConnection
from carrot_kombu._sync import NOT_ACQUIRED, SLICE, Flag, Worker, owned, run_locked
from carrot_kombu.events import EventBus

from .interrupts import Interrupt, InterruptAt
from .test_pyamqp_support import WAIT, Harness, harness, no_leaks  # noqa: F401

#: Our fenced layer: where a reply wait, a write and a frame's dispatch run.
LAYER = tuple(f"carrot_kombu/{name}" for name in (
    "_pyamqp/reader.py", "_pyamqp/connstate.py", "_pyamqp/chanstate.py", "_pyamqp/callbacks.py",
    "_pyamqp/replies.py", "_pyamqp/channel.py", "_pyamqp/consuming.py", "_pyamqp/messages.py",
    "_pyamqp/wire.py", "_pyamqp/connection.py", "_pyamqp/frames.py", "_sync.py",
))
#: A frame's dispatch interrupted half way is the documented way to lose a connection.
DOCUMENTED_LOSS = "interrupted the handling of a frame"


def _walk(
    harness: Harness, call: Callable[[amqp.Channel], object], *, confirm: bool = False, files: tuple[str, ...] = LAYER,
) -> dict[str, int]:
    broker = harness.broker()
    conn: SupervisedConnection | None = None
    lost: dict[str, int] = {"points": 0, "interrupted": 0, "dropped": 0}
    n = 0
    while True:
        n += 1
        if conn is None or conn.carrot.dead is not None:
            # No service thread: the calling thread reads for itself, so every
            # walk goes through the leader's path (and is the same walk).
            conn = harness.connection(broker)
        ch = conn.channel()
        if confirm:
            ch.confirm_select()
        with InterruptAt(n, files) as spot:
            try:
                call(ch)
            except Interrupt:
                pass
            except Disconnected:
                pass  # an earlier point's documented loss, seen by this call
        if not spot.fired:
            lost["points"] = spot.points
            break
        lost["interrupted"] += 1
        where = spot.where.split(":")[0]
        lost[where] = lost.get(where, 0) + 1
        state = conn.carrot
        # Nothing this thread took stays held: the reader lock above all.
        assert not state._read_lock._is_owned(), f"reader lock leaked at {spot.where}"
        if state.dead is not None:
            assert DOCUMENTED_LOSS in str(state.dead), f"interrupt at {spot.where} dropped the connection: {state.dead!r}"
            lost["dropped"] += 1
            continue
        # Another thread's request is answered (someone still reads the socket).
        other = harness.spawn(lambda: conn.channel().queue_declare("probe"), f"probe{n}")
        try:
            other.result(WAIT)
        except Disconnected:
            assert DOCUMENTED_LOSS in str(state.dead), f"after an interrupt at {spot.where}: {state.dead!r}"
            lost["dropped"] += 1
            continue
        # And so is this thread's next one.
        conn.channel().queue_declare("next")
        try:
            ch.close()
        except Exception:
            pass  # a spoiled channel may refuse: only its id is at stake here
    return lost


def test_a_request_interrupted_anywhere_leaves_the_connection_serving_others(harness) -> None:
    walked = _walk(harness, lambda ch: ch.queue_declare("walked"))
    assert walked["interrupted"] >= 30, walked  # the walk reached the reply wait, not just the write
    assert walked["dropped"] <= walked["interrupted"] // 4, walked


def test_a_confirmed_publish_interrupted_anywhere_leaves_the_connection_serving_others(harness) -> None:
    walked = _walk(
        harness, lambda ch: ch.basic_publish_confirm(amqp.Message(b"m"), routing_key="q", timeout=WAIT),
        confirm=True,
    )
    assert walked["interrupted"] >= 30, walked
    assert walked["dropped"] <= walked["interrupted"] // 4, walked


def _walk_plain(
    call: Callable[[], object], check: Callable[[str], None], files: tuple[str, ...] = ("carrot_kombu/_sync.py",),
) -> int:
    """Interrupt ``call`` at each of its points in turn, ``check(where)`` after each; the points."""
    n = 0
    while True:
        n += 1
        with InterruptAt(n, files) as spot:
            try:
                call()
            except Interrupt:
                pass
        if not spot.fired:
            return n - 1
        check(spot.where)


def test_waiting_on_a_set_flag_interrupted_anywhere_leaves_it_set() -> None:
    """A Worker's end is a Flag: one interrupted ``stop()`` must not make it look alive for ever."""
    flag = Flag()
    flag.set()

    def check(where: str) -> None:
        assert flag.is_set(), f"set flag reads clear after an interrupt at {where}"
        seen: list[bool] = []
        other = threading.Thread(target=lambda: seen.append(flag.wait(1)))
        other.start()
        other.join(5)
        assert seen == [True], f"another waiter missed the set flag after an interrupt at {where}"

    assert _walk_plain(lambda: flag.wait(1), check) >= 2


def test_run_locked_interrupted_anywhere_never_leaves_the_lock_held() -> None:
    """The hand-over idiom (the reader lock, the drain lock): no interrupt point leaks the lock."""
    lock = threading.RLock()
    seen: list[object] = []

    def check(where: str) -> None:
        assert not owned(lock), f"run_locked left the lock held after an interrupt at {where}"
        other = threading.Thread(target=lambda: seen.append(run_locked(lock, lambda: "other", timeout=1)))
        other.start()
        other.join(5)
        assert seen[-1] == "other", f"another thread could not take the lock after an interrupt at {where}"

    assert _walk_plain(lambda: run_locked(lock, lambda: "mine"), check) >= 3
    assert run_locked(lock, lambda: "mine") == "mine" and not owned(lock)


def test_run_locked_returns_not_acquired_while_another_thread_holds_the_lock() -> None:
    lock = threading.RLock()
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            taken.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(5)
    ran: list[int] = []
    try:
        assert run_locked(lock, lambda: ran.append(1), blocking=False) is NOT_ACQUIRED
        began = monotonic()
        assert run_locked(lock, lambda: ran.append(2), timeout=0.1) is NOT_ACQUIRED
        assert monotonic() - began >= 0.09
    finally:
        release.set()
        holder.join(5)
    assert ran == [] and run_locked(lock, lambda: 3, blocking=False) == 3


def test_waiting_for_an_ended_worker_interrupted_anywhere_still_sees_it_ended() -> None:
    worker = Worker(lambda: None, "ck-test-ends-at-once")
    worker.start()
    assert worker.wait(5)

    def check(where: str) -> None:
        assert not worker.running() and worker.wait(0.5), f"the ended worker looks alive after an interrupt at {where}"

    assert _walk_plain(lambda: worker.wait(1), check) >= 2


def test_event_bus_starts_and_closes_interrupted_anywhere_leave_one_dispatcher() -> None:
    """stop()/start() interrupted over and over: events still come, close() still ends the dispatcher.

    A start() interrupted inside ``Thread.start()`` may have started the
    thread though it raised, and a second start() then made a second
    dispatcher; a stop mark could end the wrong one, and the next ``stop()``
    waited for ever (found by an attack storm on stop()/start(), 3 runs in 3;
    ``integration/signal_storm.py URL 8 stopstart`` now ends cleanly).
    """
    bus = EventBus()
    seen: list[int] = []
    bus.on("connected", lambda: seen.append(1))

    def dispatchers() -> list[threading.Thread]:
        # (A Thread interrupted inside start() before it began stays listed, never alive.)
        return [t for t in threading.enumerate() if t.name == "carrot-kombu-events" and t.is_alive()]

    def cycle() -> None:
        bus.start()
        bus.post("connected")
        bus.close(2)

    def check(where: str) -> None:
        bus.start()
        bus.post("connected")
        began = monotonic()
        bus.close(2)
        assert monotonic() - began < 2, f"close() waited its whole timeout after an interrupt at {where}"
        assert seen, f"no event delivered after an interrupt at {where}"
        seen.clear()
        deadline = monotonic() + 2
        while dispatchers() and monotonic() < deadline:
            threading.Event().wait(0.01)
        assert not dispatchers(), f"a dispatcher outlived close() after an interrupt at {where}"

    # Not threading.py: CPython's Thread.start() waits on a Condition whose
    # Python-level __enter__ an interrupt can leave holding its lock, and the
    # new thread then never runs (not ours to fix; the storm in the docs
    # covers the rest of Thread.start()).
    assert _walk_plain(cycle, check, ("carrot_kombu/events.py", "carrot_kombu/_sync.py")) >= 20


def _old_wait_for(self, waiter, deadline, interrupt=None):  # noqa: C901 - verbatim, before the fix
    if waiter.ready():
        return True
    with self._waiters_lock:
        self._waiters[waiter] = None
    try:
        while True:
            if waiter.ready():
                return True
            if self.dead is not None:
                raise self.disconnected()
            remaining = None if deadline is None else deadline - monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if interrupt is not None and interrupt():
                return False
            led = False
            try:
                led = self._read_lock.acquire(False)
                if led:
                    self._leading = True
                    self._lead(waiter, deadline, interrupt)
            finally:
                if self._read_lock._is_owned():
                    self._release_lead()
            if led:
                continue
            if self._service_reading and self.wire is not None:
                self.wire.wake_reader()
            waiter.event.clear()
            if waiter.ready() or self.dead is not None or not self._leading:
                continue
            waiter.event.wait(SLICE if remaining is None else min(remaining, SLICE))
    finally:
        with self._waiters_lock:
            self._waiters.pop(waiter, None)
        self._last_caller = monotonic()
        if not self._leading:
            self._promote()


def test_the_walk_finds_a_reader_lock_released_in_a_finally(harness, monkeypatch) -> None:
    """The approach's own check: the release the signal storm caught leaking (3 runs in 16) is caught here."""
    monkeypatch.setattr(ConnState, "wait_for", _old_wait_for)
    with pytest.raises(AssertionError, match="reader lock leaked"):
        _walk(harness, lambda ch: ch.queue_declare("walked"), files=LAYER + ("tests/test_interrupt_points.py",))
