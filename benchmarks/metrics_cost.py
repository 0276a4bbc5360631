"""Row 10: what exporting metrics costs the publish and confirm paths.

The library counts always (``carrot_kombu._metrics``); what a user switches
on is the export: :func:`carrot_kombu.metrics.register` (a Prometheus
collector) and :func:`carrot_kombu.metrics.instrument` (OpenTelemetry
instruments; its histograms are fed on every confirm and pool wait).  Here
"on" is both, with a scraper thread that reads the Prometheus text and
collects the OpenTelemetry reader once a second (a real Prometheus scrapes
every 15-60 s: this is the expensive end); "off" is neither.  The two
alternate round by round on the same manager, and each round's figure is
compared with the "off" round next to it (the median of those pair ratios
is the result: machine noise that spans a pair cancels).
"""

from __future__ import annotations

import statistics
import threading
from contextlib import ExitStack, contextmanager
from functools import partial
from time import perf_counter, process_time
from typing import Any, Callable, Iterator

from .clients import scratch_queues, started
from .model import Context, Row
from .speed import BODY, CONFIRM_THREADS, micro, run_on_threads
from .stats import ratio

#: Goal: with metrics exported, each path keeps this share of its throughput.
GOAL = 0.97
#: Each round is this many times shorter than the other rows' (and there are this many times more).
SHORTER = 3
#: Seconds between two scrapes while "on".
SCRAPE_EVERY = 1.0


#: The modes compared, in the order of a round (rotated every round).
MODES = ("off", "prometheus", "opentelemetry")


@contextmanager
def exporting(mode: str) -> Iterator[None]:
    """Turn one exporter on (scraped every second by a thread), off again on exit; ``"off"``: nothing."""
    if mode == "off":
        yield
        return
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from carrot_kombu import metrics

    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    scrape: Callable[[], object]
    if mode == "prometheus":
        metrics.register(registry)
        scrape = partial(generate_latest, registry)
    else:
        metrics.instrument(provider)
        scrape = reader.get_metrics_data
    stop = threading.Event()

    def scraper() -> None:
        while not stop.wait(SCRAPE_EVERY):
            scrape()

    thread = threading.Thread(target=scraper, name="ck-bench-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)
        if mode == "prometheus":
            metrics.unregister(registry)
        else:
            metrics.uninstrument(provider)
        provider.shutdown()


def metrics_row(ctx: Context) -> list[Row]:
    """Row 10: publish/confirm paths with metrics exported vs not, in alternating rounds."""
    sizes = ctx.sizes
    # Many short rounds rather than a few long ones: the median of 3x as many
    # pair ratios (each pair seconds apart) sits much closer to the true cost
    # on a noisy machine, for about the same total time.
    count = max(100, sizes.confirm_messages // SHORTER)
    per_thread = max(10, sizes.confirm_thread_messages // CONFIRM_THREADS // SHORTER)
    lease_messages = max(1_000, sizes.publish_messages // SHORTER)
    with ExitStack() as stack:
        manager, _ = stack.enter_context(started(ctx.url))
        admin, (queue,) = stack.enter_context(scratch_queues(ctx.url))
        lease = manager.open_channel()
        stack.callback(lease.release)
        message = lease.prepare_message(BODY)

        def measured(work: Callable[[], int]) -> tuple[float, float]:
            cpu, start = process_time(), perf_counter()
            n = work()
            elapsed, cpu = perf_counter() - start, process_time() - cpu
            admin.queue_purge(queue)
            return n / elapsed, cpu / n

        def one_by_one() -> int:
            for _ in range(count):
                manager.publish(BODY, routing_key=queue)
            return count

        def threads() -> int:
            def work(_index: int) -> None:
                for _ in range(per_thread):
                    manager.publish(BODY, routing_key=queue)

            run_on_threads(CONFIRM_THREADS, work)
            return per_thread * CONFIRM_THREADS

        def many() -> int:
            manager.publish_many([BODY] * count, routing_key=queue)
            return count

        def leased() -> int:
            n = lease_messages
            for _ in range(n):
                lease.basic_publish(message, exchange="", routing_key=queue)
            lease.queue_declare(queue, passive=True)  # one round trip: the broker took them all
            return n

        paths: dict[str, tuple[str, Callable[[], int]]] = {
            "publish": (f"``manager.publish`` one by one, 1 thread, {count:,} confirmed", one_by_one),
            "threads": (f"``manager.publish`` from {CONFIRM_THREADS} threads, "
                        f"{per_thread * CONFIRM_THREADS:,} confirmed in all", threads),
            "many": (f"``manager.publish_many`` of {count:,} confirmed", many),
            "lease": (f"``lease.basic_publish`` 1 KiB x {lease_messages:,} (no confirms)", leased),
        }
        for _label, work in paths.values():
            measured(work)  # warm the path and the broker queue
        rounds = (sizes.rounds + 2) * SHORTER
        results: dict[str, dict[str, list[tuple[float, float]]]] = {k: {m: [] for m in MODES} for k in paths}
        for index in range(rounds):
            shift = index % len(MODES)
            for mode in MODES[shift:] + MODES[:shift]:
                with exporting(mode):
                    for key, (_label, work) in paths.items():
                        results[key][mode].append(measured(work))
    rows = []
    for key, (label, _work) in paths.items():
        off = results[key]["off"]
        rate_off = statistics.median(r for r, _c in off)
        cpu_off = statistics.median(c for _r, c in off)
        parts: list[str] = []
        ratios: list[str] = []
        shares: dict[str, float] = {}
        figures: dict[str, Any] = {"off": [list(x) for x in off]}
        for mode in MODES[1:]:
            on = results[key][mode]
            # Each round against the "off" run of the same round: noise spanning a round cancels.
            share = statistics.median(a[0] / b[0] for a, b in zip(on, off))
            cpu_on = statistics.median(c for _r, c in on)
            parts.append(f"{_NAMES[mode]}: {_rate(statistics.median(r for r, _c in on))}, "
                         f"CPU {micro(cpu_on)}/message")
            ratios.append(f"{_NAMES[mode]} {ratio(share)}")
            shares[mode] = share
            figures[mode] = {"runs": [list(x) for x in on], "ratio": share, "cpu_s": cpu_on}
        prometheus = shares["prometheus"]
        rows.append(Row(
            key="metrics",
            label=f"10. Metrics exported (scraped every {SCRAPE_EVERY:g} s): {label}",
            measured="; ".join(parts) + f" (median of {rounds} rounds)",
            comparison=f"the same manager, nothing exported: {_rate(rate_off)}, CPU {micro(cpu_off)}/message",
            ratio=", ".join(ratios) + " the throughput without export (median of the per-round ratios)",
            goal=f"Prometheus ≥ {GOAL}x (at most {round((1 - GOAL) * 100)} % slower)",
            met=prometheus >= GOAL,
            figures=figures,
        ))
    return rows


_NAMES = {"prometheus": "Prometheus ``register()``", "opentelemetry": "OpenTelemetry ``instrument()``"}


def _rate(value: float) -> str:
    return f"{value / 1000:.3g}k msgs/s" if value >= 1000 else f"{value:.3g} msgs/s"


__all__ = ("metrics_row", "exporting")
