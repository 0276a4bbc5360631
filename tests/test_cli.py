"""The ``carrot-kombu`` command on ``memory://``, ``faulty://`` and a closed TCP port."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import threading
import time

import pytest

from carrot_kombu import Backoff, Status, cli

NO_URL_ENV = ("CARROT_KOMBU_URL", "CELERY_BROKER_URL")


@pytest.fixture
def no_url_env(monkeypatch):
    for name in NO_URL_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


class Watching:
    """``cli.watch`` on a thread, stopped (with a deadline) at the end."""

    def __init__(self, url, **options):
        self.out = io.StringIO()
        self.stop = threading.Event()
        self.result = []
        self.thread = threading.Thread(
            target=lambda: self.result.append(cli.watch(url, out=self.out, stop=self.stop, **options))
        )
        self.thread.start()

    def text(self):
        return self.out.getvalue()

    def lines(self):
        return self.text().splitlines()

    def wait_for(self, fragment, timeout=5.0):
        assert wait_until(lambda: fragment in self.text(), timeout), self.text()

    def finish(self, timeout=10.0):
        self.stop.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "watch did not stop"
        return self.result


@pytest.fixture
def watching():
    runs = []

    def start(url, **options):
        run = Watching(url, **options)
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.stop.set()
        run.thread.join(10)


# -- URLs ------------------------------------------------------------------------------


def test_cli_url_defaults(monkeypatch, no_url_env):  # moved from tests/test_integrations.py
    assert cli.url_from_environment() is None
    monkeypatch.setenv("CARROT_KOMBU_URL", "  ")
    assert cli.url_from_environment() is None  # blank counts as unset
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://c//")
    assert cli.url_from_environment() == "amqp://c//"
    monkeypatch.setenv("CARROT_KOMBU_URL", "amqp://k//")
    assert cli.url_from_environment() == "amqp://k//"


def test_masked_and_redactor_cover_failover_encoded_and_schemeless_urls():
    url = "amqp://u:s3cret@h1//;amqp://v:p%40ss@h2//"
    assert cli.masked(url) == "amqp://u:**@h1//;amqp://v:**@h2//"
    assert cli.redactor(url)("s3cret p%40ss p@ss") == "** ** **"
    assert cli.masked("w:raw-pw@h3") == "w:**@h3"
    assert cli.redactor("w:raw-pw@h3")("raw-pw") == "**"
    assert cli.redactor("amqp://u:p/ss@h//")("bad p/ss") == "bad **"  # unencoded '/'
    # A ';' separates failover URLs only before a scheme: this one is in the password.
    assert cli.masked("amqp://u:pa;ss@h//") == "amqp://u:**@h//"
    assert cli.redactor("amqp://u:pa;ss@h//")("pa;ss pa") == "** pa"
    assert cli.redactor("memory://")("memory:// unchanged") == "memory:// unchanged"


# -- check -----------------------------------------------------------------------------


def test_cli_check_exit_codes_on_memory_and_bad_config(capsys):  # moved from tests/test_integrations.py
    assert cli.main(["check", "memory://", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True and report["exit_code"] == 0 and report["fatal"] is False
    assert cli.main(["check", "redis://h"]) == 2
    assert cli.main(["check", "amqp://u:s3cret-x@h:99999//"]) == 2
    assert cli.main(["check", "u:s3cret-y@h"]) == 2  # no scheme: the core's message shows the URL
    out = capsys.readouterr().out
    assert out.count("FAILED") == 3 and "configuration:" in out
    assert "s3cret-x" not in out and "s3cret-y" not in out


def test_check_on_memory_prints_no_placeholders(capsys):
    assert cli.main(["check", "memory://"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK memory://: connect ") and "None" not in out


@pytest.mark.parametrize("as_json", [False, True])
def test_check_without_any_url_fails_with_2_instead_of_probing_memory(capsys, no_url_env, as_json):
    assert cli.main(["check", *(["--json"] if as_json else [])]) == 2
    out = capsys.readouterr().out
    assert "no broker URL given" in out and "$CARROT_KOMBU_URL" in out and "memory://" in out
    if as_json:
        report = json.loads(out)
        assert report["broker"] is None and not report["healthy"] and report["exit_code"] == 2
    else:
        assert out.startswith("FAILED: no broker URL given")


def test_check_treats_an_empty_argument_as_none(capsys, monkeypatch, no_url_env):
    assert cli.main(["check", ""]) == 2
    assert "no broker URL given" in capsys.readouterr().out
    monkeypatch.setenv("CELERY_BROKER_URL", "memory://")
    assert cli.main(["check", ""]) == 0  # then the environment applies


def test_check_takes_the_url_from_the_environment(capsys, monkeypatch, no_url_env):
    monkeypatch.setenv("CARROT_KOMBU_URL", "memory://")
    assert cli.main(["check"]) == 0
    assert capsys.readouterr().out.startswith("OK memory://")


def test_check_closed_port_is_unreachable_not_fatal(capsys, closed_port):
    url = f"amqp://guest:port-secret@127.0.0.1:{closed_port}//"
    started = time.monotonic()
    assert cli.main(["check", url, "--timeout", "5", "--json"]) == 1
    assert time.monotonic() - started < 5  # refused at once: nothing waits for the timeout
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["healthy"] is False and report["fatal"] is False and report["exit_code"] == 1
    assert report["broker"] == f"amqp://guest:**@127.0.0.1:{closed_port}//"
    assert "ConnectionRefusedError" in report["error"] and "port-secret" not in out
    assert cli.main(["check", url, "--timeout", "5"]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"FAILED amqp://guest:**@127.0.0.1:{closed_port}//: ") and "fatal" not in out


def test_check_rejects_a_non_positive_timeout(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check", "memory://", "--timeout", "0"])
    assert exit_info.value.code == 2
    assert "--timeout must be > 0" in capsys.readouterr().err


# -- watch -----------------------------------------------------------------------------


def test_cli_watch_prints_state_changes_and_stops(faults, watching):  # moved from tests/test_integrations.py
    faults.refuse = 1
    run = watching("faulty://")
    assert faults.wait_attempts(2)
    run.wait_for("connected to")
    assert run.finish() == [0]
    lines = run.lines()
    assert "connect failed: ConnectionRefusedError" in lines[1] and "-> next attempt in" in lines[1]
    events = [line.split(" ", 1)[1].split(":")[0].split(" to ")[0] for line in lines]
    assert events == ["connecting", "connect failed", "connecting", "connected", "stopped"], lines
    assert "connected to faulty://" in lines[3]


def test_watch_prints_one_line_per_state_change_and_no_countdown(faults, watching):
    faults.fatal = True  # refused fatally: the next attempt is Backoff.max (30 s) away
    run = watching("faulty://")
    run.wait_for("fatal")
    # The old watch printed "next attempt in 29s, 28s..." every second.
    time.sleep(2.5)
    assert run.finish() == [0]
    lines = run.lines()
    assert len(lines) == 3, lines
    assert lines[0].endswith("connecting to faulty://")
    assert "connect failed: AccessRefused" in lines[1] and lines[1].endswith("-> fatal: retrying every 30 s")
    assert lines[2].endswith(" stopped")


def test_watch_says_when_the_policy_gave_up(faults, watching):
    faults.fatal = True
    run = watching("faulty://", backoff=Backoff(min=0.01, max=0.05, max_tries=2))
    run.wait_for("gave up")
    assert run.finish() == [0]
    lines = run.lines()
    assert "-> fatal: retrying every 0.05 s" in lines[1]
    assert lines[3].endswith("-> fatal, gave up") and lines[4].endswith(" stopped"), lines


def test_watch_json_one_object_per_event(faults, watching):
    faults.refuse = 1
    run = watching("faulty://", as_json=True, backoff=Backoff(min=0.05, max=0.1, jitter=False))
    run.wait_for('"connected"')
    faults.cut()
    assert wait_until(lambda: run.text().count('"event": "connected"') == 2), run.text()
    assert run.finish() == [0]
    records = [json.loads(line) for line in run.lines()]
    assert [r["event"] for r in records] == [
        "connecting", "connect_failed", "connecting", "connected",
        "disconnected", "connecting", "connected", "stopped",
    ]
    keys = {"time", "event", "state", "broker", "error", "fatal", "gave_up", "next_delay", "reason", "server"}
    assert all(set(r) == keys for r in records)
    assert [r["state"] for r in records] == [
        "CONNECTING", "DISCONNECTED", "CONNECTING", "CONNECTED",
        "DISCONNECTED", "CONNECTING", "CONNECTED", "STOPPED",
    ]
    failed, lost = records[1], records[4]
    assert failed["error"].startswith("ConnectionRefusedError") and failed["next_delay"] == 0.05
    assert failed["fatal"] is False and failed["gave_up"] is False
    assert lost["error"].startswith("ConnectionResetError")
    assert all(r["broker"] == "faulty://" for r in records)
    assert records[0]["time"].endswith("+00:00") and records[-1]["error"] is None


def test_watch_json_reports_fatal(faults, watching):
    faults.fatal = True
    run = watching("faulty://", as_json=True)
    run.wait_for('"connect_failed"')
    assert run.finish() == [0]
    failed = json.loads(run.lines()[1])
    assert failed["fatal"] is True and failed["state"] == "FAILED" and failed["next_delay"] == 30.0
    assert "ACCESS_REFUSED" in failed["error"] and failed["gave_up"] is False


def test_event_printer_lines_and_redaction():
    out = io.StringIO()
    status = Status(broker="amqp://u:**@h:5672//", fatal=True)
    printer = cli.EventPrinter(lambda: status, out, False, cli.redactor("amqp://u:hunter2@h//"))
    printer.emit("blocked", reason="low on memory")
    printer.emit("unblocked")
    printer.connect_failed(RuntimeError("login hunter2 refused"), 30.0)
    printer.connect_failed(RuntimeError("login hunter2 refused"), None)
    printer.emit("disconnected", error=ConnectionResetError("reset"))
    printer.finish()
    printer.finish()  # once only
    printer.emit("connected")  # nothing after stopped
    lines = [line.split(" ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "blocked by the broker: low on memory",
        "unblocked",
        "connect failed: RuntimeError: login ** refused -> fatal: retrying every 30 s",
        "connect failed: RuntimeError: login ** refused -> fatal, gave up",
        "disconnected from amqp://u:**@h:5672//: ConnectionResetError: reset",
        "stopped",
    ]


def test_watch_bad_or_missing_url_exits_2(capsys, no_url_env):
    assert cli.main(["watch"]) == 2
    assert capsys.readouterr().out.startswith("FAILED: no broker URL given")
    assert cli.main(["watch", "--json", "amqp://u:w-secret@h:99999//"]) == 2
    out = capsys.readouterr().out
    record = json.loads(out)
    assert record["event"] == "error" and record["fatal"] is True and "w-secret" not in out
    assert record["broker"] == "amqp://u:**@h:99999//"
    assert record["state"] == "FAILED"  # one of the documented states, never null (red team 19.8)


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name != "posix", reason="POSIX signals")
def test_watch_stops_on_sigterm_and_restores_the_handlers(faults):
    """In the main thread, as the command runs: SIGTERM stops the manager, exit 0."""
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = io.StringIO()
    sent = threading.Event()

    def terminate():
        # Never send SIGTERM before watch has taken it over: that would end pytest.
        if wait_until(lambda: "connected to" in out.getvalue()) and signal.getsignal(signal.SIGTERM) not in before:
            os.kill(os.getpid(), signal.SIGTERM)
            sent.set()

    killer = threading.Thread(target=terminate)
    killer.start()
    stop = threading.Event()
    watchdog = threading.Timer(15, stop.set)  # a deadline even if the signal is never sent
    watchdog.start()
    try:
        code = cli.watch("faulty://", out=out, stop=stop)
    finally:
        watchdog.cancel()
        killer.join(10)
    assert sent.is_set() and not stop.is_set(), out.getvalue()
    assert code == 0 and out.getvalue().rstrip().endswith(" stopped")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# -- help and demo -----------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["check"], ["watch"], ["demo"]])
def test_help_is_plain_text_with_exit_codes(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":meth:" not in text and "\n* " not in text
    assert "exit codes:" in text
    if command != ["demo"]:
        assert "$CARROT_KOMBU_URL" in text


def test_demo_still_defaults_to_memory(capsys, no_url_env):
    assert cli.main(["demo", "--threads", "2", "--messages", "5"]) == 0
    assert capsys.readouterr().out.startswith("carrot-kombu demo on memory://: 10 messages from 2 threads")
