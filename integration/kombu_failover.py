"""Baseline: how long does *plain* kombu stop publishing when its node goes away?

:func:`measure_kombu_failover` publishes to a quorum queue on a private
:class:`~integration.cluster.Cluster` the way a kombu user does without
carrot_kombu: one ``kombu.Connection`` over the cluster's failover URL list
with ``confirm_publish``, ``Producer.publish(retry=True, retry_policy=...)``
in a loop from one thread.  After a warm-up the node it is connected to is
stopped (``stop_app``); the longest time between two confirmed publishes is
the figure a later benchmark compares carrot_kombu against.  Draining the
queue afterwards tells what was confirmed and yet lost.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import kombu

from .cluster import Cluster, NodeState

# Celery's default publish retry policy: what most kombu publishers run with.
FAULTS = ("stop_app", "kill9", "freeze")

CELERY_RETRY_POLICY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.2, "interval_max": 1}


@dataclass(frozen=True)
class FailoverFigures:
    """What one failover measurement saw (times in seconds)."""

    longest_gap_s: float  # longest time between two confirmed publishes (an open gap at the end counts)
    longest_gap_at_s: float  # when that gap began, relative to injecting the fault
    fault_s: float  # how long injecting it took (``rabbitmqctl stop_app`` ~1-2 s: the loss is inside)
    confirmed: int  # publishes that returned (confirmed by the broker)
    lost: int  # confirmed, but not in the queue when drained
    duplicates: int  # drained more than once (republished after an unconfirmed attempt)
    drained: int
    publish_errors: list[str] = field(default_factory=list)  # exceptions that escaped publish()
    fault: str = "stop_app"
    stopped_node: Optional[int] = None  # the node the fault hit: the one the publisher was on
    final_node: Optional[int] = None  # the node the connection ended on
    retry_policy: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def measure(cls, confirms: list[tuple[float, int]], ended: float, stop_issued: float, fault_s: float,
                bodies: list[bytes], **facts: Any) -> "FailoverFigures":
        """The figures of one run: ``confirms`` as ``(time, seq)``, ``bodies`` drained afterwards.

        ``facts`` are the remaining fields, as they are.
        """
        times = [t for t, _ in confirms]
        # an open gap at the end counts too: a publisher that never recovered has a gap until the end
        gaps = [b - a for a, b in zip(times, times[1:])] + [ended - times[-1]]  # gap k begins at times[k]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        confirmed_seqs = {seq for _, seq in confirms}
        drained_seqs = [int(body) for body in bodies]
        return cls(
            longest_gap_s=round(gaps[worst], 3),
            longest_gap_at_s=round(times[worst] - stop_issued, 3),
            fault_s=round(fault_s, 3),
            confirmed=len(confirms),
            lost=len(confirmed_seqs - set(drained_seqs)),
            duplicates=len(drained_seqs) - len(set(drained_seqs)),
            drained=len(drained_seqs),
            **facts,
        )


class _Publisher(threading.Thread):
    """Publishes sequence numbers until told to stop; records each confirm's time."""

    def __init__(self, connection: kombu.Connection, queue: str, retry_policy: dict[str, Any],
                 confirm_timeout: float) -> None:
        super().__init__(name="kombu-failover-publisher", daemon=True)
        self.connection = connection
        self.queue = queue
        self.retry_policy = retry_policy
        self.confirm_timeout = confirm_timeout
        self.stop = threading.Event()
        self.first_confirm = threading.Event()
        self.lock = threading.Lock()
        self.confirms: list[tuple[float, int]] = []  # (monotonic time, sequence number)
        self.errors: list[str] = []
        self.node_port: Optional[int] = None  # port of the node it publishes to

    def run(self) -> None:
        producer = kombu.Producer(self.connection)
        seq = 0
        while not self.stop.is_set():
            seq += 1
            try:
                producer.publish(
                    str(seq).encode(), routing_key=self.queue, exchange="", delivery_mode=2,
                    retry=True, retry_policy=self.retry_policy, timeout=self.confirm_timeout,
                )
            except Exception as exc:  # retries exhausted: a kombu user sees this and goes on
                cause = f" from {exc.__cause__!r}" if exc.__cause__ is not None else ""
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}{cause}")
                continue
            with self.lock:
                self.confirms.append((time.monotonic(), seq))
                self.node_port = _port(self.connection)
            self.first_confirm.set()

    def snapshot(self) -> tuple[list[tuple[float, int]], list[str], Optional[int]]:
        with self.lock:
            return list(self.confirms), list(self.errors), self.node_port


def _port(connection: kombu.Connection) -> Optional[int]:
    host = connection.host  # "127.0.0.1:<port>" of the URL currently in use
    try:
        return int(host.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def declare_quorum_queue(url: str, queue: str) -> None:
    """Declare a durable quorum queue through a connection to ``url`` (its leader lands there)."""
    with kombu.Connection(url, connect_timeout=10) as conn:
        conn.default_channel.queue_declare(
            queue, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"}
        )


def drain_queue(url: str, queue: str, idle: float = 0.5, delete: bool = True) -> list[bytes]:
    """Consume everything in ``queue`` (no ack) until it stays idle for ``idle`` seconds."""
    bodies: list[bytes] = []
    with kombu.Connection(url, connect_timeout=10) as conn:
        channel = conn.default_channel
        channel.basic_qos(0, 1000, False)
        channel.basic_consume(queue, no_ack=True, callback=lambda message: bodies.append(message.body))
        while True:
            try:
                conn.drain_events(timeout=idle)
            except TimeoutError:  # socket.timeout
                break
        if delete:
            channel.queue_delete(queue)
    return bodies


def measure_kombu_failover(
    cluster: Cluster,
    *,
    queue: Optional[str] = None,
    warmup: float = 1.0,
    after: float = 5.0,
    retry_policy: Optional[dict[str, Any]] = None,
    confirm_timeout: float = 10.0,
    restore: bool = True,
    fault: str = "stop_app",
) -> FailoverFigures:
    """Publish with plain kombu, ``stop_app`` the node it is connected to, measure the gap.

    Args:
        cluster: a running cluster; the quorum queue is declared through node 1
            (leader there) and the connection uses ``cluster.urls().failover``,
            so it starts on node 1 too: the stop takes both connection and leader.
        queue: queue name (default: a unique ``ck-kfail-...``); deleted at the end.
        warmup: seconds of publishing before the stop.
        after: seconds of publishing after the stop was issued.
        retry_policy: for ``Producer.publish(retry=True, retry_policy=...)``;
            default :data:`CELERY_RETRY_POLICY`.
        confirm_timeout: ``publish(timeout=...)``, the bound on one confirm wait
            (without it a confirm that never comes blocks forever).
        restore: ``start_app`` the stopped node again before returning.
        fault: ``"stop_app"`` (the baseline), or ``"kill9"`` (restored by
            ``restart``) or ``"freeze"`` (SIGSTOP for ``after`` seconds, < 45;
            always thawed): the same measurement for the other faults.
    """
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, not {fault!r}")
    if fault == "freeze" and after >= 45:
        raise ValueError("a freeze must stay well under the 60 s net tick time")
    policy = dict(CELERY_RETRY_POLICY if retry_policy is None else retry_policy)
    queue = queue or f"ck-kfail-{uuid.uuid4().hex[:10]}"
    declare_quorum_queue(cluster.url(1), queue)
    connection = kombu.Connection(cluster.urls().failover, transport_options={"confirm_publish": True})
    publisher = _Publisher(connection, queue, policy, confirm_timeout)
    stopped: Optional[int] = None
    stop_issued = ended = fault_s = 0.0
    try:
        publisher.start()
        if not publisher.first_confirm.wait(30):
            raise AssertionError(f"no publish confirmed within 30 s: {publisher.snapshot()[1][-3:]}")
        time.sleep(warmup)
        port = publisher.snapshot()[2]
        stopped = cluster.index_of_port(port) if port is not None else None
        if stopped is None:
            raise AssertionError(f"publisher connected to port {port}, not a node of {cluster!r}")
        stop_issued = time.monotonic()
        getattr(cluster, fault)(stopped)
        fault_s = time.monotonic() - stop_issued
        time.sleep(max(0.0, after - (time.monotonic() - stop_issued)))
    finally:
        ended = time.monotonic()
        if fault == "freeze" and stopped is not None and cluster.state(stopped) is NodeState.FROZEN:
            cluster.thaw(stopped)
        publisher.stop.set()
        publisher.join(confirm_timeout + 30)
        connection.collect()  # close() could wait forever for a dead peer's CloseOk
    confirms, errors, final_port = publisher.snapshot()
    try:
        survivor = next(i for i in cluster.running() if i != stopped)
        bodies = drain_queue(cluster.url(survivor), queue)
    finally:
        if restore and stopped is not None:
            if fault == "stop_app":
                cluster.start_app(stopped)
            elif fault == "kill9":
                cluster.restart(stopped)
            else:
                cluster.wait_running(stopped)

    return FailoverFigures.measure(
        confirms, ended, stop_issued, fault_s, bodies,
        publish_errors=errors,
        stopped_node=stopped,
        final_node=cluster.index_of_port(final_port) if final_port is not None else None,
        retry_policy=policy,
        fault=fault,
    )
