"""The ``carrot-kombu`` command, run as a subprocess, on the real broker."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

CLI = shutil.which("carrot-kombu") or os.path.join(os.path.dirname(sys.executable), "carrot-kombu")

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def run_cli(*args, timeout=60, env=None):
    """Run to completion; ``subprocess.run`` kills the child if the timeout expires."""
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def env_without_url():
    env = dict(os.environ)
    for name in ("CARROT_KOMBU_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)
    return env


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A running command whose output lines are collected by reader threads."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.cond = threading.Condition()
        self.lines = []
        self.err = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, into):
        for line in stream:
            with self.cond:
                into.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_line(self, predicate, timeout=15):
        """The first output line matching ``predicate``; fails after ``timeout`` seconds."""
        def found():
            return next((line for line in self.lines if predicate(line)), None)

        with self.cond:
            self.cond.wait_for(lambda: found() is not None or self.proc.poll() is not None, timeout)
            line = found()
        assert line is not None, (self.lines, self.err)
        return line

    def finish(self, timeout):
        """Wait for exit (at most ``timeout`` s) and for the readers; the exit code."""
        code = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(5)
        return code

    def kill(self):
        """Kill if still running, then release the pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for reader in self.readers:
            reader.join(5)
        self.proc.stdout.close()
        self.proc.stderr.close()


@contextmanager
def running(*args):
    run = Running(*args)
    try:
        yield run
    finally:
        run.kill()


# -- check -----------------------------------------------------------------------------


def test_cli_check_healthy(amqp_url):  # moved from integration/test_integrations.py
    result = run_cli("check", amqp_url, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["healthy"] and report["server"]["product"] == "RabbitMQ" and report["fatal"] is False
    assert report["heartbeat"] and report["frame_max"] and report["channel_max"]
    assert report["connect_ms"] > 0 and report["channel_open_ms"] > 0
    assert ":**@" in report["broker"] and "guest:guest" not in result.stdout
    plain = run_cli("check", amqp_url)
    assert plain.returncode == 0 and plain.stdout.startswith("OK ") and "RabbitMQ" in plain.stdout


def test_cli_check_unreachable_and_refused(amqp_url):  # moved from integration/test_integrations.py
    port = closed_port()
    unreachable = run_cli("check", f"amqp://guest:guest@127.0.0.1:{port}//", "--timeout", "3")
    assert unreachable.returncode == 1 and unreachable.stdout.startswith("FAILED")
    assert "fatal" not in unreachable.stdout
    secret = "not-the-password"
    refused = run_cli("check", f"amqp://guest:{secret}@127.0.0.1:5672//", "--json")
    assert refused.returncode == 2
    report = json.loads(refused.stdout)
    assert "ACCESS_REFUSED" in report["error"] and report["fatal"] is True and report["exit_code"] == 2
    assert secret not in refused.stdout + refused.stderr
    plain = run_cli("check", f"amqp://guest:{secret}@127.0.0.1:5672//")
    assert plain.returncode == 2 and "ACCESS_REFUSED" in plain.stdout and "fatal" in plain.stdout
    assert secret not in plain.stdout + plain.stderr
    env = dict(env_without_url(), CARROT_KOMBU_URL=amqp_url)
    assert run_cli("check", env=env).returncode == 0  # URL from the environment
    env = dict(env_without_url(), CELERY_BROKER_URL=amqp_url)
    assert run_cli("check", env=env).returncode == 0


def test_check_without_any_url_fails_instead_of_probing_memory():
    result = run_cli("check", env=env_without_url())
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.startswith("FAILED: no broker URL given")
    as_json = run_cli("check", "--json", env=env_without_url())
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["healthy"] is False


def test_python_dash_m_is_the_same_command(amqp_url):  # moved from integration/test_integrations.py
    result = subprocess.run(
        [sys.executable, "-m", "carrot_kombu", "check", amqp_url], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.startswith("OK ")


# -- watch -----------------------------------------------------------------------------


@posix_only
def test_cli_watch_runs_until_ctrl_c(amqp_url):  # moved from integration/test_integrations.py
    with running("watch", amqp_url) as run:
        run.wait_line(lambda line: "connected to amqp://guest:**@" in line)
        run.proc.send_signal(signal.SIGINT)
        assert run.finish(timeout=15) == 0, run.err
    assert "connecting to amqp://guest:**@" in run.lines[0] and run.lines[-1].endswith(" stopped")
    assert len(run.lines) == 3, run.lines  # connecting, connected, stopped: no countdown lines
    assert "guest:guest" not in "\n".join(run.lines + run.err)


@posix_only
def test_watch_json_stops_cleanly_on_sigterm(amqp_url):
    with running("watch", "--json", amqp_url) as run:
        run.wait_line(lambda line: '"event": "connected"' in line)
        started = time.monotonic()
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(timeout=10) == 0, run.err
        assert time.monotonic() - started < 5
    records = [json.loads(line) for line in run.lines]
    assert [r["event"] for r in records] == ["connecting", "connected", "stopped"]
    assert records[-1]["state"] == "STOPPED" and records[1]["server"].startswith("RabbitMQ")
    assert all(r["broker"].startswith("amqp://guest:**@") for r in records)
    assert "guest:guest" not in "\n".join(run.lines + run.err)


@posix_only
def test_watch_says_fatal_for_a_wrong_password_and_stops_on_sigterm():
    secret = "wrong-watch-password"
    with running("watch", f"amqp://guest:{secret}@127.0.0.1:5672//") as run:
        line = run.wait_line(lambda line: "connect failed" in line)
        assert "ACCESS_REFUSED" in line and line.endswith("-> fatal: retrying every 30 s")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(timeout=10) == 0, run.err  # not 30 s: the wait is interrupted
    assert run.lines[-1].endswith(" stopped")
    assert secret not in "\n".join(run.lines + run.err)


@posix_only
def test_watch_stops_on_sigterm_while_waiting_to_retry_an_unreachable_broker():
    with running("watch", "--json", f"amqp://guest:guest@127.0.0.1:{closed_port()}//") as run:
        failed = json.loads(run.wait_line(lambda line: '"connect_failed"' in line))
        assert failed["fatal"] is False and failed["next_delay"] > 0 and "ConnectionRefusedError" in failed["error"]
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish(timeout=10) == 0, run.err
    assert json.loads(run.lines[-1])["event"] == "stopped"


def test_watch_with_a_bad_or_missing_url_exits_2():
    bad = run_cli("watch", "amqp://guest:bad-url-secret@127.0.0.1:99999//", timeout=30)
    assert bad.returncode == 2 and bad.stdout.startswith("FAILED") and "bad-url-secret" not in bad.stdout
    missing = run_cli("watch", "--json", env=env_without_url(), timeout=30)
    assert missing.returncode == 2 and json.loads(missing.stdout)["event"] == "error"


# -- demo ------------------------------------------------------------------------------


def test_cli_demo_on_the_real_broker(amqp_url):  # moved from integration/test_integrations.py
    result = run_cli("demo", amqp_url, "--threads", "3", "--messages", "50")
    assert result.returncode == 0 and "150 messages from 3 threads" in result.stdout and "-> OK" in result.stdout


def demo_queues():
    """The demo queues on the shared broker now, with their message counts (rabbitmqctl)."""
    listing = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "messages", "-q", "--no-table-headers"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    rows = (line.split("\t") for line in listing.stdout.splitlines())
    return {row[0]: int(row[1]) for row in rows if len(row) == 2 and row[0].startswith("carrot-kombu-demo-")}


@posix_only
@pytest.mark.skipif(shutil.which("rabbitmqctl") is None, reason="needs rabbitmqctl next to the broker")
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_an_interrupted_demo_leaves_no_queue_on_the_broker(amqp_url, how):
    """Ctrl-C deletes the demo's queue in a ``finally``; after ``kill -9`` the broker drops it (exclusive)."""
    before = set(demo_queues())
    with running("demo", amqp_url, "--threads", "2", "--messages", "1000000") as run:
        deadline = time.monotonic() + 60
        ours = {}
        while not ours:  # the run is mid-way: its queue exists and holds messages
            assert run.proc.poll() is None and time.monotonic() < deadline, (run.lines, run.err)
            ours = {name: n for name, n in demo_queues().items() if name not in before and n > 0}
        run.proc.send_signal(getattr(signal, how))
        code = run.finish(timeout=30)
        if how == "SIGINT":
            assert code == 130, (run.lines, run.err)
            assert run.lines[-1].endswith("interrupted; its queue was removed"), (run.lines, run.err)
    (name,) = ours
    # The broker removes an exclusive queue when it notices the closed socket: at once on
    # this host, but poll with a deadline rather than assume the order.
    deadline = time.monotonic() + 30
    while name in demo_queues():
        assert time.monotonic() < deadline, f"{name} still on the broker after {how}"


@pytest.mark.parametrize("urls, code", [("dead;live", 0), ("dead", 1)])
def test_the_celery_subcommand_checks_the_apps_broker_and_its_failover_list(amqp_url, tmp_path, urls, code):
    """``celery -A app carrot-kombu``: exit 0 once one failover URL answers, 1 when none does (as ``check``)."""
    dead = f"carrot+amqp://guest:guest@127.0.0.1:{closed_port()}//"
    live = f"carrot+{amqp_url}"
    broker = ";".join({"dead": dead, "live": live}[part] for part in urls.split(";"))
    (tmp_path / "ckcliapp.py").write_text(
        f"from celery import Celery\napp = Celery('ckcliapp', broker={broker!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ckcliapp", "carrot-kombu", "--timeout", "5", "--json"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert proc.returncode == code, (proc.stdout, proc.stderr[-2000:])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exit_code"] == code
    assert "guest:guest" not in proc.stdout + proc.stderr


def test_check_takes_celerys_carrot_broker_url_from_the_environment(amqp_url):
    """The documented container probe: CELERY_BROKER_URL=carrot+amqp://... (it said "unknown URL scheme")."""
    env = env_without_url()
    env["CELERY_BROKER_URL"] = f"carrot+{amqp_url};carrot+amqp://guest:guest@127.0.0.1:{closed_port()}//"
    proc = run_cli("check", "--timeout", "5", env=env)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert proc.stdout.startswith("OK ") and "guest:guest" not in proc.stdout


def test_the_celery_subcommand_checks_with_the_apps_own_credentials(amqp_url, tmp_path):
    """broker_user/broker_password fill the URL as the app's producers get them (the probe used guest; found by attack)."""
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    (tmp_path / "ckcliapp2.py").write_text(
        "from celery import Celery\n"
        f"app = Celery('ckcliapp2', broker='carrot+amqp://{host}//')\n"
        "app.conf.broker_user = 'guest'\napp.conf.broker_password = 'wrong-password'\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "ckcliapp2", "carrot-kombu", "--timeout", "5"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr[-2000:])
    assert "ACCESS_REFUSED" in proc.stdout and "wrong-password" not in proc.stdout + proc.stderr
