"""Small probes behind the figures of the closing notes (not rows of the page).

``python -m benchmarks.probes KIND [--url URL] [--rounds N]``, run from the
root of a checkout.  Each prints one line.  For an A/B against an older
commit, copy this file into a worktree of it and run the same probe there
(``PYTHONPATH=$PWD``), alternating with this one: the probes only use the
public API and benchmark helpers that commit 130842f already had.

- ``lease``: ``open_channel()`` + ``release()`` on a warm pool against
  kombu's ``ChannelPool(10).acquire()`` + ``release()`` (medians, µs).
- ``cpu``: CPU per confirmed ``manager.publish`` against raw py-amqp's
  ``basic_publish_confirm``, and per thread (``/proc/self/task/*/schedstat``).
- ``threads8``: aggregate confirmed ``manager.publish`` from 8 threads.
- ``celery``: ``.delay()`` with ``confirm_publish`` on ``carrot+amqp://``
  and on ``pyamqp://`` (CPU per call and calls/s).
- ``depth``: CPU per confirmed publish called at stack depths 0-192: CPython
  3.11 allocates frames in 16 KB chunks, and a call that straddles a chunk
  boundary maps and unmaps one per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from functools import partial
from typing import Any, Callable

from .speed import run_on_threads
from .timing import alternate, time_each

URL = "amqp://guest:guest@127.0.0.1:5672//"
BODY = b"x" * 1024


def lease(url: str, rounds: int) -> str:
    """Warm lease vs kombu's pool."""
    import kombu

    from .clients import started

    with started(url) as (manager, _), kombu.Connection(url) as conn:
        pool = conn.ChannelPool(limit=10)
        try:
            ops: dict[str, Callable[[], object]] = {
                "lease": lambda: manager.open_channel().release(), "kombu": lambda: pool.acquire().release(),
            }
            for op in ops.values():
                op()
            runs = alternate(rounds, {key: partial(time_each, op, 20_000) for key, op in ops.items()})
        finally:
            pool.force_close_all()
    mine, theirs = (statistics.median(sample for run in runs[key] for sample in run) for key in ("lease", "kombu"))
    return f"lease {mine * 1e6:.2f} µs, kombu's pool {theirs * 1e6:.2f} µs: {theirs / mine:.2f}x kombu's speed"


def _thread_cpu() -> dict[str, int]:
    """Nanoseconds of CPU so far of each thread of this process, by thread name."""
    names = {str(t.native_id): t.name for t in threading.enumerate()}
    out: dict[str, int] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as stat:
                out[names.get(tid, tid)] = int(stat.read().split()[0])
        except OSError:
            pass  # the thread ended
    return out


def cpu(url: str, rounds: int) -> str:
    """CPU per confirmed publish: manager.publish vs raw py-amqp, and by thread."""
    import amqp

    from .clients import raw, scratch_queues, started

    n = 3000
    with started(url) as (manager, _), raw(url) as conn, scratch_queues(url) as (admin, (queue,)):
        channel, message = conn.channel(), amqp.Message(BODY)
        ops: dict[str, Callable[[], object]] = {
            "raw": lambda: channel.basic_publish_confirm(message, exchange="", routing_key=queue),
            "publish": lambda: manager.publish(BODY, routing_key=queue),
        }
        by_thread: dict[str, dict[str, float]] = {}

        def measured(key: str) -> float:
            """CPU seconds per call of ``ops[key]``; by thread in ``by_thread`` (µs, the last round's)."""
            before, started_cpu = _thread_cpu(), time.process_time()
            time_each(ops[key], n)
            per_call = (time.process_time() - started_cpu) / n
            after = _thread_cpu()
            by_thread[key] = {name: round((ns - before.get(name, 0)) / n / 1000, 1)
                              for name, ns in after.items() if ns - before.get(name, 0) > n * 50}
            admin.queue_purge(queue)
            return per_call

        cpu_s = alternate(rounds, {key: partial(measured, key) for key in ops})
    mine, theirs = (statistics.median(cpu_s[key]) for key in ("publish", "raw"))
    return (f"manager.publish {mine * 1e6:.1f} µs, raw {theirs * 1e6:.1f} µs CPU per confirmed message: "
            f"{mine / theirs:.2f}x raw; µs by thread (last round): {by_thread['publish']}")


def threads8(url: str, rounds: int) -> str:
    """Aggregate confirmed manager.publish from 8 threads."""
    from .clients import scratch_queues, started

    with started(url) as (manager, _), scratch_queues(url) as (admin, (queue,)):
        def run(per_thread: int, count: int = 8) -> float:
            def work(index: int) -> None:
                for _ in range(per_thread):
                    manager.publish(BODY, routing_key=queue)

            rate = per_thread * count / run_on_threads(count, work)
            admin.queue_purge(queue)
            return rate

        run(100)
        rates = [run(500) for _ in range(rounds)]
    return f"8 threads: {statistics.median(rates):,.0f} msgs/s (median; rounds {[round(r) for r in rates]})"


def celery(url: str, rounds: int) -> str:
    """Celery .delay() with confirm_publish on both transports."""
    import amqp

    from .celery_tasks import celery_app

    host = url.split("://", 1)[1]
    conn = amqp.Connection(host.split("/", 1)[0].split("@")[-1])
    conn.connect()
    admin = conn.channel()
    out = []
    try:
        for scheme in ("carrot+amqp", "pyamqp"):
            with celery_app(f"{scheme}://{host}", True, admin) as app:
                for x in range(50):
                    app.task.delay(x)
                results = []
                for _ in range(rounds):
                    start_cpu, start = time.process_time(), time.perf_counter()
                    for x in range(400):
                        app.task.delay(x)
                    results.append(((time.process_time() - start_cpu) / 400, 400 / (time.perf_counter() - start)))
                admin.queue_purge(app.queue)
            out.append(f"{scheme}: CPU {statistics.median(c for c, _ in results) * 1e6:.0f} µs/call, "
                       f"{statistics.median(r for _, r in results):,.0f} calls/s")
    finally:
        conn.close()
    return "; ".join(out)


def depth(url: str, rounds: int) -> str:
    """CPU per confirmed publish by the stack depth it is called at."""
    from .clients import scratch_queues, started

    def at_depth(levels: int, fn: Callable[[], Any]) -> Any:
        return fn() if levels == 0 else at_depth(levels - 1, fn)

    with started(url) as (manager, _), scratch_queues(url) as (admin, (queue,)):
        def run() -> float:
            start = time.process_time()
            for _ in range(1500):
                manager.publish(BODY, routing_key=queue)
            return (time.process_time() - start) / 1500

        run()
        found: dict[int, list[float]] = {}
        for _ in range(rounds):
            for levels in range(0, 200, 8):
                found.setdefault(levels, []).append(at_depth(levels, run))
            admin.queue_purge(queue)
    return " ".join(f"{levels}:{statistics.median(v) * 1e6:.0f}µs" for levels, v in sorted(found.items()))


PROBES = {"lease": lease, "cpu": cpu, "threads8": threads8, "celery": celery, "depth": depth}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probes", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=sorted(PROBES))
    parser.add_argument("--url", default=URL)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print(f"{args.kind} ({os.getcwd()}): {PROBES[args.kind](args.url, args.rounds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
