"""Rows 1-4: lease latency, publish throughput, confirmed publish, thread sharing.

Each compares carrot_kombu with raw py-amqp (and kombu's ``ChannelPool``) in
this process, on the same broker, in alternating rounds.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from functools import partial
from time import perf_counter
from typing import Any, Optional

import amqp
import kombu

from carrot_kombu import ConnectionManager

from .clients import raw, scratch_queues, started
from .model import Context, Row
from .stats import Latency, Throughput, ratio
from .timing import alternate, time_each

BODY = b"x" * 1024
#: Publishes before the measured rounds (connections, channels, broker queue warm).
WARMUP = 500


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


def confirm_row(ctx: Context) -> list[Row]:
    """Row 3: publisher confirms: one by one (lease, ``manager.publish``) and pipelined, vs raw."""
    sizes = ctx.sizes
    count = sizes.confirm_messages
    threads = 8
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url))
        conn = stack.enter_context(raw(ctx.url))
        admin, (queue,) = stack.enter_context(scratch_queues(ctx.url))
        lease = manager.open_channel()
        stack.callback(lease.release, discard=True)  # a confirm-mode channel stays out of the pool
        channel = conn.channel()
        lease_message = lease.prepare_message(BODY)
        raw_message = amqp.Message(BODY)

        def timed(op: Any, n: int) -> tuple[list[float], float]:
            start = perf_counter()
            samples = time_each(op, n)
            rate = n / (perf_counter() - start)
            admin.queue_purge(queue)
            return samples, rate

        def run(chan: Any, message: Any, n: int) -> tuple[list[float], float]:
            return timed(lambda: chan.basic_publish_confirm(message, exchange="", routing_key=queue), n)

        def run_publish(n: int) -> tuple[list[float], float]:
            return timed(lambda: manager.publish(BODY, routing_key=queue), n)

        def run_threads(n: int) -> tuple[list[float], float]:
            def work() -> None:
                for _ in range(n // threads):
                    manager.publish(BODY, routing_key=queue)

            workers = [threading.Thread(target=work) for _ in range(threads)]
            start = perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            rate = (n // threads * threads) / (perf_counter() - start)
            admin.queue_purge(queue)
            return [], rate

        def run_many(n: int) -> tuple[list[float], float]:
            start = perf_counter()
            manager.publish_many((BODY for _ in range(n)), routing_key=queue)
            rate = n / (perf_counter() - start)
            admin.queue_purge(queue)
            return [], rate

        run(lease, lease_message, WARMUP // 5)
        run(channel, raw_message, WARMUP // 5)
        run_publish(WARMUP // 5)
        runs = alternate(sizes.rounds, {
            "lease": lambda: run(lease, lease_message, count),
            "raw": lambda: run(channel, raw_message, count),
            "publish": lambda: run_publish(count),
            "threads": lambda: run_threads(count),
            "many": lambda: run_many(count),
        })
    lat = {k: Latency.of(s for samples, _ in runs[k] for s in samples) for k in ("lease", "raw", "publish")}
    rate = {k: Throughput(tuple(r for _, r in runs[k])) for k in runs}
    raw_text = (f"raw py-amqp ``channel.basic_publish_confirm`` one by one: {rate['raw'].text()}; "
                f"per message {lat['raw'].text()}")

    def share(key: str) -> float:
        return rate[key].median / rate["raw"].median

    def figures(key: str) -> dict[str, Any]:
        extra = {"latency": lat[key].as_dict()} if key in lat else {}
        return {key: {**rate[key].as_dict(), **extra}, "raw": rate["raw"].as_dict(), "ratio": share(key),
                "messages": count}

    def row(key: str, label: str, measured: str, goal: str, at_least: Optional[float]) -> Row:
        return Row(
            key="confirm", label=f"3. Confirmed publish, {label}", measured=measured, comparison=raw_text,
            ratio=f"{ratio(share(key))} raw throughput", goal=goal,
            met=None if at_least is None else share(key) >= at_least, figures=figures(key),
        )

    per_message = {k: f"{rate[k].text()}; per message {lat[k].text()}" for k in lat}
    return [
        row("lease", f"one by one, 1 thread: ``lease.basic_publish_confirm`` x {count:,}",
            per_message["lease"], "≥ 0.9x raw throughput", 0.9),
        row("publish", f"one by one, 1 thread: ``manager.publish`` x {count:,}",
            per_message["publish"], "≥ 0.9x raw throughput", 0.9),
        # Issue 4 asks for 5x from threads *or* a batch helper: it is judged on
        # publish_many; threads pay one thread hand-off per confirm.
        row("threads", f"pipelined: ``manager.publish`` from {threads} threads, {count:,} in all",
            f"{rate['threads'].text()} in aggregate",
            "— (informational: the 5x goal is judged on ``publish_many``)", None),
        row("many", f"pipelined: ``manager.publish_many`` of {count:,} messages, 1 thread",
            rate["many"].text(), "≥ 5x raw throughput", 5),
    ]


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
        rows.append(Row(
            key="sharing",
            label=(f"4. Sharing: {n} thread{'s' if n > 1 else ''} publishing 1 KiB through one manager, "
                   f"{sizes.sharing_messages:,} messages in all"),
            measured=f"{agg.text()} in aggregate",
            comparison=("— (the baseline for the other thread counts)" if n == counts[0] else
                        "raw py-amqp: not run; threads sharing one raw connection hang "
                        "(see :doc:`behaviour`)"),
            ratio="1.00x" if n == counts[0] else f"{ratio(agg.median / base)} the {counts[0]}-thread aggregate",
            goal="— (informational)",
            figures={"threads": n, **agg.as_dict()},
        ))
    return rows


def publish_from_threads(manager: ConnectionManager, queues: list[str], per_thread: int) -> float:
    """Each thread takes its own lease and publishes to its own queue; seconds until the last is done.

    Raises:
        RuntimeError: A thread is still running after 300 s (a hang).
        Exception: Whatever a publishing thread raised.
    """
    barrier = threading.Barrier(len(queues) + 1)
    ends = [0.0] * len(queues)
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with manager.channel() as lease:
                message = lease.prepare_message(BODY)
                queue = queues[index]
                barrier.wait(30)
                for _ in range(per_thread):
                    lease.basic_publish(message, exchange="", routing_key=queue)
                lease.queue_declare(queue, passive=True)
                ends[index] = perf_counter()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,), name=f"bench-publisher-{i}", daemon=True)
               for i in range(len(queues))]
    for thread in threads:
        thread.start()
    try:
        barrier.wait(30)
    except threading.BrokenBarrierError:
        pass
    start = perf_counter()
    for thread in threads:
        thread.join(300)
    if any(thread.is_alive() for thread in threads):
        raise RuntimeError("a publishing thread is still running after 300 s")
    if errors:
        raise errors[0]
    return max(ends) - start
