"""Rows 1-4: lease latency, publish throughput, confirmed publish, thread sharing.

Each compares carrot_kombu with raw py-amqp (and kombu's ``ChannelPool``) in
this process, on the same broker, in alternating rounds.
"""

from __future__ import annotations

import statistics
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from time import perf_counter, process_time
from typing import Any, Callable

import amqp
import kombu

from carrot_kombu import ConnectionManager

from .clients import raw, scratch_queues, started
from .model import Context, Row
from .stats import Latency, Throughput, rate, ratio
from .timing import alternate, time_each

BODY = b"x" * 1024
#: Publishes before the measured rounds (connections, channels, broker queue warm).
WARMUP = 500
#: Threads of the "confirmed publish from threads" comparison.
CONFIRM_THREADS = 8
#: Sharing goal: every thread count keeps this share of the 1-thread aggregate.
SHARING_GOAL = 0.9


def lease_row(ctx: Context) -> list[Row]:
    """Row 1: ``open_channel()`` + ``release()`` on a warm pool vs a fresh raw channel vs kombu's pool."""
    sizes = ctx.sizes
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url))
        conn = stack.enter_context(raw(ctx.url))
        kconn = stack.enter_context(kombu.Connection(ctx.url))
        pool = kconn.ChannelPool(limit=10)
        stack.callback(pool.force_close_all)

        def lease_op() -> None:
            manager.open_channel().release()

        def raw_op() -> None:
            conn.channel().close()

        def kombu_op() -> None:
            pool.acquire().release()

        for op in (lease_op, raw_op, kombu_op):  # warm: the pools hold a channel
            op()
        runs = alternate(sizes.rounds, {
            "lease": lambda: time_each(lease_op, sizes.lease_ops),
            "raw": lambda: time_each(raw_op, sizes.raw_channel_ops),
            "kombu": lambda: time_each(kombu_op, sizes.lease_ops),
        })
    lease, fresh, kpool = (Latency.of(s for run in runs[k] for s in run) for k in ("lease", "raw", "kombu"))
    vs_raw = fresh.median / lease.median
    vs_kombu = kpool.median / lease.median
    return [Row(
        key="lease",
        label="1. Lease: ``open_channel()`` + ``release()`` on a warm pool",
        measured=lease.text(),
        comparison=(
            f"raw py-amqp ``connection.channel()`` + ``channel.close()``: {fresh.text()}; "
            f"kombu ``Connection.ChannelPool(10).acquire()`` + ``release()``: {kpool.text()}"
        ),
        ratio=f"{ratio(vs_raw)} faster than a raw channel; {ratio(vs_kombu)} kombu's pool speed",
        goal="≥ 100x faster than a fresh raw channel (medians)",
        met=vs_raw >= 100,
        figures={"lease": lease.as_dict(), "raw_channel": fresh.as_dict(), "kombu_pool": kpool.as_dict(),
                 "speedup_vs_raw": vs_raw, "speedup_vs_kombu_pool": vs_kombu},
    )]


def publish_row(ctx: Context) -> list[Row]:
    """Row 2: 1 KiB publishes through a lease vs raw ``basic_publish`` on one channel."""
    sizes = ctx.sizes
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url))
        conn = stack.enter_context(raw(ctx.url))
        admin, (queue,) = stack.enter_context(scratch_queues(ctx.url))
        lease = manager.open_channel()
        stack.callback(lease.release)
        channel = conn.channel()
        lease_message = lease.prepare_message(BODY)
        raw_message = amqp.Message(BODY)

        def run(chan: Any, message: Any, count: int) -> float:
            start = perf_counter()
            for _ in range(count):
                chan.basic_publish(message, exchange="", routing_key=queue)
            # One round trip on the same channel: the broker has taken them all.
            chan.queue_declare(queue, passive=True)
            elapsed = perf_counter() - start
            admin.queue_purge(queue)
            return count / elapsed

        run(lease, lease_message, WARMUP)
        run(channel, raw_message, WARMUP)
        runs = alternate(sizes.rounds, {
            "lease": lambda: run(lease, lease_message, sizes.publish_messages),
            "raw": lambda: run(channel, raw_message, sizes.publish_messages),
        })
    via_lease, direct = Throughput(tuple(runs["lease"])), Throughput(tuple(runs["raw"]))
    share = via_lease.median / direct.median
    return [Row(
        key="publish",
        label=f"2. Publish 1 KiB x {sizes.publish_messages:,} through a lease (``lease.basic_publish``)",
        measured=via_lease.text(),
        comparison=f"raw py-amqp ``channel.basic_publish`` on one channel: {direct.text()}",
        ratio=f"{ratio(share)} raw throughput",
        goal="≥ 0.95x raw throughput",
        met=share >= 0.95,
        figures={"lease": via_lease.as_dict(), "raw": direct.as_dict(), "ratio": share,
                 "messages": sizes.publish_messages},
    )]


@dataclass(frozen=True)
class ConfirmRun:
    """One round of confirmed publishing.

    Attributes:
        samples: Seconds per call (empty when not timed one by one).
        rate: Confirmed messages per second (in aggregate over all threads).
        cpu: Seconds of this process's CPU (all threads) per confirmed message.
    """

    samples: list[float]
    rate: float
    cpu: float


def confirm_row(ctx: Context) -> list[Row]:
    """Row 3: publisher confirms, one by one and from 8 threads, vs raw py-amqp; CPU per message."""
    sizes = ctx.sizes
    count = sizes.confirm_messages
    threads = CONFIRM_THREADS
    per_thread = sizes.confirm_thread_messages // threads
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url))
        conn = stack.enter_context(raw(ctx.url))
        # One raw connection (and confirm channel) per thread: threads sharing
        # one raw connection hang (see :doc:`behaviour`).
        raw_channels = [stack.enter_context(raw(ctx.url)).channel() for _ in range(threads)]
        admin, (queue,) = stack.enter_context(scratch_queues(ctx.url))
        lease = manager.open_channel()
        stack.callback(lease.release, discard=True)  # a confirm-mode channel stays out of the pool
        channel = conn.channel()
        lease_message = lease.prepare_message(BODY)
        raw_message = amqp.Message(BODY)

        def timed(op: Callable[[], object], n: int) -> ConfirmRun:
            cpu, start = process_time(), perf_counter()
            samples = time_each(op, n)
            elapsed, cpu = perf_counter() - start, process_time() - cpu
            admin.queue_purge(queue)
            return ConfirmRun(samples, n / elapsed, cpu / n)

        def run(chan: Any, message: Any, n: int) -> ConfirmRun:
            return timed(lambda: chan.basic_publish_confirm(message, exchange="", routing_key=queue), n)

        def run_publish(n: int) -> ConfirmRun:
            return timed(lambda: manager.publish(BODY, routing_key=queue), n)

        def run_threads(n: int) -> ConfirmRun:
            def work(index: int) -> None:
                for _ in range(n):
                    manager.publish(BODY, routing_key=queue)

            return on_threads(threads, work, n * threads)

        def run_raw_threads(n: int) -> ConfirmRun:
            def work(index: int) -> None:
                chan = raw_channels[index]
                message = amqp.Message(BODY)
                for _ in range(n):
                    chan.basic_publish_confirm(message, exchange="", routing_key=queue)

            return on_threads(threads, work, n * threads)

        def on_threads(n_threads: int, work: Callable[[int], None], total: int) -> ConfirmRun:
            cpu = process_time()
            elapsed = run_on_threads(n_threads, work)
            cpu = process_time() - cpu
            admin.queue_purge(queue)
            return ConfirmRun([], total / elapsed, cpu / total)

        def run_many(n: int) -> ConfirmRun:
            cpu, start = process_time(), perf_counter()
            manager.publish_many((BODY for _ in range(n)), routing_key=queue)
            elapsed, cpu = perf_counter() - start, process_time() - cpu
            admin.queue_purge(queue)
            return ConfirmRun([], n / elapsed, cpu / n)

        run(lease, lease_message, WARMUP // 5)
        run(channel, raw_message, WARMUP // 5)
        run_publish(WARMUP // 5)
        run_threads(WARMUP // 5 // threads + 1)
        run_raw_threads(WARMUP // 5 // threads + 1)  # each raw channel enters confirm mode
        runs = alternate(sizes.rounds, {
            "lease": lambda: run(lease, lease_message, count),
            "raw": lambda: run(channel, raw_message, count),
            "publish": lambda: run_publish(count),
            "threads": lambda: run_threads(per_thread),
            "raw_threads": lambda: run_raw_threads(per_thread),
            "many": lambda: run_many(count),
        })
    lat = {k: Latency.of(s for r in runs[k] for s in r.samples) for k in ("lease", "raw", "publish")}
    rates = {k: Throughput(tuple(r.rate for r in runs[k])) for k in runs}
    cpu = {k: statistics.median(r.cpu for r in runs[k]) for k in runs}
    raw_text = (f"raw py-amqp ``channel.basic_publish_confirm`` one by one: {rates['raw'].text()}; "
                f"per message {lat['raw'].text()}")
    raw_threads_text = (f"{threads} raw py-amqp connections, one per thread, ``basic_publish_confirm`` "
                        f"one by one: {rates['raw_threads'].text()} in aggregate")

    def share(key: str, base: str = "raw") -> float:
        return rates[key].median / rates[base].median

    def figures(key: str, base: str, messages: int) -> dict[str, Any]:
        extra = {"latency": lat[key].as_dict()} if key in lat else {}
        return {key: {**rates[key].as_dict(), **extra, "cpu_per_message_s": cpu[key]},
                base: {**rates[base].as_dict(), "cpu_per_message_s": cpu[base]},
                "ratio": share(key, base), "messages": messages}

    def row(key: str, label: str, measured: str, goal: str, at_least: float,
            base: str = "raw", comparison: str = raw_text, messages: int = count) -> Row:
        return Row(
            key="confirm", label=f"3. Confirmed publish, {label}", measured=measured, comparison=comparison,
            ratio=f"{ratio(share(key, base))} {'raw throughput' if base == 'raw' else 'the raw aggregate'}", goal=goal,
            met=share(key, base) >= at_least, figures=figures(key, base, messages),
        )

    per_message = {k: f"{rates[k].text()}; per message {lat[k].text()}" for k in lat}
    in_all = per_thread * threads
    cpu_figures = {k: {"median_s": cpu[k], "rounds_s": [r.cpu for r in runs[k]]} for k in runs}
    return [
        row("lease", f"one by one, 1 thread: ``lease.basic_publish_confirm`` x {count:,}",
            per_message["lease"], "≥ 0.95x raw throughput", 0.95),
        row("publish", f"one by one, 1 thread: ``manager.publish`` x {count:,}",
            per_message["publish"], "≥ 0.95x raw throughput", 0.95),
        row("threads", f"from {threads} threads: ``manager.publish`` one by one in each, {in_all:,} in all",
            f"{rates['threads'].text()} in aggregate", "≥ 1.0x the raw aggregate", 1.0,
            base="raw_threads", comparison=raw_threads_text, messages=in_all),
        row("many", f"pipelined: ``manager.publish_many`` of {count:,} messages, 1 thread",
            rates["many"].text(), "≥ 5x raw throughput", 5),
        Row(
            key="confirm",
            label="3. Confirmed publish, CPU of this process (all threads) per confirmed message",
            measured=(f"``manager.publish`` {micro(cpu['publish'])}; ``lease.basic_publish_confirm`` "
                      f"{micro(cpu['lease'])}; from {threads} threads: ``manager.publish`` "
                      f"{micro(cpu['threads'])}; ``publish_many`` {micro(cpu['many'])}"),
            comparison=(f"raw py-amqp ``basic_publish_confirm``: {micro(cpu['raw'])}; "
                        f"{threads} raw connections from {threads} threads: {micro(cpu['raw_threads'])}"),
            ratio=(f"``manager.publish`` {ratio(cpu['publish'] / cpu['raw'])}, lease "
                   f"{ratio(cpu['lease'] / cpu['raw'])}, {threads} threads "
                   f"{ratio(cpu['threads'] / cpu['raw_threads'])} raw CPU"),
            goal="— (informational)",
            figures={"cpu_per_message": cpu_figures,
                     "ratio_publish": cpu["publish"] / cpu["raw"], "ratio_lease": cpu["lease"] / cpu["raw"],
                     "ratio_threads": cpu["threads"] / cpu["raw_threads"]},
        ),
    ]


def micro(seconds: float) -> str:
    """CPU per message: ``41.2 µs``."""
    return f"{seconds * 1e6:.3g} µs"


def run_on_threads(count: int, work: Callable[[int], None], timeout: float = 300) -> float:
    """Run ``work(0..count-1)`` on ``count`` threads started together; seconds until the last returned.

    Raises:
        RuntimeError: A thread is still running after ``timeout`` (a hang).
        Exception: Whatever a thread raised.
    """
    barrier = threading.Barrier(count + 1)
    ends = [0.0] * count
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait(30)
            work(index)
            ends[index] = perf_counter()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            barrier.abort()

    workers = [threading.Thread(target=run, args=(i,), name=f"bench-worker-{i}", daemon=True) for i in range(count)]
    for worker in workers:
        worker.start()
    try:
        barrier.wait(30)
    except threading.BrokenBarrierError:
        pass
    start = perf_counter()
    for worker in workers:
        worker.join(timeout)
    if any(worker.is_alive() for worker in workers):
        raise RuntimeError(f"a benchmark thread is still running after {timeout} s")
    if errors:
        raise errors[0]
    return max(ends) - start


def sharing_row(ctx: Context) -> list[Row]:
    """Row 4: 1, 2, 4, 8 threads publishing through one manager, each on its own lease."""
    sizes = ctx.sizes
    counts = sizes.sharing_threads
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url, pool_limit=max(counts)))
        admin, queues = stack.enter_context(scratch_queues(ctx.url, count=max(counts)))

        def run(threads: int) -> float:
            per_thread = sizes.sharing_messages // threads
            elapsed = publish_from_threads(manager, queues[:threads], per_thread)
            for queue in queues[:threads]:
                admin.queue_purge(queue)
            return per_thread * threads / elapsed

        run(1)
        runs = alternate(sizes.rounds, {str(n): partial(run, n) for n in counts})
    base = Throughput(tuple(runs[str(counts[0])])).median
    rows = []
    for n in counts:
        agg = Throughput(tuple(runs[str(n)]))
        share = agg.median / base
        baseline = n == counts[0]
        rows.append(Row(
            key="sharing",
            label=(f"4. Sharing: {n} thread{'s' if n > 1 else ''} publishing 1 KiB through leases of one "
                   f"manager, {sizes.sharing_messages:,} messages in all"),
            measured=f"{agg.text()} in aggregate",
            comparison=("— (the baseline for the other thread counts; raw py-amqp: not run, threads "
                        "sharing one raw connection hang, see :doc:`behaviour`)" if baseline else
                        f"the {counts[0]}-thread aggregate: {rate(base)}"),
            ratio="1.00x" if baseline else f"{ratio(share)} the {counts[0]}-thread aggregate",
            goal="— (the baseline)" if baseline else f"≥ {SHARING_GOAL}x the {counts[0]}-thread aggregate",
            met=None if baseline else share >= SHARING_GOAL,
            figures={"threads": n, **agg.as_dict(), "ratio": share, "baseline_per_s": base},
        ))
    return rows


def publish_from_threads(manager: ConnectionManager, queues: list[str], per_thread: int) -> float:
    """Each thread publishes on its own lease to its own queue; seconds until the last is done.

    The leases are taken before the clock starts (and handed one to each thread).

    Raises:
        RuntimeError: A thread is still running after 300 s (a hang).
        Exception: Whatever a publishing thread raised.
    """
    with ExitStack() as stack:
        leases = [stack.enter_context(manager.channel()) for _ in queues]
        messages = [lease.prepare_message(BODY) for lease in leases]

        def work(index: int) -> None:
            lease, message, queue = leases[index], messages[index], queues[index]
            for _ in range(per_thread):
                lease.basic_publish(message, exchange="", routing_key=queue)
            lease.queue_declare(queue, passive=True)

        return run_on_threads(len(queues), work)
