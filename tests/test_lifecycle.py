"""The supervisor's life on the fault-injecting memory transport."""

from __future__ import annotations

import logging
import pickle
import threading
import time

import pytest
from amqp.exceptions import AccessRefused
from kombu.exceptions import OperationalError

from carrot_kombu import (
    Backoff,
    CarrotKombuError,
    ConfigurationError,
    ConnectionManager,
    ConnectionState,
    Disconnected,
    PoolTimeout,
)


def test_start_returns_at_once_and_connects_in_the_background(make_manager, faults):
    faults.gate = threading.Event()  # the attempt hangs until we open the gate
    manager, events = make_manager(start=False)
    assert manager.state is ConnectionState.STOPPED
    assert manager.start() is manager
    assert faults.wait_attempts(1)
    assert manager.state is ConnectionState.CONNECTING
    assert not manager.connected
    faults.gate.set()
    assert manager.wait_connected(5)
    assert manager.connected and manager.state is ConnectionState.CONNECTED


def test_open_channel_raises_disconnected_at_once_while_connecting(make_manager, faults):
    faults.gate = threading.Event()
    manager, _ = make_manager()
    assert faults.wait_attempts(1)
    with pytest.raises(Disconnected):
        manager.open_channel(timeout=None)  # would hang forever if it waited
    faults.gate.set()
    assert manager.wait_connected(5)
    manager.open_channel().release()


def test_disconnected_carries_the_last_connection_error(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager()
    assert events.wait_count("connect_failed", 1)
    with pytest.raises(Disconnected) as info:
        manager.open_channel()
    assert isinstance(info.value.reason, ConnectionRefusedError)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert isinstance(info.value, OperationalError)


def test_open_channel_before_start_and_after_stop(make_manager):
    manager, _ = make_manager(start=False)
    with pytest.raises(Disconnected, match="not started"):
        manager.open_channel()
    manager.start()
    assert manager.wait_connected(5)
    manager.stop()
    with pytest.raises(Disconnected):
        manager.open_channel()


def test_start_and_stop_are_idempotent_and_the_manager_restarts(make_manager, faults):
    manager, events = make_manager(start=False)
    manager.stop()  # never started: no-op
    manager.start()
    manager.start()
    assert manager.wait_connected(5)
    manager.stop()
    manager.stop()
    assert manager.state is ConnectionState.STOPPED
    assert events.count("stopped") == 1
    assert faults.connections == 1
    manager.start()
    assert manager.wait_connected(5)
    assert faults.connections == 2


def test_context_manager_starts_and_stops(faults):
    with ConnectionManager("faulty://") as manager:
        assert manager.wait_connected(5)
        with manager.channel() as lease:
            lease.queue_declare("q")
    assert manager.state is ConnectionState.STOPPED


def test_events_in_order_through_failure_loss_and_stop(make_manager, faults):
    faults.refuse = 1
    manager, events = make_manager()
    assert events.wait_count("connected", 1)
    faults.cut()
    assert events.wait_count("connected", 2)
    manager.stop()
    assert events.names() == [
        "connecting", "connect_failed", "connecting", "connected",
        "disconnected", "connecting", "connected", "stopped",
    ]
    error, delay = events.args("connect_failed")[0]
    assert isinstance(error, ConnectionRefusedError) and delay == 0.01
    (lost,) = events.args("disconnected")[0]
    assert isinstance(lost, ConnectionResetError)
    assert manager.status().reconnects == 1


def test_backoff_schedule_and_restart_after_success(make_manager, faults):
    faults.refuse = 3
    manager, events = make_manager(backoff=Backoff(min=0.01, max=0.04, jitter=False))
    assert events.wait_count("connected", 1)
    assert [d for _, d in events.args("connect_failed")] == [0.01, 0.02, 0.04]
    faults.refuse = 2
    faults.cut()
    assert events.wait_count("connected", 2)
    # after a success the schedule starts again at min
    assert [d for _, d in events.args("connect_failed")][3:] == [0.01, 0.02]


def test_jittered_delays_reported_within_bounds(make_manager, faults):
    faults.refuse = 4
    manager, events = make_manager(backoff=Backoff(min=0.01, max=0.05, jitter=True))
    assert events.wait_count("connected", 1)
    delays = [d for _, d in events.args("connect_failed")]
    for got, top in zip(delays, [0.01, 0.02, 0.04, 0.05]):
        assert 0.01 <= got <= top


def test_max_tries_moves_to_failed(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager(backoff=Backoff(min=0.01, jitter=False, max_tries=3))
    assert events.wait_count("connect_failed", 3)
    result = []
    waiter = threading.Thread(target=lambda: result.append(manager.wait_connected(None)), daemon=True)
    waiter.start()
    waiter.join(5)
    assert result == [False]  # returns as soon as it gave up, even without a timeout
    assert manager.state is ConnectionState.FAILED
    status = manager.status()
    assert status.attempts == 3 and status.next_attempt_in is None and not status.fatal
    assert status.gave_up and status.as_dict()["gave_up"] is True
    assert [d for _, d in events.args("connect_failed")] == [0.01, 0.02, None]
    assert len(faults.attempts) == 3
    with pytest.raises(Disconnected, match="gave up"):
        manager.open_channel()
    manager.stop()
    faults.refuse = 0
    manager.start()  # a restart starts a fresh policy
    assert manager.wait_connected(5)
    assert not manager.status().gave_up


def test_stop_during_backoff_returns_promptly(make_manager, faults):
    faults.refuse = -1
    manager, events = make_manager(backoff={"min": 30.0, "max": 60.0})
    assert events.wait_count("connect_failed", 1)
    started = time.monotonic()
    manager.stop()
    assert time.monotonic() - started < 0.5
    assert manager.state is ConnectionState.STOPPED
    assert events.names()[-1] == "stopped"


def test_fatal_error_is_visible_and_retried_only_at_max(make_manager, faults):
    faults.fatal = True
    manager, events = make_manager(backoff=Backoff(min=0.01, max=0.3, jitter=False))
    assert events.wait_count("connect_failed", 1)
    error, delay = events.args("connect_failed")[0]
    assert isinstance(error, AccessRefused)
    assert delay == 0.3  # straight to the slowest retry, never a hot loop
    assert manager.state is ConnectionState.FAILED
    status = manager.status()
    assert status.fatal and "ACCESS_REFUSED" in status.last_error
    with pytest.raises(Disconnected) as info:
        manager.open_channel()
    assert isinstance(info.value.reason, AccessRefused)
    # fixed on the broker side: the next slow retry heals it
    faults.fatal = False
    assert manager.wait_connected(5)
    assert not manager.status().fatal


def test_failover_urls_rotate_on_every_failed_attempt(make_manager, faults):
    faults.refuse_hosts = {"a"}
    manager, events = make_manager("faulty://a;faulty://b")
    assert manager.wait_connected(5)
    assert faults.attempts[:2] == ["a", "b"]
    assert manager.status().broker == "faulty://"


def test_callback_exceptions_are_logged_and_harmless(make_manager, faults, caplog):
    manager, events = make_manager(start=False)

    def boom():
        raise RuntimeError("callback bug")

    manager.on("connected", boom)
    with caplog.at_level(logging.ERROR, logger="carrot_kombu"):
        manager.start()
        assert events.wait_count("connected", 1)
        manager.stop()
    assert "callback bug" in caplog.text
    assert events.names()[-1] == "stopped"


def test_callbacks_run_without_internal_locks(make_manager, faults):
    """A callback may call back into the manager (status, open_channel) without deadlock."""
    manager, events = make_manager(start=False)
    seen = []

    def on_connected():
        seen.append(manager.status().state)
        with manager.channel() as lease:
            lease.queue_declare("from-callback")

    manager.on("connected", on_connected)
    manager.start()
    assert events.wait_count("connected", 1)
    manager.stop()
    assert seen == [ConnectionState.CONNECTED]


def test_on_off_validate_event_names(make_manager):
    manager, _ = make_manager(start=False)
    with pytest.raises(ConfigurationError, match="unknown event"):
        manager.on("connect", lambda: None)
    cb = manager.on("stopped", lambda: None)
    manager.off("stopped", cb)
    manager.off("stopped", cb)


def test_wait_connected_times_out(make_manager, faults):
    faults.refuse = -1
    manager, _ = make_manager()
    assert manager.wait_connected(0.05) is False


def test_password_never_reaches_logs_events_status_or_errors(make_manager, faults, caplog):
    secret = "s3cr3t-Pw"
    faults.refuse = 1
    with caplog.at_level(logging.DEBUG):
        manager, events = make_manager(f"faulty://user:{secret}@a", password=secret)
        assert events.wait_count("connected", 1)
        faults.cut()
        assert events.wait_count("connected", 2)
        text = repr(manager) + str(manager.status().as_dict()) + repr(events.events)
        manager.stop()
    assert secret not in caplog.text
    assert secret not in text


def test_errors_pickle_with_their_reason():
    cause = ConnectionRefusedError(111, "refused")
    for cls in (Disconnected, PoolTimeout, ConfigurationError, CarrotKombuError):
        err = cls("message", cause)
        clone = pickle.loads(pickle.dumps(err))
        assert type(clone) is cls and str(clone) == "message"
        assert isinstance(clone.reason, ConnectionRefusedError) and clone.reason.errno == 111
    refused = pickle.loads(pickle.dumps(Disconnected("x", AccessRefused("nope", (10, 11), 403))))
    assert isinstance(refused.reason, AccessRefused)


def test_unpicklable_reason_still_pickles():
    class Local(Exception):
        pass

    clone = pickle.loads(pickle.dumps(Disconnected("x", Local("inner"))))
    assert "inner" in str(clone.reason)


def test_exception_hierarchy():
    assert issubclass(Disconnected, CarrotKombuError) and issubclass(Disconnected, OperationalError)
    assert issubclass(ConfigurationError, ValueError) and issubclass(ConfigurationError, CarrotKombuError)
    assert issubclass(PoolTimeout, CarrotKombuError)


def test_restart_after_a_stop_that_timed_out(make_manager, faults):
    """A supervisor stuck in an attempt must not disturb the manager started again."""
    faults.gate = gate = threading.Event()
    faults.gate_once = True
    manager, events = make_manager()
    assert faults.wait_attempts(1)
    manager.stop(timeout=0.1)  # the attempt is stuck: stop gives up waiting
    assert manager.state is ConnectionState.STOPPED
    assert events.wait_count("stopped", 1)
    manager.start()
    assert manager.wait_connected(5)
    gate.set()  # the old attempt now completes; the old supervisor must stay silent
    assert faults.wait_attempts(2)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and faults.connections < 2:
        time.sleep(0.01)
    with manager.channel() as lease:
        lease.queue_declare("after-restart")
    assert manager.connected
    assert events.count("stopped") == 1


@pytest.mark.parametrize("bad, error", [("1", TypeError), (True, TypeError), (float("nan"), ValueError), (-1, ValueError)])
def test_every_timeout_argument_is_validated_before_anything_waits(make_manager, faults, bad, error):
    """A careless timeout gets one clear error naming the argument: never a hang, a hot loop or a raw TypeError."""
    manager, _ = make_manager()
    assert manager.wait_connected(5)
    calls = {
        "timeout": [
            lambda: manager.wait_connected(bad),
            lambda: manager.open_channel(timeout=bad),
            lambda: manager.publish_many([b"x"], routing_key="q", timeout=bad),
            lambda: manager.drain_events(timeout=bad),
            lambda: manager.stop(timeout=bad),
        ],
        "wait": [lambda: manager.start(wait=bad)],
    }
    for name, funcs in calls.items():
        for call in funcs:
            start = time.monotonic()
            with pytest.raises(error, match=name):
                call()
            assert time.monotonic() - start < 1
    assert manager.status().state is ConnectionState.CONNECTED  # nothing was half-done


def test_an_infinite_timeout_means_no_limit(make_manager, faults):
    """inf, and finite values too large for the platform's waits (1e308, 10**400), wait without limit."""
    import sys

    manager, _ = make_manager(start=False)
    manager.start(wait=float("inf"))
    for huge in (sys.float_info.max, 10**400):
        assert manager.wait_connected(huge)
        with manager.channel(timeout=huge) as lease:
            assert lease.valid
        manager.publish_many([b"x"], routing_key="q", timeout=huge)
    assert manager.wait_connected(float("inf"))
    with manager.channel(timeout=float("inf")) as lease:
        assert lease.valid
    manager.stop(timeout=float("inf"))
    assert manager.status().state is ConnectionState.STOPPED


def test_only_a_connect_that_found_nobody_listening_is_probed_and_local_files_are_fatal():
    import errno
    import socket
    import ssl

    from carrot_kombu._supervisor import failed_before_tcp, is_fatal

    refused = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert failed_before_tcp(refused) and failed_before_tcp(socket.gaierror(-2, "unknown host"))
    assert failed_before_tcp(Disconnected("not connected", refused))  # wrapped, as the manager reports it
    for after_tcp in (ConnectionResetError(errno.ECONNRESET, "reset"), socket.timeout("timed out"),
                      ssl.SSLError(1, "wrong version"), AccessRefused("no"), OSError(errno.EINVAL, "bad")):
        assert not failed_before_tcp(after_tcp), after_tcp
    tls_to_plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    tls_to_plain.reason = "WRONG_VERSION_NUMBER"  # a str, as ssl sets it: never followed as a cause
    assert not failed_before_tcp(tls_to_plain)
    assert not failed_before_tcp(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"))
    assert is_fatal(FileNotFoundError(errno.ENOENT, "no such file: client.pem"))
    assert not is_fatal(refused)


def test_an_interrupted_stop_is_finished_by_the_next_stop(make_manager, faults):
    """Ctrl-C during stop(): the next stop() must still end every thread and deliver "stopped" once.

    It used to return at once (the supervisor was already taken), leaving the
    event thread running; and Python 3.11's interrupted ``Thread.join`` marks
    a running thread stopped, so waiting must not rely on ``join``.
    """
    import signal

    class Interrupt(Exception):
        pass

    def handler(signum, frame):
        raise Interrupt()

    for _ in range(5):  # the interrupted join's damage is timing dependent: several rounds
        faults.reset()
        faults.gate = gate = threading.Event()
        faults.gate_once = True
        manager, events = make_manager()
        assert faults.wait_attempts(1)  # the supervisor is stuck in an attempt: stop() waits for it
        previous = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(Interrupt):
                manager.stop()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        gate.set()
        manager.stop(timeout=5)
        assert manager.state is ConnectionState.STOPPED
        assert events.names().count("stopped") == 1, events.names()
        # (The transport's janitor is the process's, not this manager's: another test may have left it.)
        left = [t.name for t in threading.enumerate()
                if t.name.startswith("carrot-kombu") and t.name != "carrot-kombu-transport-janitor" and t.is_alive()]
        assert not left, left
    manager.start()
    assert manager.wait_connected(5)


def test_a_refusal_scrubbed_of_the_password_keeps_its_class():
    """guest/guest: the broker's text names the user, which is the password; kombu decides by class (found by attack)."""
    from amqp.exceptions import NotAllowed

    from carrot_kombu._supervisor import _public

    refused = NotAllowed("NOT_ALLOWED - access to vhost 'x' refused for user 'guest'", (10, 40), None, 530)
    public = _public(refused, "NotAllowed: " + str(refused).replace("guest", "**"))
    assert type(public) is NotAllowed and public.reply_code == 530
    assert "guest" not in str(public) and str(public).count("(530)") == 1


def test_a_stopped_manager_that_is_dropped_ends_its_consumer_threads(faults):
    """stop() keeps consumers registered (start() resubscribes them); dropping the manager must end their threads."""
    import gc

    from carrot_kombu import ConnectionManager

    def run_once() -> None:
        manager = ConnectionManager("faulty://", backoff={"min": 0.01, "max": 0.05})
        manager.start(wait=5)
        manager.consume("leak-check", lambda body, message: None)
        manager.stop(timeout=5)

    for _ in range(3):
        run_once()
    gc.collect()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(t.name.startswith("carrot-kombu-consumer") for t in threading.enumerate()):
        time.sleep(0.02)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("carrot-kombu-consumer")]


def test_stopped_is_delivered_when_the_loop_ends_just_as_stop_gives_up_on_it(make_manager, faults, monkeypatch):
    """stop() times out on a stuck attempt and retires the supervisor just as its loop ends.

    Forced interleaving: the loop marks the board STOPPED, then stop()
    retires it.  Both used to leave the ``stopped`` event to the other, and
    stop() returned without it (1 run in 5 of a blackholed handshake).
    """
    from carrot_kombu._supervisor import Supervisor
    from carrot_kombu.status import StateBoard

    in_stopped, retired = threading.Event(), threading.Event()
    original_stopped, original_retire = StateBoard.stopped, Supervisor.retire

    def stopped(self):
        original_stopped(self)
        if threading.current_thread().name == "carrot-kombu-supervisor":
            in_stopped.set()
            retired.wait(5)  # the loop pauses between the board and the event

    def retire(self):
        gate.set()  # the stuck attempt ends; the loop sees stop() and ends
        assert in_stopped.wait(5)
        try:
            return original_retire(self)
        finally:
            retired.set()

    monkeypatch.setattr(StateBoard, "stopped", stopped)
    monkeypatch.setattr(Supervisor, "retire", retire)
    faults.gate = gate = threading.Event()
    faults.gate_once = True
    manager, events = make_manager()
    assert faults.wait_attempts(1)
    manager.stop(timeout=1)
    assert retired.is_set(), "the interleaving was not forced"
    assert events.names().count("stopped") == 1, events.names()
    assert manager.state is ConnectionState.STOPPED


def test_restart_after_fork_false_leaves_the_childs_manager_stopped_until_start(make_manager):
    """The transport's managers connect in a forked child only when the child first needs the broker."""
    import os

    from carrot_kombu import ConfigurationError, ConnectionManager, ConnectionState

    with pytest.raises(ConfigurationError, match="restart_after_fork"):
        ConnectionManager("memory://", restart_after_fork="no")
    manager, _ = make_manager(restart_after_fork=False)
    assert manager.wait_connected(5)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the state, then start on demand
        try:
            state = manager.state.value
            manager.start(wait=5)
            os.write(write, f"{state} {manager.state.value}".encode())
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = os.read(read, 100).decode()
    os.close(read)
    assert report == f"{ConnectionState.STOPPED.value} {ConnectionState.CONNECTED.value}", report
    assert manager.state is ConnectionState.CONNECTED  # the parent's is untouched


def test_the_background_threads_import_nothing_of_ours():
    """Every module a manager runs is imported on the caller's thread, never on the manager's own threads.

    An import on the supervisor's thread waits for the import lock of an
    application that starts its manager while being imported itself, and
    without bytecode files its compile's memory stays in that thread's arena.
    """
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent('''
        import sys, threading
        imports = []

        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name.startswith("carrot_kombu"):
                    imports.append((threading.current_thread().name, name))
                return None  # found by the usual finders

        sys.meta_path.insert(0, Watch())
        import carrot_kombu
        manager = carrot_kombu.ConnectionManager("memory://").start()
        assert manager.wait_connected(10)
        manager.publish(b"x", routing_key="ck-imports", timeout=5)
        with manager.channel() as lease:
            lease.queue_declare("ck-imports")
        manager.stop()
        print(sorted({name for thread, name in imports if thread != "MainThread"}))
        print("carrot_kombu._pyamqp.link" in {name for thread, name in imports})
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["[]", "True"], result.stdout


@pytest.mark.parametrize("first, second", [
    ("carrot_kombu.aio", "carrot_kombu.exceptions"),
    ("carrot_kombu.aio", "carrot_kombu.status"),
    ("carrot_kombu.manager", "carrot_kombu.aio"),
    ("carrot_kombu.transport", "carrot_kombu.consumers"),  # (celery.py needs the optional celery)
])
def test_two_threads_importing_the_package_for_the_first_time_at_once_both_succeed(first, second):
    """Red team 22: the package imported all its modules, and two first imports at once failed with
    ``_DeadlockError`` / ``ImportError`` (each thread held its module's lock while waiting for the package)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f'''
        import importlib, threading
        errors = []
        barrier = threading.Barrier(2)

        def load(name):
            barrier.wait()
            try:
                importlib.import_module(name)
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=load, args=(name,)) for name in ({first!r}, {second!r})]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        import carrot_kombu
        assert carrot_kombu.ConnectionManager and carrot_kombu.AsyncConnectionManager
        print(errors)
    ''')
    for _ in range(3):
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]", result.stdout


def test_every_public_name_has_a_home_and_loads():
    import carrot_kombu

    assert set(carrot_kombu._HOMES) == set(carrot_kombu.__all__)
    for name in carrot_kombu.__all__:
        assert getattr(carrot_kombu, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        carrot_kombu.nothing  # noqa: B018
    assert "ConnectionManager" in dir(carrot_kombu)

def test_a_refused_connection_leaves_an_error_chain_without_a_loop():
    """Code that walks ``__cause__``/``__context__`` without a seen-set (red team 22: a harness hung) ends."""
    import socket

    from tests.support import chain_loops

    with socket.socket() as probe:  # a port nobody listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{port}//", backoff=Backoff(min=0.05, max=0.1))
    try:
        manager.start()
        deadline = time.monotonic() + 10
        while manager.status().last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(Disconnected) as info:
            manager.open_channel()
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert chain_loops(info.value) == []
    finally:
        manager.stop()
