"""Row 5: Celery ``.delay()`` through carrot_kombu's kombu transport vs plain ``amqp://``.

Two Celery apps live in this process, each with its own producer pool
(``set_as_current=False``): one on ``carrot+amqp://`` (``import
carrot_kombu`` registers the transport), one on plain ``amqp://`` (kombu's
py-amqp transport).  No worker runs: each app sends its tasks to its own
uniquely named scratch queue (declared by the benchmark, expiring, purged
between rounds, deleted after), results are ignored.  The clock runs from the first ``.delay()`` to
the return of the last; then the queue is waited for until it holds every
message (so no round leaks into the next) and purged.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from time import process_time
from typing import Any, Iterator

import amqp
from kombu import Exchange, Queue

import carrot_kombu  # noqa: F401  (registers carrot+amqp://, as a user's app does)
from carrot_kombu import ConnectionManager
from carrot_kombu.transport import manager_for_connection
from integration.broker import unique

from .clients import QUEUE_EXPIRES_MS, raw
from .model import Context, Row
from .speed import run_on_threads
from .stats import Throughput, duration, ratio
from .timing import alternate

#: Thread counts calling ``.delay()`` at once.
THREADS = (1, 8)
#: ``.delay()`` calls per thread before the measured rounds (the first one connects).
WARMUP_PER_THREAD = 10
#: Goal: carrot_kombu's throughput against plain ``amqp://``.
GOAL = 1.0
#: Task name of the benchmark task (never executed: no worker runs).
TASK = "carrot_kombu_bench.noop"


@dataclass(frozen=True)
class DelayRun:
    """One round of ``.delay()`` calls.

    Attributes:
        rate: Calls per second, in aggregate over all threads.
        cpu: Seconds of this process's CPU (all threads) per call.
    """

    rate: float
    cpu: float


class App:
    """A Celery app sending ``TASK`` to its own scratch queue; see :func:`celery_app`."""

    def __init__(self, celery: Any, queue: str) -> None:
        self.celery = celery
        self.queue = queue
        self.task = celery.tasks[TASK]

    @property
    def driver(self) -> str:
        """The kombu transport the app's producer connections use (``carrot_kombu``, ``py-amqp``)."""
        conn = self.celery.connection_for_write()
        try:
            return str(conn.transport.driver_name)
        finally:
            conn.release()

    def manager(self) -> ConnectionManager:
        """The carrot_kombu manager behind the app's connections (only for ``carrot+amqp://``)."""
        conn = self.celery.connection_for_write()
        try:
            return manager_for_connection(conn)
        finally:
            conn.release()

    def delay(self, threads: int, per_thread: int) -> DelayRun:
        """``per_thread`` ``.delay()`` calls from each of ``threads`` threads started together."""
        task = self.task

        def work(index: int) -> None:
            for x in range(per_thread):
                task.delay(x)

        cpu = process_time()
        elapsed = run_on_threads(threads, work)
        cpu = process_time() - cpu
        calls = threads * per_thread
        return DelayRun(calls / elapsed, cpu / calls)


@contextmanager
def celery_app(broker_url: str, confirm: bool, admin: amqp.Channel) -> Iterator[App]:
    """A Celery app on ``broker_url``, not the current app, sending to its own scratch queue.

    The queue is declared here through ``admin`` (expiring, deleted on exit)
    and marked ``no_declare`` for Celery, which publishes to it through the
    default exchange.  (kombu never caches the declaration of an expiring
    queue: Celery would declare it again before every message, three round
    trips that would swamp what is measured.)  The app is closed on exit.
    """
    from celery import Celery

    queue = unique("ck-bench-celery")
    admin.queue_declare(queue, arguments={"x-expires": QUEUE_EXPIRES_MS})
    app = Celery(queue, set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"confirm_publish": True} if confirm else {},
        task_ignore_result=True,
        task_default_queue=queue,
        task_queues=[Queue(queue, Exchange(""), routing_key=queue, no_declare=True)],
    )

    @app.task(name=TASK, shared=False)  # type: ignore[untyped-decorator]
    def noop(x: int) -> int:
        return x

    try:
        yield App(app, queue)
    finally:
        app.close()
        try:
            admin.queue_delete(queue)
        except Exception:
            pass  # x-expires removes it later


def settle(admin: amqp.Channel, queue: str, expected: int, timeout: float = 30.0) -> None:
    """Wait until ``queue`` holds ``expected`` messages (all sent ones arrived), then purge it.

    Raises:
        RuntimeError: Some never arrived within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        held = admin.queue_declare(queue, passive=True).message_count
        if held >= expected:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"queue {queue} holds {held} of {expected} tasks sent")
        time.sleep(0.005)
    admin.queue_purge(queue)


def celery_row(ctx: Context) -> list[Row]:
    """Row 5: ``.delay()`` throughput, carrot+amqp:// vs amqp://, 1 and 8 threads, with and without confirms."""
    sizes = ctx.sizes
    rows = []
    carrot_url = f"carrot+{ctx.url}"
    for confirm in (False, True):
        with ExitStack() as stack:
            conn = stack.enter_context(raw(ctx.url))
            admin = conn.channel()
            managers: list[ConnectionManager] = []
            stack.callback(stop_all, managers)  # after the apps closed
            apps = {
                "carrot": stack.enter_context(celery_app(carrot_url, confirm, admin)),
                "plain": stack.enter_context(celery_app(ctx.url, confirm, admin)),
            }
            drivers = {name: app.driver for name, app in apps.items()}
            if drivers != {"carrot": "carrot_kombu", "plain": "py-amqp"}:
                raise RuntimeError(f"the apps do not use the transports they should: {drivers}")
            # The transport's process-wide manager, which carries every carrot+amqp:// connection.
            manager = apps["carrot"].manager()
            managers.append(manager)

            def run(app: App, threads: int, per_thread: int) -> DelayRun:
                result = app.delay(threads, per_thread)
                settle(admin, app.queue, threads * per_thread)
                return result

            for app in apps.values():  # the first .delay() connects; 8 threads fill the producer pool
                for threads in THREADS:
                    run(app, threads, WARMUP_PER_THREAD)
            for threads in THREADS:
                per_thread = sizes.celery_messages // threads
                ctx.log(f"celery: {threads} thread(s), {'with' if confirm else 'without'} confirm_publish")
                runs = alternate(sizes.rounds, {name: partial(run, app, threads, per_thread)
                                                for name, app in apps.items()})
                rows.append(delay_row(threads, per_thread * threads, confirm, runs, manager.status().broker))
    return rows


def stop_all(managers: list[ConnectionManager]) -> None:
    """Stop the transport's managers (they start again when a connection needs them)."""
    for manager in managers:
        manager.stop(timeout=10)


def delay_row(threads: int, calls: int, confirm: bool, runs: dict[str, list[DelayRun]], broker: Any) -> Row:
    """One sub-row: carrot+amqp:// against amqp://."""
    carrot, plain = (Throughput(tuple(r.rate for r in runs[k])) for k in ("carrot", "plain"))
    cpu = {k: statistics.median(r.cpu for r in runs[k]) for k in runs}
    share = carrot.median / plain.median
    options = ', ``broker_transport_options={"confirm_publish": True}``' if confirm else ""
    return Row(
        key="celery",
        label=(f"5. Celery ``.delay()`` from {threads} thread{'s' if threads > 1 else ''}{options}, "
               f"{calls:,} calls in all, ``carrot+amqp://``"),
        measured=f"{carrot.text()}{' in aggregate' if threads > 1 else ''}; CPU {duration(cpu['carrot'])}/call",
        comparison=(f"plain ``amqp://`` (kombu's py-amqp transport), same process: {plain.text()}; "
                    f"CPU {duration(cpu['plain'])}/call"),
        ratio=f"{ratio(share)} plain ``amqp://``",
        goal=f"≥ {GOAL:.1f}x plain ``amqp://``",
        met=share >= GOAL,
        figures={"threads": threads, "calls": calls, "confirm_publish": confirm, "carrot": carrot.as_dict(),
                 "plain": plain.as_dict(), "ratio": share,
                 "cpu_per_call_s": {k: {"median_s": cpu[k], "rounds_s": [r.cpu for r in runs[k]]} for k in runs},
                 "carrot_manager_broker": broker},
    )
