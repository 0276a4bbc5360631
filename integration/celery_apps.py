"""Real Celery processes for the transport tests: app modules, workers, a producer process.

* :func:`write_app` writes a Celery app module (one ``echo`` task) to a temp dir.
  It does not import carrot_kombu: the ``celery`` command does that through its
  ``celery.commands`` entry point, which is how ``carrot+amqp://`` reaches a worker.
* :func:`celery_worker` runs ``python -m celery -A <app> worker`` in its own session
  and always ends it (its whole process group), also when the test fails.
* :class:`Producer` is another process that imports carrot_kombu and the app and
  runs commands sent as JSON lines (``python -m integration.celery_apps <app>``):
  bursts of ``.delay()`` from many threads, timed single calls, outage probes.
  Timestamps are ``time.monotonic()``, comparable across processes on Linux.
* :func:`broker_sockets` / :func:`process_tree` look at processes from the outside.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
#: Threads of a producer process (its ``burst`` and ``storm`` use up to this many).
THREADS = 8

APP_TEMPLATE = """\
from celery import Celery

app = Celery({name!r})
app.conf.update({config!r})


@app.task(name="echo")
def echo(x):
    return x
"""


@dataclass(frozen=True)
class AppModule:
    """An app module on disk: ``import <name>`` with ``dir`` on ``PYTHONPATH``."""

    dir: Path
    name: str
    queue: str

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(self.dir), str(ROOT)])
        env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
        env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1")
        return env


def write_app(where: Path, name: str, broker_url: str, queue: str, *, backend: Optional[str] = "rpc://",
              **config: Any) -> AppModule:
    """Write app module ``name`` whose tasks go to ``queue``; ``config`` adds Celery settings."""
    settings = dict(
        broker_url=broker_url,
        result_backend=backend,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    settings.update(config)
    where.mkdir(parents=True, exist_ok=True)
    (where / f"{name}.py").write_text(APP_TEMPLATE.format(name=name, config=settings))
    return AppModule(where, name, queue)


# -- the worker ---------------------------------------------------------------------------------


@dataclass
class Worker:
    proc: "subprocess.Popen[bytes]"
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        """The worker's main process and its children (prefork pool processes)."""
        return [self.proc.pid, *process_tree(self.proc.pid)]

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""


@contextmanager
def celery_worker(app: AppModule, pool: str, concurrency: int, *extra: str) -> Iterator[Worker]:
    """A real ``celery worker`` consuming ``app.queue``; always terminated (whole process group)."""
    log = app.dir / f"worker-{pool}-{os.getpid()}-{time.monotonic_ns()}.log"
    # A unique node name: two workers named alike on one broker fight over
    # their exclusive pidbox queue (RESOURCE_LOCKED) and one of them dies.
    command = [sys.executable, "-m", "celery", "-A", app.name, "worker", f"--pool={pool}", "-c", str(concurrency),
               "-n", f"{app.queue}@%h",
               "-Q", app.queue, "--without-mingle", "--without-gossip", "-l", "warning", *extra]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=app.dir, env=app.env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = Worker(proc, log)
    try:
        yield worker
    finally:
        stop_process_group(proc, grace=20.0)


def stop_process_group(proc: "subprocess.Popen[Any]", grace: float) -> None:
    """SIGTERM (Celery's warm shutdown), then SIGKILL whatever of its session is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pool children that outlived their parent, too
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass


# -- looking at processes from outside -------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """Descendants of ``pid`` (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return sorted(found)


def broker_sockets(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to ``127.0.0.1:port`` (its AMQP connections)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return 0
    wanted = f"0100007F:{port:04X}"
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local, remote, state (01: ESTABLISHED), ..., inode
            if fields[2] == wanted and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` (returns it falsy)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# -- the producer process: test side -------------------------------------------------------------------


class ProducerError(AssertionError):
    pass


class Producer:
    """Drive a producer process over JSON lines; always ended by :meth:`close`."""

    def __init__(self, app: AppModule) -> None:
        self.app = app
        self.log = app.dir / f"producer-{time.monotonic_ns()}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "integration.celery_apps", app.name], cwd=ROOT, env=app.env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
            )
        self._lock = threading.Lock()
        self._lines: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._pump, args=(self.proc.stdout,), name="producer-stdout", daemon=True)
        self._reader.start()
        hello = self._read(60)
        self.pid: int = hello["pid"]

    def call(self, command: str, *, wait: float = 90, **args: Any) -> dict[str, Any]:
        """Run ``command`` in the producer; its answer (a dict) within ``wait`` s, or :class:`ProducerError`."""
        with self._lock:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"cmd": command, **args}) + "\n")
            self.proc.stdin.flush()
            answer = self._read(wait)
        if "crash" in answer:
            raise ProducerError(f"{command} crashed in the producer:\n{answer['crash']}")
        return answer

    def _pump(self, stdout: Any) -> None:
        for line in stdout:
            self._lines.put(line)
        self._lines.put("")  # the producer is gone

    def _read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line:
            raise ProducerError(f"no answer from the producer within {timeout}s; stderr:\n{self.output()}")
        return dict(json.loads(line))

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # the producer's loop ends
        except OSError:
            pass
        stop_process_group(self.proc, grace=5.0)
        self._reader.join(5)  # it reads to the end of the dead producer's output
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the producer process: its side ---------------------------------------------------------------------


def _error(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"


class _Commands:
    """What a producer process can be asked to do (``python -m integration.celery_apps <app>``).

    Work runs on long-lived threads: Celery's rpc:// backend names each thread's
    reply queue after ``threading.get_ident()``, which a new thread may reuse
    while the dead thread's result consumer still takes half of that queue's
    replies (true of plain ``amqp://`` too).
    """

    def __init__(self, module: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.app = module.app
        self.echo = module.echo
        self.lanes = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="producer")
        self.watched: list[float] = []

    def _on_threads(self, threads: int, work: Callable[[int], Any]) -> list[Any]:
        """Run ``work(0..threads-1)`` at once, each on its own lane thread; their returns."""
        barrier = threading.Barrier(threads, timeout=30)

        def run(t: int) -> Any:
            barrier.wait()  # all started: ``threads`` distinct threads
            return work(t)

        return [f.result() for f in [self.lanes.submit(run, t) for t in range(threads)]]

    def burst(self, threads: int, per_thread: int, timeout: float) -> dict[str, Any]:
        """``threads`` threads each send ``per_thread`` tasks, then collect every result."""
        started = time.monotonic()
        deadline = started + timeout

        def run(t: int) -> tuple[list[int], list[str]]:
            got: list[int] = []
            try:
                sent = [(x, self.echo.delay(x)) for x in range(t * per_thread, (t + 1) * per_thread)]
                for x, result in sent:
                    value = result.get(timeout=max(0.1, deadline - time.monotonic()))
                    got.append(value if value == x else -1)
            except Exception as exc:
                return got, [_error(exc)]
            return got, []

        outcomes = self._on_threads(threads, run)
        return {"results": sorted(x for got, _ in outcomes for x in got),
                "errors": [e for _, errors in outcomes for e in errors][:5],
                "elapsed": time.monotonic() - started}

    def delay(self, result_timeout: Optional[float] = None) -> dict[str, Any]:
        """One timed ``.delay()`` (and its result, within ``result_timeout``)."""
        answer: dict[str, Any] = {"started": time.monotonic()}
        try:
            result = self.echo.delay(7)
            answer["sent"] = time.monotonic()
            if result_timeout is not None:
                answer["value"] = result.get(timeout=result_timeout)
                answer["got"] = time.monotonic()
        except Exception as exc:
            answer["error"] = _error(exc)
            answer["failed"] = time.monotonic()
        return answer

    def delay_until_ok(self, timeout: float, result_timeout: float) -> dict[str, Any]:
        """Call ``.delay()`` until one succeeds; then time a new task's round trip, twice.

        ``fresh``: from a new thread (a new rpc:// result consumer), so it
        times the worker alone; ``same_thread``: from this thread, whose result
        consumer was subscribed before the outage, as an application's is.
        """
        deadline = time.monotonic() + timeout
        failures = 0
        last = ""
        while time.monotonic() < deadline:
            try:
                self.echo.delay(0)
            except Exception as exc:
                failures += 1
                last = _error(exc)
                continue
            sent = time.monotonic()
            fresh: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: fresh.update(self.delay(result_timeout)))
            thread.start()
            thread.join()
            same_thread = self.delay(result_timeout)
            return {"sent": sent, "failures": failures, "last_error": last, "fresh": fresh, "same_thread": same_thread}
        return {"failures": failures, "last_error": last}

    def watch_disconnect(self) -> dict[str, Any]:
        """Record when the manager carrying Celery's connections reports ``disconnected``."""
        from carrot_kombu.transport import manager_for_connection

        manager = manager_for_connection(self.app.connection_for_write())
        manager.on("disconnected", lambda *_: self.watched.append(time.monotonic()))
        return {"manager": repr(manager), "heartbeat": manager.settings.endpoints[0].heartbeat}

    def disconnects(self) -> dict[str, Any]:
        return {"at": list(self.watched)}

    def storm(self, threads: int, seconds: float) -> dict[str, Any]:
        """``threads`` threads call ``.delay()`` for ``seconds``; counts calls and errors."""
        stop_at = time.monotonic() + seconds

        def run(t: int) -> tuple[int, dict[str, int]]:
            calls = 0
            errors: dict[str, int] = {}
            while time.monotonic() < stop_at:
                calls += 1
                try:
                    self.echo.delay(t)
                except Exception as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
            return calls, errors

        outcomes = self._on_threads(threads, run)
        errors: dict[str, int] = {}
        for _, counted in outcomes:
            for name, n in counted.items():
                errors[name] = errors.get(name, 0) + n
        return {"calls": sum(calls for calls, _ in outcomes), "errors": errors}

    def fire(self, count: int, start: int, pause: float) -> dict[str, Any]:
        """``count`` fire-and-forget ``.delay()`` calls (args ``start...``), ``pause`` s apart."""
        ok: list[int] = []
        errors: list[str] = []
        for x in range(start, start + count):
            try:
                self.echo.delay(x)
                ok.append(x)
            except Exception as exc:
                errors.append(_error(exc))
            time.sleep(pause)
        return {"ok": ok, "errors": errors}

    def publish_missing_exchange(self, exchange: str) -> dict[str, Any]:
        """kombu ``Producer.publish(retry=False)`` to an exchange that does not exist, timed."""
        from kombu import Producer

        started = time.monotonic()
        try:
            with self.app.connection_for_write() as conn:
                Producer(conn).publish({"x": 1}, exchange=exchange, routing_key="nowhere", retry=False)
            error = ""
        except Exception as exc:
            error = _error(exc)
        return {"error": error, "elapsed": time.monotonic() - started}


def main(argv: list[str]) -> int:
    import importlib

    import carrot_kombu  # noqa: F401  (registers carrot+amqp://, as a user's producer does)

    module = importlib.import_module(argv[1])
    commands = _Commands(module)
    out = sys.stdout
    out.write(json.dumps({"pid": os.getpid()}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        name = request.pop("cmd")
        try:
            answer = getattr(commands, name)(**request)
        except BaseException:
            answer = {"crash": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))


# -- an app whose task leaves a mark on disk (for outages: no result backend involved) --------------

MARK_APP_TEMPLATE = """\
import os
import time

from celery import Celery

MARKS = {marks!r}

app = Celery({name!r})
app.conf.update({config!r})


@app.task(name="echo")
def echo(x):
    # One file per task, named by its argument, one line per run saying when
    # (time.monotonic(): comparable with the test process's clock on Linux).
    with open(os.path.join(MARKS, str(x)), "a") as out:
        out.write(repr(time.monotonic()) + "\\n")
    return x
"""


def write_mark_app(where: Path, name: str, broker_url: str, queue: str, **config: Any) -> AppModule:
    """Write app module ``name`` whose ``echo(x)`` task appends to ``<where>/marks/<x>`` (see :func:`marks`).

    No result backend: whether a task ran is read from disk, so a result
    consumer that did not survive an outage cannot hide a task that did.
    """
    settings = dict(
        broker_url=broker_url,
        result_backend=None,
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    settings.update(config)
    (where / "marks").mkdir(parents=True, exist_ok=True)
    (where / f"{name}.py").write_text(
        MARK_APP_TEMPLATE.format(name=name, config=settings, marks=str(where / "marks")))
    return AppModule(where, name, queue)


def marks(app: AppModule) -> dict[int, list[float]]:
    """The tasks of a :func:`write_mark_app` app that ran: argument -> ``time.monotonic()`` of each run."""
    found: dict[int, list[float]] = {}
    for path in (app.dir / "marks").iterdir():
        if path.name.isdigit():
            lines = path.read_text().split("\n")[:-1]  # a line still being written has no newline yet
            if lines:
                found[int(path.name)] = [float(line) for line in lines]
    return found
