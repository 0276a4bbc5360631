"""The private 3-node cluster harness (integration/cluster.py) on the real machine.

One cluster for the module (~26-33 s up, ~2 s down); every test leaves all three
nodes running (the ``healthy`` fixture heals whatever a failing test left).
"""

from __future__ import annotations

import socket
import time
from typing import Iterator

import kombu
import pytest

from .broker import unique
from .cluster import Cluster, NodeState, NodeTimeout, cluster  # noqa: F401  (cluster: module fixture)
from .figures import record
from .kombu_failover import declare_quorum_queue, measure_kombu_failover

# The harness is exercised by test_cluster.py in every run; proving each of its
# faults on its own costs a second cluster boot: `pytest -m slow` runs it.
pytestmark = pytest.mark.slow


@pytest.fixture
def healthy(cluster: Cluster) -> Iterator[Cluster]:  # noqa: F811
    yield cluster
    cluster.heal()


def named_connection(url: str, name: str) -> kombu.Connection:
    conn = kombu.Connection(url, connect_timeout=5, transport_options={
        "confirm_publish": True, "client_properties": {"connection_name": name}})
    conn.connect()
    return conn


def publish_and_get(conn: kombu.Connection, queue: str) -> bytes:
    body = unique("body").encode()
    kombu.Producer(conn).publish(body, routing_key=queue, exchange="", timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        message = conn.default_channel.basic_get(queue, no_ack=True)
        if message is not None:
            return bytes(message.body)
        time.sleep(0.02)
    raise AssertionError(f"{body!r} did not come back from {queue}")


def delete_queues(url: str, *queues: str) -> None:
    with kombu.Connection(url, connect_timeout=5) as conn:
        for queue in queues:
            conn.default_channel.queue_delete(queue)


def test_cluster_forms_with_three_running_nodes(cluster: Cluster) -> None:  # noqa: F811
    assert cluster.view(via=3) == ([1, 2, 3], [1, 2, 3])  # (running, members)
    assert [cluster.state(i) for i in cluster.indices] == [NodeState.RUNNING] * 3
    assert "1: running" in repr(cluster) and "3: running" in repr(cluster)
    failover, each = cluster.urls()
    assert each == [f"amqp://guest:guest@127.0.0.1:{cluster.node(i).port}//" for i in (1, 2, 3)]
    assert failover == ";".join(each) and cluster.url(2) == each[1]
    assert len({cluster.node(i).port for i in (1, 2, 3)} | {5672}) == 4
    assert all(cluster.name(i).startswith("ckc") for i in (1, 2, 3))
    for url in each:
        with kombu.Connection(url, connect_timeout=5) as conn:
            conn.connect()
    print(f"\ncluster timings: {cluster.timings}")


def test_quorum_queue_declared_on_node1_has_three_members_and_leads_there(healthy: Cluster) -> None:
    quorum, classic, name = unique("ck-qq"), unique("ck-cq"), unique("ck-conn")
    conn = named_connection(healthy.url(1), name)
    try:
        conn.default_channel.queue_declare(quorum, durable=True, auto_delete=False,
                                           arguments={"x-queue-type": "quorum"})
        assert healthy.quorum_members(quorum) == [1, 2, 3]
        assert healthy.quorum_leader(quorum) == 1 == healthy.raft_leader(quorum, via=3)
        assert healthy.connection_node(name) == 1
        assert publish_and_get(conn, quorum)
    finally:
        conn.collect()
    with kombu.Connection(healthy.url(2), connect_timeout=5) as other:
        other.default_channel.queue_declare(classic, durable=True, auto_delete=False)
    assert healthy.home_node(classic) == 2
    delete_queues(healthy.url(3), quorum, classic)


def test_freeze_and_thaw_a_node(healthy: Cluster) -> None:
    quorum, name = unique("ck-qq"), unique("ck-conn")
    declare_quorum_queue(healthy.url(1), quorum)
    conn = named_connection(healthy.url(2), name)
    try:
        frozen_at = time.monotonic()
        with healthy.frozen(3):
            assert healthy.state(3) is NodeState.FROZEN and healthy.node(3).is_frozen()
            # a client of another node goes on working: 2 of 3 members confirm
            assert publish_and_get(conn, quorum)
            # the cluster-wide listing hangs while a member is frozen; the timeout ends it
            started = time.monotonic()
            with pytest.raises(NodeTimeout):
                healthy.list_queues("leader", via=1, timeout=3)
            assert time.monotonic() - started < 3 + 2
            # the per-node (local) questions still answer
            assert healthy.quorum_leader(quorum, timeout=10) == 1
            assert healthy.connection_node(name, timeout=10) == 2
            # a frozen node accepts TCP (the kernel does) but answers nothing
            with socket.create_connection(("127.0.0.1", healthy.node(3).port), timeout=2) as sock:
                sock.settimeout(0.5)
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                with pytest.raises(socket.timeout):
                    sock.recv(1)
        assert time.monotonic() - frozen_at < 60, "frozen past the net tick time"
        assert healthy.state(3) is NodeState.RUNNING and not healthy.node(3).is_frozen()
        healthy.wait_running(3, timeout=30)
        assert quorum in {row["name"] for row in healthy.list_queues(via=1, timeout=10)}
        assert publish_and_get(conn, quorum)
    finally:
        conn.collect()
    delete_queues(healthy.url(1), quorum)


def test_kill9_and_restart_rejoins(healthy: Cluster) -> None:
    quorum = unique("ck-qq")
    declare_quorum_queue(healthy.url(1), quorum)
    old_pid = healthy.node(3).vm_pid()
    assert old_pid is not None
    healthy.kill9(3)
    assert healthy.node(3).vm_pid() is None and healthy.state(3) is NodeState.KILLED
    assert healthy.view(via=1) == ([1, 2], [1, 2, 3])  # node 3 is still a member, just down
    with kombu.Connection(healthy.url(1), connect_timeout=5) as conn:
        assert publish_and_get(conn, quorum)  # 2 of 3 members
    started = time.monotonic()
    healthy.restart(3)
    restart_s = time.monotonic() - started
    new_pid = healthy.node(3).vm_pid()
    assert new_pid is not None and new_pid != old_pid
    assert healthy.state(3) is NodeState.RUNNING
    assert healthy.view(via=3) == ([1, 2, 3], [1, 2, 3])
    assert healthy.quorum_members(quorum) == [1, 2, 3]
    with kombu.Connection(healthy.url(3), connect_timeout=5) as conn:
        assert publish_and_get(conn, quorum)
    delete_queues(healthy.url(3), quorum)
    print(f"\nkill -9 + restart of node 3: {restart_s:.1f} s until rejoined and running")


def test_stop_app_and_start_app(healthy: Cluster) -> None:
    vm = healthy.node(2).vm_pid()
    healthy.stop_app(2)
    assert healthy.state(2) is NodeState.APP_STOPPED
    assert healthy.node(2).vm_pid() == vm  # the VM stays
    assert healthy.running_nodes(via=1) == [1, 3]
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", healthy.node(2).port), timeout=2).close()
    healthy.start_app(2)
    assert healthy.running_nodes(via=2) == [1, 2, 3]
    with kombu.Connection(healthy.url(2), connect_timeout=5) as conn:
        conn.connect()


def test_plain_kombu_failover_baseline(healthy: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    figures = measure_kombu_failover(healthy, warmup=1.0, after=4.0)
    with capsys.disabled():
        print(f"\nplain kombu failover (stop_app of the connected node): {figures}")
    record("kombu_failover_baseline", **figures.as_dict())
    assert figures.stopped_node == 1  # the first URL, where the leader is too
    assert figures.final_node in (2, 3)
    assert figures.confirmed > 0 and figures.drained >= figures.confirmed - figures.lost
    # the longest gap is the failover: it begins while stop_app runs
    assert -0.5 < figures.longest_gap_at_s < figures.fault_s + 0.5
    assert healthy.state(1) is NodeState.RUNNING
