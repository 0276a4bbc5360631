"""Rows 6 and 8: recovery after a lost connection, and dead-peer detection.

Faults come from :class:`integration.proxy.FaultProxy` (a local TCP proxy in
front of the broker: ``cut()`` resets the connection, ``blackhole()`` makes
the peer silent), from ``rabbitmqctl close_connection`` on our own,
uniquely named connection, and from restarting a private node
(:func:`integration.nodes.private_nodes`).  The shared broker itself is
never stopped or reconfigured.
"""

from __future__ import annotations

import random
import shutil
import socket
import threading
import time
from contextlib import ExitStack
from functools import partial
from typing import Any, Callable

import kombu

from carrot_kombu import Backoff, ConnectionManager

from integration.broker import close_connection, unique
from integration.cluster import sigterm_as_interrupt
from integration.kombu_failover import CELERY_RETRY_POLICY
from integration.nodes import private_nodes
from integration.proxy import FaultProxy

from carrot_kombu._supervisor import SHORT_LIVED

from .clients import endpoint, scratch_queues, started, until_lease_works, until_not_connected
from .model import Context, Row
from .stats import Latency, duration, ratio

#: (label, policy) pairs for the recovery row.
POLICIES: tuple[tuple[str, Backoff], ...] = (
    ("default ``Backoff()`` (min 1 s)", Backoff()),
    ("``Backoff(min=0.05)``", Backoff(min=0.05)),
)
#: Margin over the first backoff slot allowed by the recovery goal.
RECOVERY_MARGIN = 0.05
#: Goal for recovery after a broker restart with the default ``Backoff()``, seconds.
RESTART_GOAL_S = 1.0
NO_SUPERVISOR = "raw py-amqp, kombu: no supervisor; the application finds out on its next call and reconnects itself"


def proxy_for(url: str) -> FaultProxy:
    """A fault proxy in front of the broker of ``url``."""
    ep = endpoint(url)
    return FaultProxy(ep["hostname"], ep["port"])


def recovery_row(ctx: Context) -> list[Row]:
    """Row 6: from the fault to a working lease: proxy cut and broker-side close (two policies), broker restart."""
    rows = []
    runs = ctx.sizes.recovery_runs
    with scratch_queues(ctx.url) as (_, (queue,)):
        for label, policy in POLICIES:
            ctx.log(f"recovery: {runs} proxy cuts, {label}")
            samples = cut_recoveries(ctx.url, policy, queue, runs)
            rows.append(recovery(
                f"6. Recovery after a proxy ``cut()``, {label}; from the cut", policy, samples))
        for label, policy in POLICIES:
            ctx.log(f"recovery: {runs} broker-side closes, {label}")
            unavailable = forced_close_unavailable(ctx.url)
            if unavailable:
                rows.append(Row(key="recovery", label=f"6. Recovery after a broker-side close, {label}",
                                measured=f"not measured: {unavailable}"))
                continue
            samples = forced_recoveries(ctx.url, policy, queue, runs)
            rows.append(recovery(
                f"6. Recovery after ``rabbitmqctl close_connection``, {label}; "
                "from the moment the client saw the close", policy, samples))
    rows.append(restart_row(ctx))
    return rows


def forced_close_unavailable(url: str) -> str:
    """Why ``rabbitmqctl close_connection`` cannot be used on this broker ('' if it can)."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not available here"
    if endpoint(url)["hostname"] not in ("127.0.0.1", "localhost", "::1"):
        return "rabbitmqctl only reaches a broker on this machine"
    return ""


def private_nodes_unavailable() -> str:
    """Why private RabbitMQ nodes cannot be started here ('' if they can)."""
    for tool in ("rabbitmq-server", "rabbitmqctl"):
        if shutil.which(tool) is None:
            return f"{tool} is not available here (needed for a private node)"
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


def restart_row(ctx: Context) -> Row:
    """Recovery after a broker restart on a private node, default ``Backoff()``, vs plain kombu."""
    runs, down = ctx.sizes.restart_runs, ctx.sizes.restart_down_s
    label = (f"6. Recovery after a broker restart (private node: ``stop_app``, {down:g} s down, ``start_app``), "
             "default ``Backoff()`` (1 s -> 30 s); from the node accepting TCP connections again")
    if runs == 0:
        return Row(key="recovery", label=label,
                   measured="skipped in ``--quick`` (a private node takes 2-30 s to boot); measured in the full run")
    unavailable = private_nodes_unavailable()
    if unavailable:
        return Row(key="recovery", label=label, measured=f"not measured: {unavailable}")
    ctx.log(f"recovery: {runs} broker restart(s) on a private node, default Backoff(), carrot_kombu and kombu")
    restarts = restart_recoveries(runs, down)
    carrot = Latency.of(r["carrot_s"] for r in restarts)
    plain = Latency.of(r["kombu_s"] for r in restarts)
    return Row(
        key="recovery",
        label=label,
        measured=f"until a lease made a round trip: {carrot.text(with_max=True)}",
        comparison=("plain kombu, the same restarts: ``Producer.publish(retry=True)`` in a loop with Celery's "
                    f"retry policy and ``confirm_publish``, until a publish is confirmed: {plain.text(with_max=True)}"),
        ratio=f"median {ratio(carrot.median / plain.median)} kombu's",
        goal=f"≤ {duration(RESTART_GOAL_S)} (p95)",
        met=carrot.p95 <= RESTART_GOAL_S,
        figures={"carrot": carrot.as_dict(), "kombu": plain.as_dict(), "restarts": restarts,
                 "down_s": down, "goal_s": RESTART_GOAL_S},
    )


def restart_recoveries(runs: int, down: float) -> list[dict[str, Any]]:
    """Restart a private node ``runs`` times under a manager and a kombu publisher; when each worked again.

    Both clients live through the same restarts: the manager with the
    default ``Backoff()``, a kombu producer publishing (confirmed) every 10 ms
    with Celery's retry policy.  The clock of each restart starts when a raw
    TCP connect to the node (tried every 20 ms while ``start_app`` runs)
    first succeeds.
    """
    results = []
    with sigterm_as_interrupt(), private_nodes(1) as (node,), ExitStack() as stack:  # node always stopped
        queue = unique("ck-bench-restart")
        with kombu.Connection(node.url) as admin:
            admin.default_channel.queue_declare(queue, durable=True, auto_delete=False)
        manager, _ = stack.enter_context(started(node.url, backoff=Backoff()))
        publisher = KombuPublisher(node.url, queue)
        stack.callback(publisher.close)
        for _ in range(runs):
            until_lease_works(manager, queue, time.monotonic())
            publisher.wait_success(time.monotonic(), 30)
            failures = publisher.failures()
            stop_at = time.monotonic()
            node.stop_app()
            stopped_s = time.monotonic() - stop_at
            time.sleep(down)
            starter = Background(node.start_app)
            accepted_at = until_accepts(node.port, timeout=120, poll=0.02)
            carrot_s = until_lease_works(manager, queue, accepted_at)
            kombu_s = publisher.wait_success(accepted_at, 30) - accepted_at
            starter.join(120)
            results.append({"carrot_s": carrot_s, "kombu_s": kombu_s, "stop_app_s": stopped_s,
                            "down_s": accepted_at - stop_at,
                            "kombu_failed_publishes": publisher.failures() - failures})
    return results


def until_accepts(port: int, timeout: float, poll: float) -> float:
    """Try a TCP connect to 127.0.0.1:``port`` every ``poll`` s; the monotonic time of the first that works.

    Raises:
        TimeoutError: Nothing accepted within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=poll):
                return time.monotonic()
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on port {port} after {timeout} s") from None
            time.sleep(poll)


class KombuPublisher:
    """Plain kombu: a producer publishing (confirmed) in a loop on its own thread, as a Celery app would.

    ``Producer.publish(retry=True, retry_policy=CELERY_RETRY_POLICY)``; an
    exception that escapes (retries exhausted) is counted and the loop goes on.
    """

    def __init__(self, url: str, queue: str, pause: float = 0.01) -> None:
        self._connection = kombu.Connection(url, transport_options={"confirm_publish": True})
        self._queue = queue
        self._pause = pause
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._successes: list[float] = []
        self._failures = 0
        self._thread = threading.Thread(target=self._run, name="bench-kombu-publisher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        producer = kombu.Producer(self._connection)
        while not self._stop.is_set():
            try:
                producer.publish(b"x", exchange="", routing_key=self._queue, retry=True,
                                 retry_policy=CELERY_RETRY_POLICY, timeout=10)
            except Exception:  # retries exhausted: an application logs it and goes on
                with self._cond:
                    self._failures += 1
                continue
            with self._cond:
                self._successes.append(time.monotonic())
                self._cond.notify_all()
            self._stop.wait(self._pause)

    def wait_success(self, since: float, timeout: float) -> float:
        """The monotonic time of the first confirmed publish that returned after ``since``.

        Raises:
            TimeoutError: None within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                later = [t for t in self._successes if t > since]
                if later:
                    return later[0]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no kombu publish confirmed within {timeout} s")
                self._cond.wait(remaining)

    def failures(self) -> int:
        """Publishes whose retries ran out so far."""
        with self._cond:
            return self._failures

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._connection.collect()


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
        back_at = time.monotonic()
        for index in range(runs):
            # The connection closed is an established one: one lost within
            # SHORT_LIVED of its start makes the next attempt wait Backoff.min
            # (the anti-spin rule for brokers that kill every new connection),
            # and rabbitmqctl alone can take less than that here.
            time.sleep(max(0.0, back_at + SHORT_LIVED + 0.05 - time.monotonic()))
            closer = force_close(manager, name, f"carrot_kombu benchmark {index}")
            seen_at = time.monotonic()
            samples.append(until_lease_works(manager, queue, seen_at))
            back_at = time.monotonic()
            closer.join()
    return samples


def dead_peer_row(ctx: Context) -> list[Row]:
    """Row 8: ``blackhole()`` to the manager leaving ``CONNECTED``, per heartbeat."""
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
                label=(f"8. Dead peer: proxy ``blackhole()``, heartbeat {heartbeat} s, "
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


def force_close(manager: ConnectionManager, name: str, reason: str) -> "Background":
    """``rabbitmqctl close_connection`` of our connection ``name``; returns once the manager saw the loss.

    The closer runs on a thread (rabbitmqctl takes ~0.6 s to start): join the
    returned :class:`Background` later; its error, if any, is raised while waiting.

    Raises:
        TimeoutError: The manager still looked connected 60 s later.
    """
    closer = Background(partial(close_connection, name, reason))
    deadline = time.monotonic() + 60
    while manager.connected:
        closer.check()
        if time.monotonic() > deadline:
            raise TimeoutError("the forced close was not seen within 60 s")
        time.sleep(0.001)
    return closer


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

