"""The ``carrot-kombu`` command (also ``python -m carrot_kombu``).

* ``check [URL] [--timeout S] [--json]``: connect once, open a channel, report.
  Exit 0 healthy, 1 unreachable or timed out, 2 refused (credentials, vhost,
  certificate) or bad configuration.  Usable as a container healthcheck.
* ``watch [URL]``: run a manager and print every state change; Ctrl-C stops.
* ``demo [URL]``: the main job: publish and consume through pooled leases.

The URL defaults to ``$CARROT_KOMBU_URL``, then ``$CELERY_BROKER_URL``, then
``memory://``.  Passwords are masked in all output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Any, Optional, Sequence, TextIO

from .config import mask_url
from .demo import run_demo
from .exceptions import CarrotKombuError, ConfigurationError
from .manager import ConnectionManager
from .retry import Backoff
from .status import ConnectionState

__all__ = ("main",)

EXIT_OK, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2


def default_url() -> str:
    return os.environ.get("CARROT_KOMBU_URL") or os.environ.get("CELERY_BROKER_URL") or "memory://"


def check(url: str, timeout: float, as_json: bool, out: Optional[TextIO] = None) -> int:
    """Connect once (no retry), open a channel, print what the broker offered."""
    out = out or sys.stdout
    report: dict[str, Any] = {"broker": mask_url(url), "healthy": False}
    try:
        manager = ConnectionManager(
            url, backoff=Backoff(min=0.1, max_tries=1), connection_timeout=timeout, pool_limit=1
        )
    except ConfigurationError as exc:
        report["error"] = f"configuration: {exc}"
        return _report(report, as_json, out, EXIT_REFUSED)
    started = time.perf_counter()
    manager.start()
    try:
        connected = manager.wait_connected(timeout)
        connect_s = time.perf_counter() - started
        status = manager.status()
        report["broker"] = status.broker
        if not connected:
            report["error"] = status.last_error or f"no connection within {timeout}s"
            return _report(report, as_json, out, EXIT_REFUSED if status.fatal else EXIT_UNREACHABLE)
        opened = time.perf_counter()
        try:
            with manager.channel(timeout=timeout):
                channel_s = time.perf_counter() - opened
        except CarrotKombuError as exc:
            report["error"] = f"channel: {exc}"
            return _report(report, as_json, out, EXIT_UNREACHABLE)
        report.update(
            healthy=True,
            server={"product": status.server_product, "version": status.server_version},
            heartbeat=status.heartbeat,
            frame_max=status.frame_max,
            channel_max=status.channel_max,
            connect_ms=round(connect_s * 1000, 2),
            channel_open_ms=round(channel_s * 1000, 2),
        )
        return _report(report, as_json, out, EXIT_OK)
    finally:
        manager.stop(timeout=1.0)


def _report(report: dict[str, Any], as_json: bool, out: TextIO, code: int) -> int:
    report["exit_code"] = code
    if as_json:
        print(json.dumps(report, sort_keys=True), file=out)
    elif report["healthy"]:
        server = report["server"]
        print(
            f"OK {report['broker']}: {server['product']} {server['version']}; heartbeat {report['heartbeat']}s, "
            f"frame_max {report['frame_max']}, channel_max {report['channel_max']}; "
            f"connect {report['connect_ms']} ms, channel open {report['channel_open_ms']} ms",
            file=out,
        )
    else:
        print(f"FAILED {report['broker']}: {report['error']}", file=out)
    return code


def watch(url: str, out: Optional[TextIO] = None, stop: Optional[threading.Event] = None) -> int:
    """Print each state change with a timestamp until Ctrl-C (or ``stop``)."""
    stream = out or sys.stdout
    try:
        manager = ConnectionManager(url)
    except ConfigurationError as exc:
        print(f"configuration: {exc}", file=stream)
        return EXIT_REFUSED
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            print(f"{time.strftime('%H:%M:%S')} {text}", file=stream, flush=True)

    manager.on("connecting", lambda: say(f"connecting to {manager.status().broker}"))
    manager.on("connected", lambda: say(f"connected to {manager.status().broker} ({_server(manager)})"))
    manager.on("connect_failed", lambda error, delay: say(
        f"connect failed: {type(error).__name__}: {error}"
        + ("; giving up" if delay is None else f"; next attempt in {delay:.2f}s")))
    manager.on("disconnected", lambda error: say(f"disconnected: {type(error).__name__}: {error}"))
    manager.on("blocked", lambda reason: say(f"blocked by the broker: {reason}"))
    manager.on("unblocked", lambda: say("unblocked"))
    manager.on("stopped", lambda: say("stopped"))
    stop = stop or threading.Event()
    manager.start()
    try:
        while not stop.wait(1.0):
            status = manager.status()
            waiting = status.state in (ConnectionState.DISCONNECTED, ConnectionState.FAILED)
            if waiting and status.next_attempt_in is not None and status.next_attempt_in >= 1:
                say(f"  next attempt in {status.next_attempt_in:.0f}s")
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop(timeout=5)
    return EXIT_OK


def _server(manager: ConnectionManager) -> str:
    status = manager.status()
    return f"{status.server_product or '?'} {status.server_version or ''}".strip()


def demo(url: str, threads: int, messages: int, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    try:
        summary = run_demo(url, threads=threads, messages=messages)
    except CarrotKombuError as exc:
        print(f"carrot-kombu demo on {mask_url(url)} failed: {exc}", file=out)
        return EXIT_REFUSED if isinstance(exc, ConfigurationError) else EXIT_UNREACHABLE
    ok = summary["received"] == summary["published"]
    print(
        f"carrot-kombu demo on {summary['broker']}: {summary['published']} messages from "
        f"{summary['threads']} threads through {summary['leases']} leases (pool limit "
        f"{summary['pool_limit']}) in {summary['publish_seconds']}s; received {summary['received']} "
        f"back; total {summary['total_seconds']}s -> {'OK' if ok else 'MISMATCH'}",
        file=out,
    )
    return EXIT_OK if ok else EXIT_UNREACHABLE


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="carrot-kombu", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    url_help = "broker URL (default: $CARROT_KOMBU_URL, then $CELERY_BROKER_URL, then memory://)"
    p_check = sub.add_parser("check", help="connect once and report (exit 0 ok, 1 unreachable, 2 refused)")
    p_check.add_argument("url", nargs="?", help=url_help)
    p_check.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    p_check.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p_watch = sub.add_parser("watch", help="print every state change until Ctrl-C")
    p_watch.add_argument("url", nargs="?", help=url_help)
    p_demo = sub.add_parser("demo", help="publish and consume a batch through pooled leases")
    p_demo.add_argument("url", nargs="?", help=url_help)
    p_demo.add_argument("--threads", type=int, default=4)
    p_demo.add_argument("--messages", type=int, default=250, help="messages per thread")
    args = parser.parse_args(argv)
    url = args.url or default_url()
    if args.command == "check":
        if not args.timeout > 0:
            parser.error("--timeout must be > 0")
        return check(url, args.timeout, args.json)
    if args.command == "watch":
        return watch(url)
    return demo(url, args.threads, args.messages)
