"""Issue 13 on a real private 3-node cluster: fast failover, per-queue degradation.

One cluster for the module (``integration.cluster``).  The manager gets every
node's URL.  Publishers are confirmed ``manager.publish`` threads; gaps are
measured between confirms.  Each test leaves the cluster healed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any, Iterator, Optional

import kombu
import pytest

from carrot_kombu import Backoff, ConnectionManager, Unroutable

from .cluster import Cluster, cluster  # noqa: F401  (the module-scoped fixture)
from .figures import record
from .kombu_failover import measure_kombu_failover


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def healed(cluster: Cluster) -> Iterator[Cluster]:  # noqa: F811
    cluster.heal()
    yield cluster
    cluster.heal()


class Load:
    """``threads`` confirmed publishers; each confirm's time, each id, every escaped error."""

    def __init__(self, manager: ConnectionManager, queue: str, threads: int = 3) -> None:
        self.manager = manager
        self.queue = queue
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.confirms: list[float] = []
        self.confirmed: list[str] = []
        self.spans: dict[str, tuple[float, float]] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(40)

    def _run(self, n: int) -> None:
        seq = 0
        while not self.stop.is_set():
            seq += 1
            mid = f"{n}-{seq}"
            started = time.monotonic()
            try:
                self.manager.publish({"id": mid}, routing_key=self.queue, message_id=mid, timeout=30)
            except Exception as exc:
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue
            done = time.monotonic()
            with self.lock:
                self.confirms.append(done)
                self.confirmed.append(mid)
                self.spans[mid] = (started, done)

    def wait_confirms(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.confirms) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.confirms) >= n, f"only {len(self.confirms)} confirms ({self.errors[-3:]})"

    def longest_gap(self, since: float) -> float:
        with self.lock:
            times = sorted([since] + [t for t in self.confirms if t >= since])
        times.append(time.monotonic())
        return max(b - a for a, b in zip(times, times[1:]))


def _drain(url: str, queue: str, expected: int, timeout: float = 30) -> list[str]:
    """Every message id in the queue (a plain kombu consumer on a healthy node)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    with kombu.Connection(url) as conn:
        channel = conn.channel()
        while time.monotonic() < deadline:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                if len(got) >= expected:
                    break
                time.sleep(0.1)
                continue
            got.append(message.properties.get("message_id"))
        channel.close()
    return got


def _manager(cluster: Cluster, *, first: int = 1, **options: Any) -> ConnectionManager:  # noqa: F811
    order = [first] + [i for i in cluster.indices if i != first]
    options.setdefault("client_properties", {"connection_name": unique("ck-cluster")})
    return ConnectionManager([cluster.url(i) for i in order], **options).start(wait=15)


def _quorum(cluster: Cluster, queue: str, leader: int) -> kombu.Queue:  # noqa: F811
    """Declare a quorum queue with its leader on node ``leader`` (declared through that node)."""
    q = kombu.Queue(queue, durable=True, auto_delete=False, queue_arguments={"x-queue-type": "quorum"})
    with kombu.Connection(cluster.url(leader)) as conn:
        q(conn.channel()).declare()
    return q


def _node_of(manager: ConnectionManager, cluster: Cluster) -> Optional[int]:  # noqa: F811
    broker = manager.status().broker or ""
    for i in cluster.indices:
        if f":{cluster.node(i).port}/" in broker:
            return i
    return None


@pytest.mark.parametrize("leader_is_connected_node", [True, False], ids=["leader", "follower"])
def test_stopping_the_connected_node_keeps_publishing_with_a_short_gap(healed: Cluster,
                                                                       leader_is_connected_node: bool) -> None:
    cluster = healed
    queue = unique("ck-cq")
    q = _quorum(cluster, queue, leader=1 if leader_is_connected_node else 2)
    manager = _manager(cluster, first=1)
    received: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def on_message(body: Any, message: Any) -> None:
        with lock:
            received.append((body["id"], bool(message.delivery_info.get("redelivered"))))
        message.ack()

    try:
        manager.declare(q)
        consumer = manager.consume(q, on_message, prefetch_count=50)
        with Load(manager, queue) as load:
            load.wait_confirms(100)
            assert _node_of(manager, cluster) == 1
            fault_at = time.monotonic()
            cluster.stop_app(1)
            load.wait_confirms(len(load.confirms) + 200, timeout=30)
            gap = load.longest_gap(fault_at - 0.5)
            fault_end = time.monotonic()
        consumer.cancel()
        confirmed = list(load.confirmed)
        cluster.start_app(1)
        left = _drain(cluster.url(2), queue, 0)
        seen = Counter(mid for mid, _ in received) + Counter(left)
        lost = [mid for mid in confirmed if mid not in seen]
        redelivered = {mid for mid, again in received if again}
        in_flight = {mid for mid, (start, done) in load.spans.items() if start <= fault_end and done >= fault_at}
        unexplained = [mid for mid, n in seen.items() if n > 1 and mid not in redelivered | in_flight]
        record(f"cluster_stop_{'leader' if leader_is_connected_node else 'follower'}",
               longest_gap_s=round(gap, 3), confirmed=len(confirmed), lost=len(lost),
               duplicates=sum(n - 1 for n in seen.values() if n > 1), errors=len(load.errors))
        assert not lost, f"{len(lost)} confirmed messages lost"
        assert not unexplained, f"duplicates neither redelivered nor republished: {unexplained[:5]}"
        assert gap <= 0.5, f"publishing stopped for {gap:.2f}s"
        assert _node_of(manager, cluster) != 1
    finally:
        manager.stop(timeout=5)
        with kombu.Connection(cluster.url(2)) as conn:
            conn.channel().queue_delete(queue)


def test_a_frozen_node_is_left_for_a_healthy_one(healed: Cluster) -> None:
    cluster = healed
    queue = unique("ck-cq")
    q = _quorum(cluster, queue, leader=2)  # a frozen leader would stall the queue cluster-wide
    manager = _manager(cluster, first=1, heartbeat=2)
    try:
        manager.declare(q)
        with Load(manager, queue, threads=1) as load:
            load.wait_confirms(20)
            fault_at = time.monotonic()
            with cluster.frozen(1):
                load.wait_confirms(len(load.confirms) + 20, timeout=20)
                resumed = max(load.confirms) - fault_at
                gap = load.longest_gap(fault_at)
        record("cluster_freeze", heartbeat_s=2, resumed_after_s=round(resumed, 2), longest_gap_s=round(gap, 2),
               bound_s=2 * 2 + 2)
        assert gap <= 2 * 2 + 2, f"publishing stopped for {gap:.1f}s with a frozen node"
        assert _node_of(manager, cluster) in (2, 3)
    finally:
        manager.stop(timeout=5)
        with kombu.Connection(cluster.url(2)) as conn:
            conn.channel().queue_delete(queue)


def test_kill_9_of_the_connected_node(healed: Cluster) -> None:
    cluster = healed
    queue = unique("ck-cq")
    q = _quorum(cluster, queue, leader=2)
    manager = _manager(cluster, first=1)
    try:
        manager.declare(q)
        with Load(manager, queue) as load:
            load.wait_confirms(50)
            fault_at = time.monotonic()
            cluster.kill9(1)
            load.wait_confirms(len(load.confirms) + 100, timeout=30)
            gap = load.longest_gap(fault_at)
        confirmed = list(load.confirmed)
        cluster.restart(1)
        left = Counter(_drain(cluster.url(2), queue, len(confirmed)))
        lost = [mid for mid in confirmed if mid not in left]
        record("cluster_kill9", longest_gap_s=round(gap, 3), confirmed=len(confirmed), lost=len(lost))
        assert not lost
        assert gap <= 0.5, f"publishing stopped for {gap:.2f}s after kill -9"
    finally:
        manager.stop(timeout=5)
        with kombu.Connection(cluster.url(2)) as conn:
            conn.channel().queue_delete(queue)


def test_a_classic_queue_whose_node_is_down_degrades_only_that_queue(healed: Cluster) -> None:
    cluster = healed
    classic = kombu.Queue(unique("ck-classic"), durable=True, auto_delete=False)
    quorum = unique("ck-cq")
    q = _quorum(cluster, quorum, leader=1)
    # The classic queue lives on node 3 (declared through it).
    with kombu.Connection(cluster.url(3)) as conn:
        classic(conn.channel()).declare()
    manager = _manager(cluster, first=1, backoff=Backoff())
    got = threading.Event()
    events: list[tuple[str, tuple[Any, ...]]] = []
    for name in ("degraded", "recovered", "consumer_cancelled", "disconnected"):
        manager.on(name, lambda *args, name=name: events.append((name, args)))
    try:
        manager.declare(q, classic)
        consumer = manager.consume(classic, lambda body, message: (message.ack(), got.set()))
        cluster.stop_app(3)
        deadline = time.monotonic() + 15
        while not manager.status().degraded and time.monotonic() < deadline:
            time.sleep(0.05)
        status = manager.status()
        assert status.state.value == "CONNECTED" and status.degraded, status
        # everything else still works
        manager.publish({"n": 1}, routing_key=quorum, timeout=10)
        with manager.channel() as lease:
            lease.queue_declare(quorum, passive=True)
        # the broker would confirm and drop it; mandatory says so
        with pytest.raises(Unroutable):
            manager.publish({"n": 2}, routing_key=classic.name, mandatory=True, timeout=10)
        # a reconnect while the node is down does not fail on the classic queue
        cluster.start_app(3)
        back = time.monotonic()
        while manager.status().degraded and time.monotonic() < back + 10:
            time.sleep(0.05)
        resumed = time.monotonic() - back
        manager.publish({"n": 3}, routing_key=classic.name, timeout=10)
        assert got.wait(10), "the consumer of the classic queue did not come back"
        record("cluster_classic_queue_node_down", consumer_resumed_after_s=round(resumed, 2))
        assert resumed <= 2.0, f"degraded for {resumed:.1f}s after the node returned"
        assert [n for n, _ in events].count("consumer_cancelled") <= 1
        assert "disconnected" not in [n for n, _ in events]
        consumer.cancel()
    finally:
        manager.stop(timeout=5)
        with kombu.Connection(cluster.url(1)) as conn:
            channel = conn.channel()
            channel.queue_delete(quorum)
            channel.queue_delete(classic.name)


def test_plain_kombu_failover_baseline(healed: Cluster) -> None:
    """The same fault for plain kombu (retry=True, confirm_publish), recorded for the comparison."""
    figures = measure_kombu_failover(healed)
    record("cluster_kombu_baseline", **figures.as_dict())
    assert figures.lost == 0
