"""Row 7: failover on a private 3-node cluster, carrot_kombu vs plain kombu.

One thread publishes confirmed, persistent messages to a quorum queue in a
loop; after a second of that, the node it is connected to gets
``rabbitmqctl stop_app``; publishing goes on for 5 s from the stop.  The
figure is the longest time between two confirmed publishes (an open gap at
the end counts).  carrot_kombu publishes with ``manager.publish`` over the
cluster's three URLs; plain kombu is :func:`integration.kombu_failover.measure_kombu_failover`
(``Producer.publish(retry=True)`` with Celery's retry policy over kombu's
failover URL list, ``confirm_publish``).  Both start on node 1.  The quorum
queue is declared through node 2, so its leader is *not* on the stopped node:
the gap is the client's failover, not a Raft election.  The two clients run
in alternating rounds on the same cluster; each round uses a fresh queue,
drained (lost and duplicated messages counted) and deleted after.

The cluster takes ~15-30 s to start, so the row runs only in the full run.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from carrot_kombu import ConnectionManager
from integration.broker import unique
from integration.cluster import Cluster, sigterm_as_interrupt
from integration.kombu_failover import FailoverFigures, declare_quorum_queue, drain_queue, measure_kombu_failover

from .faults import private_nodes_unavailable
from .model import Context, Row
from .stats import duration, ratio
from .timing import alternate

#: The goal for carrot_kombu's longest publishing gap, seconds.
GOAL_S = 0.5
#: Seconds of publishing before the stop, and after it was issued.
WARMUP_S = 1.0
AFTER_S = 5.0
#: Bound on one confirm wait (as kombu's ``publish(timeout=...)`` in the baseline).
CONFIRM_TIMEOUT = 10.0
#: The node the quorum queue is declared through (its leader).
LEADER_NODE = 2
LABEL = ("7. Failover: ``stop_app`` of the connected node (of 3) while one thread publishes confirmed "
         f"messages to a quorum queue (leader on node {LEADER_NODE}, not the stopped node); "
         "longest publishing gap")


def failover_row(ctx: Context) -> list[Row]:
    """Row 7: longest gap between confirmed publishes when the connected node stops."""
    runs = ctx.sizes.failover_runs
    if runs == 0:
        return [Row(key="failover", label=LABEL,
                    measured="skipped in ``--quick`` (a private 3-node cluster takes ~30 s to start); "
                             "measured in the full run")]
    unavailable = private_nodes_unavailable()
    if unavailable:
        return [Row(key="failover", label=LABEL, measured=f"not measured: {unavailable}")]
    ctx.log("failover: starting a private 3-node cluster")
    with sigterm_as_interrupt(), Cluster(formation="discovery") as cluster:  # always stopped, also on SIGTERM
        ctx.log(f"failover: cluster up in {cluster.timings.get('start_s', 0):.0f} s; {runs} stop_app per client")
        results = alternate(runs, {
            "carrot": partial(one_run, cluster, measure_carrot_failover),
            "kombu": partial(one_run, cluster, kombu_run),
        })
    return [failover_figures_row(results)]


@dataclass(frozen=True)
class FailoverRun:
    """One stop: what the client saw, and where the queue's leader was.

    Attributes:
        figures: The client's gap, confirmed/lost/duplicated counts...
        leader: The quorum queue's leader before the stop (node index).
    """

    figures: FailoverFigures
    leader: Optional[int]
    events: dict[str, list[float]]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (at most 5 publish errors)."""
        errors = self.figures.publish_errors
        return {**self.figures.as_dict(), "publish_errors": errors[:5], "publish_error_count": len(errors),
                "leader_node": self.leader, "events_s_from_stop": self.events}


Measure = Callable[[Cluster, str], tuple[FailoverFigures, dict[str, list[float]]]]


def one_run(cluster: Cluster, measure: Measure) -> FailoverRun:
    """One stop of the connected node, with a fresh quorum queue declared through :data:`LEADER_NODE`."""
    cluster.heal()
    queue = unique("ck-bench-failover")
    declare_quorum_queue(cluster.url(LEADER_NODE), queue)
    leader = cluster.quorum_leader(queue)
    figures, events = measure(cluster, queue)
    return FailoverRun(figures, leader, events)


def kombu_run(cluster: Cluster, queue: str) -> tuple[FailoverFigures, dict[str, list[float]]]:
    """Plain kombu's baseline on ``queue`` (already declared: its leader stays where it is)."""
    return measure_kombu_failover(cluster, queue=queue, warmup=WARMUP_S, after=AFTER_S,
                                  confirm_timeout=CONFIRM_TIMEOUT), {}


class _Publisher(threading.Thread):
    """``manager.publish`` of sequence numbers until told to stop; records each confirm's time."""

    def __init__(self, manager: ConnectionManager, queue: str) -> None:
        super().__init__(name="bench-failover-publisher", daemon=True)
        self.manager = manager
        self.queue = queue
        self.stop = threading.Event()
        self.first_confirm = threading.Event()
        self.lock = threading.Lock()
        self.confirms: list[tuple[float, int]] = []
        self.errors: list[str] = []

    def run(self) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                self.manager.publish(str(seq).encode(), routing_key=self.queue, timeout=CONFIRM_TIMEOUT)
            except Exception as exc:  # an application would log it and go on
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with self.lock:
                self.confirms.append((time.monotonic(), seq))
            self.first_confirm.set()

    def snapshot(self) -> tuple[list[tuple[float, int]], list[str]]:
        with self.lock:
            return list(self.confirms), list(self.errors)


def connected_port(manager: ConnectionManager) -> Optional[int]:
    """The port of the broker the manager is connected to (None if it is not)."""
    status = manager.status()
    if not manager.connected or not status.broker:
        return None
    return urlparse(status.broker).port


def measure_carrot_failover(cluster: Cluster, queue: str) -> tuple[FailoverFigures, dict[str, list[float]]]:
    """carrot_kombu's side of the measurement: as :func:`measure_kombu_failover`, with ``manager.publish``.

    Returns:
        The figures, and when the manager reported ``disconnected`` and
        ``connected`` (monotonic; seconds from the stop in the end).
    """
    manager = ConnectionManager(cluster.urls().each, client_properties={"connection_name": unique("ck-bench-failover")})
    events: dict[str, list[float]] = {"disconnected": [], "connected": []}
    for name, seen in events.items():
        manager.on(name, lambda *_, seen=seen: seen.append(time.monotonic()))
    manager.start()
    publisher = _Publisher(manager, queue)
    stopped: Optional[int] = None
    stop_issued = ended = fault_s = 0.0
    final_port: Optional[int] = None
    try:
        if not manager.wait_connected(30):
            raise RuntimeError(f"manager did not connect: {manager.status().last_error}")
        publisher.start()
        if not publisher.first_confirm.wait(30):
            raise RuntimeError(f"no publish confirmed within 30 s: {publisher.snapshot()[1][-3:]}")
        time.sleep(WARMUP_S)
        port = connected_port(manager)
        stopped = cluster.index_of_port(port) if port is not None else None
        if stopped is None:
            raise RuntimeError(f"manager connected to port {port}, not a node of {cluster!r}")
        stop_issued = time.monotonic()
        cluster.stop_app(stopped)
        fault_s = time.monotonic() - stop_issued
        time.sleep(max(0.0, AFTER_S - (time.monotonic() - stop_issued)))
    finally:
        ended = time.monotonic()
        publisher.stop.set()
        publisher.join(CONFIRM_TIMEOUT + 30)
        final_port = connected_port(manager)
        manager.stop(timeout=10)
    confirms, errors = publisher.snapshot()
    try:
        survivor = next(i for i in cluster.running() if i != stopped)
        bodies = drain_queue(cluster.url(survivor), queue)
    finally:
        if stopped is not None:
            cluster.start_app(stopped)
    figures = FailoverFigures.measure(
        confirms, ended, stop_issued, fault_s, bodies,
        publish_errors=errors,
        stopped_node=stopped,
        final_node=cluster.index_of_port(final_port) if final_port is not None else None,
    )
    return figures, {name: [round(t - stop_issued, 3) for t in seen] for name, seen in events.items()}


def failover_figures_row(runs: dict[str, list[FailoverRun]]) -> Row:
    """The row: the worst gap of each client over its runs."""
    results = {k: [run.figures for run in v] for k, v in runs.items()}
    gaps = {k: [r.longest_gap_s for r in results[k]] for k in results}
    worst = {k: max(v) for k, v in gaps.items()}
    share = worst["carrot"] / worst["kombu"] if worst["kombu"] > 0 else None

    def text(key: str) -> str:
        runs = results[key]
        lost, dup = sum(r.lost for r in runs), sum(r.duplicates for r in runs)
        errors = sum(len(r.publish_errors) for r in runs)
        at = max(runs, key=lambda r: r.longest_gap_s).longest_gap_at_s
        return (f"longest gap {duration(worst[key])}, starting {at:+.2f} s from the stop "
                f"(runs: {', '.join(duration(g) for g in gaps[key])}; "
                f"median {duration(statistics.median(gaps[key]))}); {sum(r.confirmed for r in runs):,} confirmed, "
                f"{lost} lost, {dup} duplicated, {errors} publish error(s)")

    misplaced = sum(1 for v in runs.values() for run in v if run.leader == run.figures.stopped_node)
    caveat = (f"; in {misplaced} run(s) the queue's leader was on the stopped node after all"
              if misplaced else "")
    return Row(
        key="failover",
        label=LABEL,
        measured=f"``manager.publish``: {text('carrot')}{caveat}",
        comparison=(f"plain kombu ``Producer.publish(retry=True)``, Celery's retry policy, ``confirm_publish``, "
                    f"failover URL list: {text('kombu')}"),
        ratio=f"{ratio(share)} kombu's longest gap" if share is not None else "—",
        goal=f"≤ {duration(GOAL_S)} (longest gap over {len(gaps['carrot'])} runs)",
        met=worst["carrot"] <= GOAL_S,
        figures={"runs": {k: [run.as_dict() for run in v] for k, v in runs.items()}, "worst_gap_s": worst,
                 "ratio": share, "declared_through_node": LEADER_NODE},
    )
