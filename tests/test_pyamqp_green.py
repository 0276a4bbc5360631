"""The wire under monkey-patched green threads (Celery's ``-P eventlet`` / ``-P gevent``).

Monkey-patching is process-wide and cannot be undone, so each case runs in a
fresh interpreter that patches first (as ``celery -P eventlet`` does) and
then drives a :class:`~carrot_kombu._pyamqp.wire.Wire` over a socket pair.
What a user relies on: the connection's reader waits *cooperatively* (other
green threads keep running, a wake-up ends the wait at once), frames are read
and written, draining a wake-up pipe never waits for more, and killing the
wire wakes its reader.  Without patching, the wire keeps ``select.poll``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r'''
import sys
hub = sys.argv[1]
if hub == "eventlet":
    import eventlet
    eventlet.monkey_patch()
elif hub == "gevent":
    from gevent import monkey
    monkey.patch_all()
import json, os, select, socket, threading, time
from carrot_kombu._pyamqp.green import SelectPoller, read_fd, write_fd
from carrot_kombu._pyamqp.wire import Wire

out = {}
a, b = socket.socketpair()
wire = Wire(a)
out["poller"] = type(wire._fds.rpoll).__name__
got = []

def dispatch(todo):
    while todo:
        kind, channel, payload = todo.popleft()
        got.append([kind, channel, bytes(payload).decode()])

b.sendall(b"\x08\x00\x00\x00\x00\x00\x00\xce")  # a heartbeat frame
out["read"] = wire.read(5, dispatch)
out["frames"] = got

ticks = []

def other():
    for _ in range(3):
        ticks.append(time.monotonic())
        time.sleep(0.05)
    wire.wake_reader()

started = time.monotonic()
thread = threading.Thread(target=other)
thread.start()
out["woken_read"] = wire.read(10, dispatch)
out["woken_after"] = time.monotonic() - started
out["ticks_while_reading"] = len(ticks)
thread.join()

r, w = os.pipe()
os.set_blocking(r, False)
os.set_blocking(w, False)
write_fd(w, b"x")
drained = []
started = time.monotonic()
try:
    while True:
        data = read_fd(r, 4096)
        if not data:
            break
        drained.append(data.decode())
except BlockingIOError:
    pass
out["drained"] = drained
out["drain_seconds"] = time.monotonic() - started

wire.send([b"hello"])
out["sent"] = b.recv(5).decode()

def killer():
    time.sleep(0.1)
    wire.kill(OSError("test kill"))

started = time.monotonic()
threading.Thread(target=killer).start()
try:
    while time.monotonic() - started < 10:  # a reader loops on read() as the connection's does
        wire.read(10, dispatch)
    out["killed"] = "read went on"
except OSError as exc:
    out["killed"] = type(exc).__name__
out["killed_after"] = time.monotonic() - started
wire.close()
b.close()
print(json.dumps(out))
'''


def need(module: str) -> None:
    """eventlet and gevent come with the test extra; the low-end run (make test-low-end) has neither."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (it is in the test extra: pip install -e '.[test]')")


def run_script(script: str, *args: str) -> str:
    """``script`` in a fresh interpreter (this checkout first on the path); its stdout, once it exited 0."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", script, *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def run_under(hub: str) -> dict:
    return json.loads(run_script(SCRIPT, hub).strip().splitlines()[-1])


@pytest.mark.parametrize("hub", ["eventlet", "gevent", "threads"])
def test_the_wire_waits_cooperatively_under_each_hub(hub) -> None:
    if hub != "threads":
        need(hub)
    out = run_under(hub)
    assert out["poller"] == ("SelectPoller" if hub != "threads" else "poll")
    assert out["read"] is True and out["frames"] == [[8, 0, ""]]
    # the reader's wait let the other thread run, and its wake-up ended the wait at once
    assert out["woken_read"] is False and out["ticks_while_reading"] == 3
    assert out["woken_after"] < 2.0
    # a drained pipe says so at once instead of waiting for the next byte
    assert out["drained"] == ["x"] and out["drain_seconds"] < 1.0
    assert out["sent"] == "hello"
    assert out["killed"] in ("ConnectionAbortedError", "ConnectionResetError") and out["killed_after"] < 2.0


LATE = r'''
import socket
from carrot_kombu import ConnectionManager  # before the patching: its locks are OS locks
import eventlet
eventlet.monkey_patch()
from carrot_kombu._pyamqp.wire import Wire
a, b = socket.socketpair()
try:
    Wire(a)
except RuntimeError as exc:
    print(type(exc).__name__, exc)
'''


def test_a_green_wire_refuses_when_carrot_kombu_was_imported_before_the_patching() -> None:
    need("eventlet")
    stdout = run_script(LATE)
    assert stdout.startswith("PatchedTooLate carrot_kombu was imported before eventlet/gevent"), stdout
    assert "-P prefork or -P threads" in stdout


PACKAGE_FIRST = r'''
import socket
import carrot_kombu  # before the patching: loads none of its modules (their locks are made after)
import eventlet
eventlet.monkey_patch()
from carrot_kombu._pyamqp.wire import Wire
a, b = socket.socketpair()
print(Wire(a).green)
'''


def test_importing_the_package_alone_before_the_patching_is_fine() -> None:
    need("eventlet")
    stdout = run_script(PACKAGE_FIRST)
    assert stdout.split() == ["True"], stdout


KOMBU_FIRST = r'''
import kombu.utils.functional  # as `celery -P gevent` does: imported before the patching
from gevent import monkey
monkey.patch_all()
import socket, time
from carrot_kombu._pyamqp.wire import Wire
before = kombu.utils.functional.sleep is time.sleep
a, b = socket.socketpair()
Wire(a)
print(before, kombu.utils.functional.sleep is time.sleep)
'''


def test_a_green_wire_makes_kombus_retry_loop_sleep_cooperatively() -> None:
    """Celery's reconnect loop (kombu ``retry_over_time``) must not freeze the supervisor's green thread."""
    need("gevent")
    stdout = run_script(KOMBU_FIRST)
    assert stdout.split() == ["False", "True"]
