"""Row 11: the asyncio API (``carrot_kombu.aio``) against aio-pika 10, in one process, on one broker.

Every comparison runs both clients in one event loop, in alternating rounds
(who goes first rotates); aio-pika uses ``connect_robust`` and a channel
with publisher confirms, as the issue asks.  aio-pika comes with the
``bench`` extra (``pip install 'aio-pika>=10,<11'``), never at runtime; the
row says "skipped" without it.

* one task publishing confirmed 1 KiB messages one by one;
* 100 tasks publishing confirmed at once (aggregate);
* consuming a backlog with prefetch 100 (ack each);
* event-loop lag: the p99 overshoot of a ``sleep(0.001)`` loop while 8
  tasks publish confirmed messages and one task consumes them;
* after a private node's restart (full run only), the first confirm and the
  first delivery of each client, both living through the same restarts
  (carrot_kombu with the default ``Backoff()``, aio-pika's ``connect_robust``
  with its default ``reconnect_interval``).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import time
from time import perf_counter
from typing import Any, Awaitable, Callable, Optional

from carrot_kombu import ConnectionManager
from carrot_kombu.aio import AsyncConnectionManager

from integration.broker import unique

from .clients import QUEUE_EXPIRES_MS, scratch_queues
from .model import Context, Row
from .stats import Throughput, percentile, ratio

BODY = b"x" * 1024
WARMUP = 200
CONCURRENT_TASKS = 100
LAG_PUBLISHERS = 8
PREFETCH = 100


def asyncio_row(ctx: Context) -> list[Row]:
    """Row 11 (several lines): carrot_kombu.aio vs aio-pika."""
    try:
        import aio_pika  # noqa: F401
    except ImportError:
        return [Row(key="asyncio", label="11. asyncio vs aio-pika",
                    measured="skipped: aio-pika is not installed (pip install '.[bench]')")]
    rows = asyncio.run(_rows(ctx))
    rows.extend(asyncio.run(_restart_rows(ctx)))
    return rows


async def _alternate(rounds: int, runners: dict[str, Callable[[], Awaitable[Any]]]) -> dict[str, list[Any]]:
    """:func:`benchmarks.timing.alternate` for coroutines."""
    names = list(runners)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            results[name].append(await runners[name]())
    return results


async def _rows(ctx: Context) -> list[Row]:
    import aio_pika

    sizes = ctx.sizes
    one_by_one = max(200, sizes.confirm_messages)
    concurrent = max(1_000, sizes.confirm_thread_messages)
    backlog = max(2_000, sizes.confirm_thread_messages * 2)
    lag_seconds = 3.0 if sizes.mode == "full" else 1.0
    rows: list[Row] = []
    with scratch_queues(ctx.url, 3) as (admin, (q_pub, q_con, q_lag)):
        for name in (q_con, q_lag):
            # Consumed and cancelled every round: not auto-delete, as the scratch queues are.
            admin.queue_delete(name)
            admin.queue_declare(name, auto_delete=False, arguments={"x-expires": QUEUE_EXPIRES_MS})
        async with AsyncConnectionManager(ctx.url, client_properties={"connection_name": unique("ck-bench-aio")}) as m:
            pika = await aio_pika.connect_robust(ctx.url, client_properties={"connection_name": unique("ck-bench-pika")})
            try:
                channel = await pika.channel(publisher_confirms=True)
                exchange = channel.default_exchange

                async def ck_one(n: int) -> float:
                    start = perf_counter()
                    for _ in range(n):
                        await m.publish(BODY, routing_key=q_pub)
                    rate = n / (perf_counter() - start)
                    admin.queue_purge(q_pub)
                    return rate

                async def pika_one(n: int) -> float:
                    start = perf_counter()
                    for _ in range(n):
                        await exchange.publish(aio_pika.Message(BODY), routing_key=q_pub)
                    rate = n / (perf_counter() - start)
                    admin.queue_purge(q_pub)
                    return rate

                await ck_one(WARMUP)
                await pika_one(WARMUP)
                ctx.log("asyncio: one task publishing one by one")
                runs = await _alternate(sizes.rounds, {"ck": lambda: ck_one(one_by_one),
                                                        "pika": lambda: pika_one(one_by_one)})
                rows.append(_versus("asyncio", f"11a. asyncio: one task, confirmed 1 KiB one by one x {one_by_one:,}",
                                    runs, "``await exchange.publish(...)`` (publisher confirms)"))

                async def ck_many(n: int) -> float:
                    async def task(k: int) -> None:
                        for _ in range(k):
                            await m.publish(BODY, routing_key=q_pub)

                    start = perf_counter()
                    await asyncio.gather(*[task(n // CONCURRENT_TASKS) for _ in range(CONCURRENT_TASKS)])
                    rate = n / (perf_counter() - start)
                    admin.queue_purge(q_pub)
                    return rate

                async def pika_many(n: int) -> float:
                    async def task(k: int) -> None:
                        for _ in range(k):
                            await exchange.publish(aio_pika.Message(BODY), routing_key=q_pub)

                    start = perf_counter()
                    await asyncio.gather(*[task(n // CONCURRENT_TASKS) for _ in range(CONCURRENT_TASKS)])
                    rate = n / (perf_counter() - start)
                    admin.queue_purge(q_pub)
                    return rate

                ctx.log("asyncio: 100 concurrent tasks")
                runs = await _alternate(sizes.rounds, {"ck": lambda: ck_many(concurrent),
                                                        "pika": lambda: pika_many(concurrent)})
                rows.append(_versus("asyncio", f"11b. asyncio: {CONCURRENT_TASKS} tasks at once, confirmed 1 KiB "
                                    f"x {concurrent:,} (aggregate)", runs, "the same with aio-pika"))

                filler: ConnectionManager = m.manager

                async def fill() -> None:
                    await asyncio.get_running_loop().run_in_executor(
                        None, lambda: filler.publish_many([BODY] * backlog, routing_key=q_con, timeout=120))

                async def ck_consume() -> float:
                    await fill()
                    start = perf_counter()
                    async with m.consume(q_con, prefetch_count=PREFETCH, declare=False) as messages:
                        for _ in range(backlog):
                            message = await messages.get()
                            await message.ack()
                    return backlog / (perf_counter() - start)

                async def pika_consume() -> float:
                    await fill()
                    start = perf_counter()
                    consume_channel = await pika.channel()
                    await consume_channel.set_qos(prefetch_count=PREFETCH)
                    queue = await consume_channel.get_queue(q_con, ensure=False)
                    got = 0
                    async with queue.iterator() as iterator:
                        async for message in iterator:
                            await message.ack()
                            got += 1
                            if got == backlog:
                                break
                    rate = backlog / (perf_counter() - start)
                    await consume_channel.close()
                    return rate

                ctx.log("asyncio: consuming with prefetch 100")
                runs = await _alternate(sizes.rounds, {"ck": ck_consume, "pika": pika_consume})
                rows.append(_versus("asyncio", f"11c. asyncio: consume a backlog of {backlog:,} with prefetch "
                                    f"{PREFETCH}, ack each", runs, "``queue.iterator()`` with ``set_qos(100)``"))

                async def lag(publish: Optional[Callable[[], Awaitable[None]]],
                              consume: Optional[Callable[[asyncio.Event], Awaitable[None]]]) -> float:
                    """The p99 overshoot under this load; with neither, of the idle loop (this machine's floor)."""
                    stop = asyncio.Event()
                    samples: list[float] = []

                    async def ticker() -> None:
                        while not stop.is_set():
                            start = perf_counter()
                            await asyncio.sleep(0.001)
                            samples.append(perf_counter() - start - 0.001)

                    async def publisher() -> None:
                        assert publish is not None
                        while not stop.is_set():
                            await publish()

                    load = [] if consume is None else [consume(stop)] + [publisher() for _ in range(LAG_PUBLISHERS)]
                    tasks = [asyncio.ensure_future(t) for t in [ticker()] + load]
                    await asyncio.sleep(lag_seconds)
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
                    admin.queue_purge(q_lag)
                    samples.sort()
                    return percentile(samples, 99)

                async def ck_publish() -> None:
                    await m.publish(BODY, routing_key=q_lag)

                async def ck_consumer(stop: asyncio.Event) -> None:
                    async with m.consume(q_lag, prefetch_count=PREFETCH, declare=False) as messages:
                        while not stop.is_set():
                            try:
                                message = await asyncio.wait_for(messages.get(), 0.1)
                            except asyncio.TimeoutError:
                                continue
                            await message.ack()

                async def pika_publish() -> None:
                    await exchange.publish(aio_pika.Message(BODY), routing_key=q_lag)

                async def pika_consumer(stop: asyncio.Event) -> None:
                    consume_channel = await pika.channel()
                    await consume_channel.set_qos(prefetch_count=PREFETCH)
                    queue = await consume_channel.get_queue(q_lag, ensure=False)
                    async with queue.iterator() as iterator:
                        while not stop.is_set():
                            try:
                                message = await asyncio.wait_for(iterator.__anext__(), 0.1)
                            except asyncio.TimeoutError:
                                continue
                            await message.ack()
                    await consume_channel.close()

                ctx.log("asyncio: event-loop lag under load")
                async def switching_every_ms() -> float:
                    # The loop waits for the GIL while our I/O threads run: at most
                    # sys.getswitchinterval() (5 ms by default) per wait.
                    default = sys.getswitchinterval()
                    sys.setswitchinterval(0.001)
                    try:
                        return await lag(ck_publish, ck_consumer)
                    finally:
                        sys.setswitchinterval(default)

                runs = await _alternate(sizes.rounds, {"ck": lambda: lag(ck_publish, ck_consumer),
                                                        "pika": lambda: lag(pika_publish, pika_consumer),
                                                        "idle": lambda: lag(None, None),
                                                        "ck_1ms": switching_every_ms})
                ck_p99, pika_p99 = statistics.median(runs["ck"]), statistics.median(runs["pika"])
                idle_p99, ck_1ms_p99 = statistics.median(runs["idle"]), statistics.median(runs["ck_1ms"])
                rows.append(Row(
                    key="asyncio",
                    label=f"11d. asyncio: event-loop lag (p99 overshoot of ``sleep(0.001)``) while "
                          f"{LAG_PUBLISHERS} tasks publish confirmed and one consumes ({lag_seconds:g} s rounds)",
                    measured=f"p99 {ck_p99 * 1000:.2f} ms (median of {len(runs['ck'])} rounds, "
                             f"{min(runs['ck']) * 1000:.2f}–{max(runs['ck']) * 1000:.2f})",
                    comparison=f"aio-pika: p99 {pika_p99 * 1000:.2f} ms; the idle loop on this machine: "
                               f"p99 {idle_p99 * 1000:.2f} ms; carrot_kombu with ``sys.setswitchinterval(0.001)``: "
                               f"p99 {ck_1ms_p99 * 1000:.2f} ms",
                    ratio=f"{ratio(pika_p99 / ck_p99 if ck_p99 else None)} aio-pika's lag (higher: less lag)",
                    goal="p99 ≤ 2 ms",
                    met=ck_p99 <= 0.002,
                    figures={"carrot_kombu_p99_s": runs["ck"], "aio_pika_p99_s": runs["pika"],
                             "idle_loop_p99_s": runs["idle"], "carrot_kombu_switch_1ms_p99_s": runs["ck_1ms"]},
                ))
            finally:
                await pika.close()
    return rows


def _versus(key: str, label: str, runs: dict[str, list[float]], comparison: str,
            goal: float = 1.0, note: Optional[str] = None) -> Row:
    ours, theirs = Throughput(tuple(runs["ck"])), Throughput(tuple(runs["pika"]))
    share = ours.median / theirs.median
    return Row(
        key=key,
        label=label,
        measured=ours.text(),
        comparison=f"aio-pika 10 {comparison}: {theirs.text()}" + (f" ({note})" if note else ""),
        ratio=f"{ratio(share)} aio-pika's throughput",
        goal=f"≥ {goal:.1f}x aio-pika",
        met=share >= goal,
        figures={"carrot_kombu": ours.as_dict(), "aio_pika": theirs.as_dict(), "ratio": share},
    )


async def _restart_rows(ctx: Context) -> list[Row]:
    """Row 11e: first confirm / first delivery after a private node's restart, both clients at once."""
    import aio_pika
    import kombu

    from .faults import private_nodes_unavailable, until_accepts

    runs, down = ctx.sizes.restart_runs, ctx.sizes.restart_down_s
    label = (f"11e. asyncio: after a broker restart (private node: ``stop_app``, {down:g} s down, ``start_app``), "
             "from the node accepting TCP again: first confirm / first delivery, one task publishing one by one "
             "and one consuming, per client")
    if runs == 0:
        return [Row(key="asyncio", label=label,
                    measured="skipped in ``--quick`` (a private node takes 2-30 s to boot); measured in the full run")]
    unavailable = private_nodes_unavailable()
    if unavailable:
        return [Row(key="asyncio", label=label, measured=f"not measured: {unavailable}")]
    from integration.cluster import sigterm_as_interrupt
    from integration.nodes import private_nodes

    loop = asyncio.get_running_loop()
    ctx.log(f"asyncio: {runs} broker restart(s) on a private node, carrot_kombu.aio and aio-pika")
    results: list[dict[str, float]] = []
    with sigterm_as_interrupt(), private_nodes(1) as (node,):  # the node is always stopped
        ck_queue, pika_queue = unique("ck-bench-aio-restart"), unique("ck-bench-pika-restart")
        confirms: dict[str, list[float]] = {"ck": [], "pika": []}
        deliveries: dict[str, list[float]] = {"ck": [], "pika": []}
        stop = asyncio.Event()
        async with AsyncConnectionManager(node.url) as m:
            await m.declare(kombu.Queue(ck_queue, durable=True, auto_delete=False))
            pika = await aio_pika.connect_robust(node.url)
            try:
                channel = await pika.channel(publisher_confirms=True)
                await channel.set_qos(prefetch_count=PREFETCH)
                queue = await channel.declare_queue(pika_queue, durable=True)

                async def on_pika(message: Any) -> None:
                    deliveries["pika"].append(perf_counter())
                    await message.ack()

                await queue.consume(on_pika)

                async def ck_publisher() -> None:
                    while not stop.is_set():
                        try:
                            await m.publish(BODY, routing_key=ck_queue, timeout=120)
                            confirms["ck"].append(perf_counter())
                        except Exception:  # noqa: BLE001 - counted by its absence: the clock runs on
                            await asyncio.sleep(0.01)

                async def ck_consumer() -> None:
                    async with m.consume(ck_queue, prefetch_count=PREFETCH) as messages:
                        while not stop.is_set():
                            try:
                                message = await asyncio.wait_for(messages.get(), 0.1)
                            except asyncio.TimeoutError:
                                continue
                            deliveries["ck"].append(perf_counter())
                            await message.ack()

                async def pika_publisher() -> None:
                    while not stop.is_set():
                        try:
                            await channel.default_exchange.publish(aio_pika.Message(BODY), routing_key=pika_queue,
                                                                   timeout=120)
                            confirms["pika"].append(perf_counter())
                        except Exception:  # noqa: BLE001 - closed while reconnecting: try again
                            await asyncio.sleep(0.01)

                async def after(series: list[float], since: float, timeout: float) -> float:
                    deadline = perf_counter() + timeout
                    while not (series and series[-1] > since):
                        if perf_counter() > deadline:
                            return float("nan")
                        await asyncio.sleep(0.005)
                    return next(t for t in series if t > since) - since

                tasks = [asyncio.ensure_future(t) for t in (ck_publisher(), ck_consumer(), pika_publisher())]
                try:
                    for _ in range(runs):
                        warm = perf_counter()
                        for series in (confirms["ck"], confirms["pika"], deliveries["ck"], deliveries["pika"]):
                            await after(series, warm, 60)
                        await loop.run_in_executor(None, node.stop_app)
                        await asyncio.sleep(down)
                        starting = loop.run_in_executor(None, node.start_app)
                        accepted = await loop.run_in_executor(None, lambda: until_accepts(node.port, 120, 0.02))
                        since = accepted - time.monotonic() + perf_counter()  # the same moment on perf_counter
                        waits = await asyncio.gather(*(after(series, since, 90) for series in (
                            confirms["ck"], deliveries["ck"], confirms["pika"], deliveries["pika"])))
                        await starting
                        results.append(dict(zip(("ck_confirm_s", "ck_delivery_s", "pika_confirm_s",
                                                 "pika_delivery_s"), waits)))
                finally:
                    stop.set()
                    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 150)
            finally:
                await pika.close()
    medians = {key: statistics.median(r[key] for r in results) for key in results[0]}
    worst = {key: max(r[key] for r in results) for key in results[0]}
    met = all(r["ck_confirm_s"] <= r["pika_confirm_s"] and r["ck_delivery_s"] <= r["pika_delivery_s"]
              for r in results)
    return [Row(
        key="asyncio",
        label=label,
        measured=(f"first confirm: median {medians['ck_confirm_s']:.2f} s (max {worst['ck_confirm_s']:.2f}); "
                  f"first delivery: median {medians['ck_delivery_s']:.2f} s (max {worst['ck_delivery_s']:.2f}); "
                  f"n={len(results)}"),
        comparison=(f"aio-pika 10 ``connect_robust``: first confirm median {medians['pika_confirm_s']:.2f} s "
                    f"(max {worst['pika_confirm_s']:.2f}); first delivery median "
                    f"{medians['pika_delivery_s']:.2f} s (max {worst['pika_delivery_s']:.2f})"),
        ratio=f"first confirm {ratio(medians['pika_confirm_s'] / medians['ck_confirm_s'])} sooner (medians)",
        goal="no later than aio-pika, in every restart",
        met=met,
        figures={"restarts": results, "down_s": down},
    )]
