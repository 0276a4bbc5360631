"""The ``carrot-kombu`` command (also ``python -m carrot_kombu``).

Developer notes; users read the plain-text help built by :func:`build_parser`
and the reference page ``docs/cli.rst``.

* ``check [URL] [--timeout S] [--json]``: connect once (each failover URL at
  most once, no retry), open a channel, report.  Exit 0 healthy, 1
  unreachable or timed out, 2 refused (credentials, vhost, certificate), bad
  configuration or no URL at all.  Usable as a container health check.
* ``watch [URL] [--json]``: run a manager and print one line (or one JSON
  object) per event; Ctrl-C or SIGTERM stops the manager, prints a final
  ``stopped`` and exits 0.  Exit 2 for a bad URL or no URL.
* ``demo [URL]``: the main job: publish and consume through pooled leases.
* ``metrics [URL] [--timeout S]``: one scrape of :mod:`carrot_kombu.metrics`
  in the Prometheus text format: of a manager connected to the broker URL,
  or fetched from an application's ``http(s)://`` metrics endpoint.

The URL comes from the argument, then ``$CARROT_KOMBU_URL``, then
``$CELERY_BROKER_URL``.  ``check`` and ``watch`` refuse to run without one
(exit 2): a health probe of the in-process ``memory://`` transport would
always pass.  Only ``demo`` falls back to ``memory://``.

Nothing printed contains a password.  Broker URLs are shown as the manager
masks them (:func:`masked` before a manager exists), and every error text
also goes through :func:`redactor`, built from the passwords written in the
URL itself, so a message the core forgot to scrub is still clean.

Signals: ``watch`` replaces the SIGINT and SIGTERM handlers (main thread
only) with one that just sets a flag; the main loop polls it, so a signal
never runs manager code, takes a lock or interrupts ``start()`` half-way.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any, Callable, Optional, Sequence, TextIO

from .demo import run_demo
from .exceptions import CarrotKombuError, ConfigurationError
from .manager import ConnectionManager
from .retry import Backoff
from .status import ConnectionState, Status
from .urls import Redact, mask_url, passwords_in, split_urls, strip_transport_prefix
from .urls import redactor as redact_secrets

__all__ = ("main",)

EXIT_OK, EXIT_UNREACHABLE, EXIT_REFUSED = 0, 1, 2

#: Where a URL comes from when the command line gives none, in order.
URL_VARIABLES = ("CARROT_KOMBU_URL", "CELERY_BROKER_URL")

NO_URL = (
    "no broker URL given: pass one (amqp://user:password@host:5672/vhost) or set "
    "$CARROT_KOMBU_URL or $CELERY_BROKER_URL; memory:// is only used when given explicitly"
)

#: How often ``watch`` looks at its stop flag (signals only set the flag).
_POLL_SECONDS = 0.1
#: Most seconds ``watch`` waits for the manager to stop after a signal.
_STOP_SECONDS = 5.0


# -- URLs and secrets ----------------------------------------------------------------


def url_from_environment() -> Optional[str]:
    """The first non-empty ``$CARROT_KOMBU_URL``, ``$CELERY_BROKER_URL``; else ``None``."""
    for name in URL_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def _parts(url: str) -> list[str]:
    """The failover URLs in ``url``."""
    return split_urls(url)


#: ``url`` with the ``carrot+`` of each failover URL dropped (Celery's broker URL, as the transport takes it).
without_transport_prefix = strip_transport_prefix


def masked(url: str) -> str:
    """``url`` with the password of each failover URL masked, even without a scheme."""
    return ";".join(mask_url(part) for part in split_urls(url))


def redactor(url: str) -> Redact:
    """A function replacing each password written in ``url`` by ``**`` (longest first, encoded or not)."""
    return redact_secrets(passwords_in(url))


def _error_text(error: BaseException, redact: Redact) -> str:
    text = str(error)
    if type(error) is not CarrotKombuError:
        # The manager's own wrapper already starts with the original type's name.
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return redact(text)


def _seconds(value: float) -> str:
    return f"{round(value, 2):g}"


# -- check ---------------------------------------------------------------------------


def check(url: Optional[str], timeout: float, as_json: bool, out: Optional[TextIO] = None,
          ssl_options: Any = None) -> int:
    """Connect once (no retry), open a channel, print what the broker offered.

    ``timeout`` bounds connecting and opening the channel together; stopping
    the manager afterwards takes at most one more second.
    """
    out = out or sys.stdout
    if not url:
        report: dict[str, Any] = {"broker": None, "healthy": False, "fatal": True, "error": NO_URL}
        return _report(report, as_json, out, EXIT_REFUSED)
    url = without_transport_prefix(url)
    redact = redactor(url)
    report = {"broker": masked(url), "healthy": False, "fatal": False}
    try:
        manager = ConnectionManager(
            url,
            # Each failover URL once, and a fatal refusal must not make the
            # next URL wait Backoff.max seconds.
            backoff=Backoff(min=0.1, max=0.1, jitter=False, max_tries=len(_parts(url)) or 1),
            connection_timeout=timeout,
            pool_limit=1,
            ssl_options=ssl_options,
        )
    except ConfigurationError as exc:
        report.update(fatal=True, error=f"configuration: {redact(str(exc))}")
        return _report(report, as_json, out, EXIT_REFUSED)
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    manager.start()
    try:
        connected = manager.wait_connected(timeout)
        connect_s = time.perf_counter() - started
        status = manager.status()
        report["broker"] = status.broker
        if not connected:
            last = redact(status.last_error) if status.last_error else None
            if status.gave_up and last:
                report["error"] = last
            else:
                report["error"] = f"no connection within {_seconds(timeout)} s" + (f"; last error: {last}" if last else "")
            report["fatal"] = status.fatal
            if status.fatal:
                return _report(report, as_json, out, EXIT_REFUSED, note=" (fatal: retrying will not fix it)")
            return _report(report, as_json, out, EXIT_UNREACHABLE)
        opened = time.perf_counter()
        try:
            with manager.channel(timeout=max(0.1, deadline - time.monotonic())):
                channel_s = time.perf_counter() - opened
        except CarrotKombuError as exc:
            report["error"] = f"channel: {_error_text(exc, redact)}"
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


def _report(report: dict[str, Any], as_json: bool, out: TextIO, code: int, note: str = "") -> int:
    report["exit_code"] = code
    if as_json:
        print(json.dumps(report, sort_keys=True), file=out, flush=True)
        return code
    where = f" {report['broker']}" if report["broker"] else ""
    if report["healthy"]:
        facts = []
        server = " ".join(str(v) for v in report["server"].values() if v)
        if server:
            facts.append(server)
        negotiated = [
            f"{name} {value}{unit}"
            for name, value, unit in (
                ("heartbeat", report["heartbeat"], "s"),
                ("frame_max", report["frame_max"], ""),
                ("channel_max", report["channel_max"], ""),
            )
            if value is not None
        ]
        if negotiated:
            facts.append(", ".join(negotiated))
        facts.append(f"connect {report['connect_ms']} ms, channel open {report['channel_open_ms']} ms")
        print(f"OK{where}: {'; '.join(facts)}", file=out, flush=True)
    else:
        print(f"FAILED{where}: {report['error']}{note}", file=out, flush=True)
    return code


# -- watch ---------------------------------------------------------------------------

#: The state each event announces (see ``ConnectionState``); ``connect_failed``
#: is FAILED when fatal or given up, else DISCONNECTED.
_EVENT_STATES = {
    "connecting": ConnectionState.CONNECTING,
    "connected": ConnectionState.CONNECTED,
    "disconnected": ConnectionState.DISCONNECTED,
    "blocked": ConnectionState.CONNECTED,
    "unblocked": ConnectionState.CONNECTED,
    "stopped": ConnectionState.STOPPED,
}


def _event_record(event: str, **fields: Any) -> dict[str, Any]:
    """One ``watch --json`` object: every key present, in a fixed order."""
    record: dict[str, Any] = {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "event": event, "state": None, "broker": None, "error": None, "fatal": False,
        "gave_up": False, "next_delay": None, "reason": None, "server": None,
    }
    record.update(fields)
    return record


class EventPrinter:
    """Writes one line (or one JSON object) per manager event to one stream.

    Events arrive on the manager's dispatcher thread; :meth:`finish` comes
    from the thread running ``watch``.  The final ``stopped`` is written
    exactly once, whichever comes first, and nothing is written after it.

    Args:
        status: Returns the manager's current status (broker, fatal, server).
        out: Where to write; flushed after each event.
        as_json: JSON objects instead of text lines.
        redact: Applied to every error text and blocked reason.
    """

    def __init__(self, status: Callable[[], Status], out: TextIO, as_json: bool, redact: Redact) -> None:
        self._status = status
        self._out = out
        self._as_json = as_json
        self._redact = redact
        self._lock = threading.Lock()
        self._finished = False
        self.broken = False  # the stream failed (closed pipe): watch should end

    def subscribe(self, manager: ConnectionManager) -> None:
        manager.on("connecting", lambda: self.emit("connecting"))
        manager.on("connected", lambda: self.emit("connected"))
        manager.on("connect_failed", self.connect_failed)
        manager.on("disconnected", lambda error: self.emit("disconnected", error=error))
        manager.on("blocked", lambda reason: self.emit("blocked", reason=str(reason)))
        manager.on("unblocked", lambda: self.emit("unblocked"))
        manager.on("stopped", self.finish)

    def connect_failed(self, error: BaseException, delay: Optional[float]) -> None:
        self.emit("connect_failed", error=error, delay=delay, gave_up=delay is None)

    def finish(self) -> None:
        """Write the final ``stopped`` (once)."""
        self.emit("stopped")

    def emit(
        self,
        event: str,
        *,
        error: Optional[BaseException] = None,
        delay: Optional[float] = None,
        gave_up: bool = False,
        reason: Optional[str] = None,
    ) -> None:
        record = self.record(event, error=error, delay=delay, gave_up=gave_up, reason=reason)
        with self._lock:
            if self._finished:
                return
            self._finished = event == "stopped"
            text = json.dumps(record) if self._as_json else f"{time.strftime('%H:%M:%S')} {self.line(record)}"
            try:
                print(text, file=self._out, flush=True)
            except (OSError, ValueError):  # a closed pipe or stream
                self.broken = True

    def record(
        self,
        event: str,
        *,
        error: Optional[BaseException] = None,
        delay: Optional[float] = None,
        gave_up: bool = False,
        reason: Optional[str] = None,
    ) -> dict[str, Any]:
        """The JSON object for one event (every key always present)."""
        status = self._status()
        fatal = event == "connect_failed" and status.fatal
        if event == "connect_failed":
            state = ConnectionState.FAILED if fatal or gave_up else ConnectionState.DISCONNECTED
        else:
            state = _EVENT_STATES[event]
        if event == "disconnected":
            delay = status.next_attempt_in
        server = None
        if event == "connected":
            server = " ".join(v for v in (status.server_product, status.server_version) if v) or None
        return _event_record(
            event,
            state=state.value,
            broker=status.broker,
            error=None if error is None else _error_text(error, self._redact),
            fatal=fatal,
            gave_up=gave_up,
            next_delay=None if delay is None else round(delay, 3),
            reason=None if reason is None else self._redact(reason),
            server=server,
        )

    @staticmethod
    def line(record: dict[str, Any]) -> str:
        """The text line for a :meth:`record` (without the time)."""
        event, broker, delay = record["event"], record["broker"], record["next_delay"]
        if event == "connecting":
            return f"connecting to {broker}"
        if event == "connected":
            return f"connected to {broker}" + (f" ({record['server']})" if record["server"] else "")
        if event == "connect_failed":
            if record["gave_up"]:
                then = "fatal, gave up" if record["fatal"] else "gave up"
            elif record["fatal"]:
                then = f"fatal: retrying every {_seconds(delay)} s"
            else:
                then = f"next attempt in {_seconds(delay)} s"
            return f"connect failed: {record['error']} -> {then}"
        if event == "disconnected":
            then = "" if delay is None else f" -> next attempt in {_seconds(delay)} s"
            return f"disconnected from {broker}: {record['error']}{then}"
        if event == "blocked":
            return f"blocked by the broker: {record['reason']}"
        return str(event)  # unblocked, stopped


def watch(
    url: Optional[str],
    *,
    as_json: bool = False,
    out: Optional[TextIO] = None,
    stop: Optional[threading.Event] = None,
    backoff: Optional[Backoff] = None,
) -> int:
    """Print each event until Ctrl-C, SIGTERM (main thread only) or ``stop`` is set.

    Always ends with one ``stopped`` line (or object) and returns 0, unless
    the URL is missing or invalid (2, nothing started).
    """
    stream = out or sys.stdout
    if not url:
        return _watch_error(stream, as_json, None, NO_URL)
    url = without_transport_prefix(url)
    redact = redactor(url)
    try:
        manager = ConnectionManager(url, backoff=backoff)
    except ConfigurationError as exc:
        return _watch_error(stream, as_json, masked(url), f"configuration: {redact(str(exc))}")
    printer = EventPrinter(manager.status, stream, as_json, redact)
    printer.subscribe(manager)
    stop = stop or threading.Event()
    signalled: list[int] = []
    restore = _catch_stop_signals(signalled.append)
    try:
        manager.start()
        while not stop.wait(_POLL_SECONDS):
            if signalled or printer.broken:
                break
    finally:
        try:
            manager.stop(timeout=_STOP_SECONDS)
        finally:
            printer.finish()
            restore()
    return EXIT_OK


def _watch_error(stream: TextIO, as_json: bool, broker: Optional[str], error: str) -> int:
    if as_json:
        # No manager could be made: FAILED, as a fatal connect_failed says (never null).
        print(json.dumps(_event_record("error", state=ConnectionState.FAILED.value, broker=broker, error=error,
                                       fatal=True)), file=stream, flush=True)
    else:
        where = f" {broker}" if broker else ""
        print(f"FAILED{where}: {error}", file=stream, flush=True)
    return EXIT_REFUSED


def _catch_stop_signals(callback: Callable[[int], Any]) -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``callback``; returns a function restoring the old handlers.

    Only the main thread may set handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda received, _frame: callback(received))

    def restore() -> None:
        for signum, handler in previous.items():
            if handler is not None:  # None: not set from Python; leave ours
                signal.signal(signum, handler)

    return restore


# -- metrics -------------------------------------------------------------------------

#: The connection name of the ``metrics`` command's manager (its ``manager`` label).
METRICS_CONNECTION_NAME = "carrot-kombu metrics"


def metrics(url: Optional[str], timeout: float, out: Optional[TextIO] = None) -> int:
    """Print one scrape of carrot_kombu metrics in the Prometheus text format.

    An ``http(s)://`` URL is an application's metrics endpoint: fetched
    once, its ``carrot_kombu_*`` series printed.  A broker URL: a manager
    connects (within ``timeout``), takes and gives back one channel, and its
    own metrics are printed, also when it could not connect.
    """
    from . import metrics as exported

    out = out or sys.stdout
    if not url:
        print(f"FAILED: {NO_URL}", file=out, flush=True)
        return EXIT_REFUSED
    if url.split("://", 1)[0].lower() in ("http", "https"):
        return _scrape(url, timeout, out)
    url = without_transport_prefix(url)
    redact = redactor(url)
    try:
        manager = ConnectionManager(
            url, backoff=Backoff(min=0.1, max=0.1, jitter=False, max_tries=len(_parts(url)) or 1),
            connection_timeout=timeout, pool_limit=1, client_properties={"connection_name": METRICS_CONNECTION_NAME},
        )
    except ConfigurationError as exc:
        print(f"FAILED {masked(url)}: configuration: {redact(str(exc))}", file=out, flush=True)
        return EXIT_REFUSED
    code = EXIT_OK
    manager.start()
    try:
        if manager.wait_connected(timeout):
            try:
                with manager.channel(timeout=timeout):
                    pass
            except CarrotKombuError:
                code = EXIT_UNREACHABLE
        else:
            code = EXIT_REFUSED if manager.status().fatal else EXIT_UNREACHABLE
        ours = [
            replace(family, samples=[s for s in family.samples if s[0]["manager"] == METRICS_CONNECTION_NAME])
            for family in exported.collect()
        ]
        print(exported.text(ours), end="", file=out, flush=True)
    finally:
        manager.stop(timeout=1.0)
    return code


def _scrape(url: str, timeout: float, out: TextIO) -> int:
    """Fetch a metrics endpoint once; print its carrot_kombu families (exit 1 if it has none or fails).

    ``timeout`` bounds the whole fetch (connect, headers, every read): an
    endpoint that trickles its answer is cut off, not waited for.  A
    ``user:password@`` in the URL is sent as HTTP Basic authentication and
    is never printed.
    """
    redact = redactor(url)
    result: list[str] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            result.append(_fetch(url, time.monotonic() + timeout))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    # On a daemon thread: a read blocked inside the socket cannot outlast the
    # deadline (the process exits after printing).
    worker = threading.Thread(target=fetch, name="carrot-kombu-metrics-fetch", daemon=True)
    worker.start()
    worker.join(timeout)
    try:
        if errors:
            raise errors[0]
        if not result:
            raise TimeoutError(f"no complete answer within {_seconds(timeout)} s")
        body = result[0]
    except Exception as exc:  # noqa: BLE001 - whatever failed, one line without the password
        print(f"FAILED {masked(url)}: {_error_text(exc, redact)}", file=out, flush=True)
        return EXIT_UNREACHABLE
    lines = [line for line in body.splitlines()
             if line.startswith(("carrot_kombu_", "# HELP carrot_kombu_", "# TYPE carrot_kombu_"))]
    if not lines:
        print(f"FAILED {masked(url)}: no carrot_kombu metrics there "
              "(call carrot_kombu.metrics.register() in the application)", file=out, flush=True)
        return EXIT_UNREACHABLE
    print("\n".join(lines), file=out, flush=True)
    return EXIT_OK


def _fetch(url: str, deadline: float) -> str:
    """GET ``url`` within ``deadline`` (monotonic); the body as text.

    Raises:
        TimeoutError: The answer was not complete by the deadline.
        OSError, ValueError: The request failed (no such host, refused, a bad URL, HTTP error).
    """
    import base64
    from urllib.parse import unquote, urlsplit, urlunsplit
    from urllib.request import Request, urlopen

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    request = Request(urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")))
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no complete answer within the timeout")
        return remaining

    chunks: list[bytes] = []
    with urlopen(request, timeout=left()) as response:  # noqa: S310 - an http(s) URL the user gave
        while True:
            # Each read is bounded by the socket timeout set at connect; the
            # deadline is checked between reads (an answer sent one line at a time).
            left()
            chunk = response.read1(65536) if hasattr(response, "read1") else response.read(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


# -- demo ----------------------------------------------------------------------------


def demo(url: str, threads: int, messages: int, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    redact = redactor(url)
    try:
        summary = run_demo(url, threads=threads, messages=messages)
    except KeyboardInterrupt:  # run_demo removed its queue on the way out
        print(f"carrot-kombu demo on {masked(url)} interrupted; its queue was removed", file=out, flush=True)
        return 130  # the shell's code for a run ended by SIGINT
    except CarrotKombuError as exc:
        print(f"carrot-kombu demo on {masked(url)} failed: {redact(str(exc))}", file=out, flush=True)
        return EXIT_REFUSED if isinstance(exc, ConfigurationError) else EXIT_UNREACHABLE
    ok = summary["received"] == summary["published"]
    print(
        f"carrot-kombu demo on {summary['broker']}: {summary['published']} messages from "
        f"{summary['threads']} threads through {summary['leases']} leases (pool limit "
        f"{summary['pool_limit']}) in {summary['publish_seconds']}s; received {summary['received']} "
        f"back; total {summary['total_seconds']}s -> {'OK' if ok else 'MISMATCH'}",
        file=out,
        flush=True,
    )
    return EXIT_OK if ok else EXIT_UNREACHABLE


# -- the command line ----------------------------------------------------------------

_URL_HELP = "broker URL (default: $CARROT_KOMBU_URL, then $CELERY_BROKER_URL{})"

_MAIN_DESCRIPTION = """\
Check, follow or exercise a connection to an AMQP broker (RabbitMQ) through
carrot_kombu's supervised connection manager. Also runs as
"python -m carrot_kombu"."""

_MAIN_EPILOG = """\
broker URL:
  amqp://user:password@host:5672/vhost (amqps:// for TLS; several URLs
  separated by ';' for failover). Without a URL argument the URL comes from
  $CARROT_KOMBU_URL, then $CELERY_BROKER_URL. With neither, check and watch
  fail with exit code 2; only demo falls back to memory:// (an in-process
  broker). Passwords are masked in all output.

exit codes:
  0  healthy (check), stopped by Ctrl-C or SIGTERM (watch), all messages
     back (demo)
  1  broker unreachable or timed out (demo: messages missing)
  2  refused by the broker (credentials, vhost, certificate), invalid URL or
     option, or no URL given
  130  demo interrupted by Ctrl-C (its queue removed)

Run "carrot-kombu COMMAND --help" for each command's details."""

_CHECK_DESCRIPTION = """\
Connect to the broker once, open a channel and report: server product and
version, negotiated heartbeat, frame_max and channel_max, connect and
channel-open times. Nothing is retried (each failover URL is tried once).
Meant as a container health check or readiness probe."""

_CHECK_EPILOG = """\
exit codes:
  0  healthy
  1  unreachable or timed out: the broker may come back
  2  refused by the broker (wrong credentials, unknown vhost, bad
     certificate: "fatal", retrying will not fix it), invalid URL or option,
     or no URL given

With no URL argument and neither $CARROT_KOMBU_URL nor $CELERY_BROKER_URL
set, check fails with exit code 2: it never probes memory:// unless you pass
memory:// yourself.

examples:
  carrot-kombu check amqp://guest:guest@localhost:5672//
  CARROT_KOMBU_URL=amqps://app:secret@rabbit/prod carrot-kombu check --json"""

_WATCH_DESCRIPTION = """\
Run a connection manager (reconnecting with backoff, as an application does)
and print one line per state change: connecting, connected, connect failed
(with the delay before the next attempt), disconnected, blocked, unblocked,
stopped. A refusal that retrying alone will not fix (wrong credentials,
unknown vhost, bad certificate) is reported as "fatal"; the manager then
retries only every 30 s, and says "gave up" if its policy gives up.

Ctrl-C or SIGTERM (docker stop, Kubernetes) stops the manager, prints a
final "stopped" and exits 0."""

_WATCH_EPILOG = """\
--json prints one JSON object per line and event, with the keys:
  time        ISO 8601, UTC
  event       connecting, connected, connect_failed, disconnected, blocked,
              unblocked, stopped ("error" for a bad or missing URL)
  state       CONNECTING, CONNECTED, DISCONNECTED, FAILED or STOPPED
  broker      the broker URL, password masked
  error       the error text, or null
  fatal       true when retrying alone will not fix the error
  gave_up     true when the retry policy gave up
  next_delay  seconds until the next attempt, or null
  reason      why the broker blocked the connection (blocked), or null
  server      server product and version (connected), or null

exit codes:
  0  stopped by Ctrl-C or SIGTERM
  2  invalid URL or no URL given ($CARROT_KOMBU_URL, $CELERY_BROKER_URL)"""

_METRICS_DESCRIPTION = """\
Print one scrape of carrot_kombu's metrics in the Prometheus text format,
for when no Prometheus server is at hand.

With a broker URL: connect a manager (no retry beyond one attempt per
failover URL), take and give back one channel, and print its metrics (also
when it could not connect: carrot_kombu_connected 0 then).

With an http:// or https:// URL: fetch that metrics endpoint of a running
application (one that called carrot_kombu.metrics.register() and serves
prometheus_client's registry) once and print its carrot_kombu_* series."""

_METRICS_EPILOG = """\
exit codes:
  0  connected (or the endpoint served carrot_kombu metrics)
  1  unreachable or timed out, or no carrot_kombu metrics at the endpoint
  2  refused by the broker, invalid URL or option, or no URL given

examples:
  carrot-kombu metrics amqp://guest:guest@localhost:5672//
  carrot-kombu metrics http://localhost:9100/metrics"""

_DEMO_DESCRIPTION = """\
Start a manager, publish a batch of messages from several threads through
pooled channel leases, consume them back and print a summary. Without a URL
argument or variable, runs on memory:// (an in-process broker)."""

_DEMO_EPILOG = """\
exit codes:
  0  every message came back
  1  broker unreachable, or messages missing
  2  invalid URL or option"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with plain-text help (no reStructuredText)."""
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="carrot-kombu", description=_MAIN_DESCRIPTION, epilog=_MAIN_EPILOG, formatter_class=raw
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p_check = sub.add_parser(
        "check", help="connect once and report; a container health check",
        description=_CHECK_DESCRIPTION, epilog=_CHECK_EPILOG, formatter_class=raw,
    )
    p_check.add_argument("url", nargs="?", metavar="URL", help=_URL_HELP.format(""))
    p_check.add_argument(
        "--timeout", type=float, default=10.0, metavar="S",
        help="seconds allowed to connect and open a channel (default 10); closing takes at most 1 s more",
    )
    p_check.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    p_watch = sub.add_parser(
        "watch", help="print one line per state change until Ctrl-C or SIGTERM",
        description=_WATCH_DESCRIPTION, epilog=_WATCH_EPILOG, formatter_class=raw,
    )
    p_watch.add_argument("url", nargs="?", metavar="URL", help=_URL_HELP.format(""))
    p_watch.add_argument("--json", action="store_true", help="one JSON object per line and event")
    p_metrics = sub.add_parser(
        "metrics", help="print one scrape of the metrics in the Prometheus text format",
        description=_METRICS_DESCRIPTION, epilog=_METRICS_EPILOG, formatter_class=raw,
    )
    p_metrics.add_argument("url", nargs="?", metavar="URL",
                           help=_URL_HELP.format("") + "; or an application's http(s):// metrics endpoint")
    p_metrics.add_argument("--timeout", type=float, default=10.0, metavar="S",
                           help="seconds allowed to connect (or to fetch the endpoint); default 10")
    p_demo = sub.add_parser(
        "demo", help="publish and consume a batch through pooled leases",
        description=_DEMO_DESCRIPTION, epilog=_DEMO_EPILOG, formatter_class=raw,
    )
    p_demo.add_argument("url", nargs="?", metavar="URL", help=_URL_HELP.format(", then memory://"))
    p_demo.add_argument("--threads", type=int, default=4, metavar="N", help="publishing threads (default 4)")
    p_demo.add_argument("--messages", type=int, default=250, metavar="M", help="messages per thread (default 250)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # An empty argument (``check "$UNSET"``) counts as none.
    url = (args.url or "").strip() or url_from_environment()
    if args.command == "check":
        if not args.timeout > 0:
            parser.error("--timeout must be > 0")
        return check(url, args.timeout, args.json)
    if args.command == "watch":
        return watch(url, as_json=args.json)
    if args.command == "metrics":
        if not args.timeout > 0:
            parser.error("--timeout must be > 0")
        return metrics(url, args.timeout)
    if args.threads < 1 or args.messages < 1:
        parser.error("--threads and --messages must be >= 1")
    return demo(url or "memory://", args.threads, args.messages)
