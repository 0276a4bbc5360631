"""Rows 5-6: recovery after a lost connection, and dead-peer detection.

Faults come from :class:`integration.proxy.FaultProxy` (a local TCP proxy in
front of the broker: ``cut()`` resets the connection, ``blackhole()`` makes
the peer silent) and from ``rabbitmqctl close_connection`` on our own,
uniquely named connection.  The shared broker itself is never touched.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from contextlib import ExitStack
from functools import partial
from typing import Callable

from carrot_kombu import Backoff

from integration.broker import close_connection
from integration.proxy import FaultProxy

from .clients import endpoint, scratch_queues, started, until_lease_works, until_not_connected
from .model import Context, Row
from .stats import Latency, duration

#: (label, policy) pairs for the recovery row.
POLICIES: tuple[tuple[str, Backoff], ...] = (
    ("default ``Backoff()`` (min 1 s)", Backoff()),
    ("``Backoff(min=0.05)``", Backoff(min=0.05)),
)
#: Margin over the first backoff slot allowed by the recovery goal.
RECOVERY_MARGIN = 0.05
NO_SUPERVISOR = "raw py-amqp, kombu: no supervisor; the application finds out on its next call and reconnects itself"


def proxy_for(url: str) -> FaultProxy:
    """A fault proxy in front of the broker of ``url``."""
    ep = endpoint(url)
    return FaultProxy(ep["hostname"], ep["port"])


def recovery_row(ctx: Context) -> list[Row]:
    """Row 5: from the fault to a working lease, proxy cut and broker-side close, two policies."""
    rows = []
    runs = ctx.sizes.recovery_runs
    with scratch_queues(ctx.url) as (_, (queue,)):
        for label, policy in POLICIES:
            ctx.log(f"recovery: {runs} proxy cuts, {label}")
            samples = cut_recoveries(ctx.url, policy, queue, runs)
            rows.append(recovery(
                f"5. Recovery after a proxy ``cut()``, {label}; from the cut", policy, samples))
        for label, policy in POLICIES:
            ctx.log(f"recovery: {runs} broker-side closes, {label}")
            unavailable = forced_close_unavailable(ctx.url)
            if unavailable:
                rows.append(Row(key="recovery", label=f"5. Recovery after a broker-side close, {label}",
                                measured=f"not measured: {unavailable}"))
                continue
            samples = forced_recoveries(ctx.url, policy, queue, runs)
            rows.append(recovery(
                f"5. Recovery after ``rabbitmqctl close_connection``, {label}; "
                "from the moment the client saw the close", policy, samples))
    return rows


def forced_close_unavailable(url: str) -> str:
    """Why ``rabbitmqctl close_connection`` cannot be used on this broker ('' if it can)."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not available here"
    if endpoint(url)["hostname"] not in ("127.0.0.1", "localhost", "::1"):
        return "rabbitmqctl only reaches a broker on this machine"
    return ""


def recovery(label: str, policy: Backoff, samples: list[float]) -> Row:
    """A recovery row: the goal is the first backoff slot plus 50 ms, at p95."""
    lat = Latency.of(samples)
    bound = policy.min + RECOVERY_MARGIN
    return Row(
        key="recovery",
        label=label,
        measured=lat.text(with_max=True),
        comparison=NO_SUPERVISOR,
        ratio=f"p95 = {lat.p95 / bound:.2f}x the goal",
        goal=f"≤ Backoff.min + 50 ms = {duration(bound)} (p95)",
        met=lat.p95 <= bound,
        figures={"latency": lat.as_dict(), "backoff_min_s": policy.min, "bound_s": bound},
    )


def cut_recoveries(url: str, policy: Backoff, queue: str, runs: int) -> list[float]:
    """Seconds from ``FaultProxy.cut()`` to a lease that made a round trip, ``runs`` times."""
    samples = []
    with ExitStack() as stack:
        proxy = stack.enter_context(proxy_for(url))
        manager, _ = stack.enter_context(started(proxy.url(), backoff=policy))
        until_lease_works(manager, queue, time.monotonic())
        for _ in range(runs):
            cut_at = time.monotonic()
            if proxy.cut() != 1:
                raise RuntimeError("expected exactly one connection through the proxy")
            samples.append(until_lease_works(manager, queue, cut_at))
    return samples


def forced_recoveries(url: str, policy: Backoff, queue: str, runs: int) -> list[float]:
    """Seconds from the client seeing a broker-side forced close to a working lease.

    ``rabbitmqctl`` takes ~0.6 s to start and find the connection; that is the
    tool's time, not the client's, so the clock starts when the manager
    leaves ``CONNECTED`` (polled every millisecond).
    """
    samples = []
    with started(url, backoff=policy) as (manager, name):
        until_lease_works(manager, queue, time.monotonic())
        for index in range(runs):
            closer = Background(partial(close_connection, name, f"carrot_kombu benchmark {index}"))
            deadline = time.monotonic() + 60
            while manager.connected:
                closer.check()
                if time.monotonic() > deadline:
                    raise TimeoutError("the forced close was not seen within 60 s")
                time.sleep(0.001)
            seen_at = time.monotonic()
            samples.append(until_lease_works(manager, queue, seen_at))
            closer.join()
    return samples


def dead_peer_row(ctx: Context) -> list[Row]:
    """Row 6: ``blackhole()`` to the manager leaving ``CONNECTED``, per heartbeat."""
    rows = []
    sizes = ctx.sizes
    with scratch_queues(ctx.url) as (_, (queue,)), proxy_for(ctx.url) as proxy:
        for heartbeat in sizes.dead_peer_heartbeats:
            ctx.log(f"dead peer: heartbeat {heartbeat} s, {sizes.dead_peer_runs} blackhole(s)")
            samples = detections(proxy, heartbeat, queue, sizes.dead_peer_runs)
            lat = Latency.of(samples)
            bound = 2 * heartbeat + 1.0
            rows.append(Row(
                key="dead_peer",
                label=(f"6. Dead peer: proxy ``blackhole()``, heartbeat {heartbeat} s, "
                       "``connection_timeout=2``; until the manager leaves ``CONNECTED``"),
                measured=f"{lat.text(with_max=True)}; median = {lat.median / heartbeat:.2f} x heartbeat",
                comparison=("raw py-amqp: no detection unless the application itself calls "
                            "``heartbeat_tick()`` often enough (it has no thread of its own)"),
                ratio=f"median/heartbeat = {lat.median / heartbeat:.2f}",
                goal=f"≤ 2 x heartbeat + 1 s = {duration(bound)} (p95)",
                met=lat.p95 <= bound,
                figures={"heartbeat_s": heartbeat, "latency": lat.as_dict(), "bound_s": bound,
                         "median_per_heartbeat": lat.median / heartbeat},
            ))
    return rows


def detections(proxy: FaultProxy, heartbeat: int, queue: str, runs: int) -> list[float]:
    """Blackhole ``runs`` times at a random moment of the heartbeat cycle; detection times."""
    phase = random.Random(heartbeat)
    samples = []
    with started(proxy.url(), heartbeat=heartbeat, connection_timeout=2,
                 backoff=Backoff(min=0.05, max=0.5)) as (manager, _):
        for _ in range(runs):
            until_lease_works(manager, queue, time.monotonic())
            time.sleep(phase.uniform(0, heartbeat))
            started_at = time.monotonic()
            proxy.blackhole()
            try:
                samples.append(until_not_connected(manager, started_at, timeout=2 * heartbeat + 30, poll=0.002))
            finally:
                proxy.heal()
        until_lease_works(manager, queue, time.monotonic())
    return samples


class Background:
    """Run a function on a thread; :meth:`join` re-raises what it raised."""

    def __init__(self, target: Callable[[], object]) -> None:
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                target()
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, name="bench-background", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Re-raise what the function raised, if it already failed."""
        if self._error:
            raise self._error[0]

    def join(self, timeout: float = 60) -> None:
        """Wait for the function; re-raise its exception.

        Raises:
            TimeoutError: Still running after ``timeout`` seconds.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background call still running")
        if self._error:
            raise self._error[0]

