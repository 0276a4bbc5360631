"""A private 3-node RabbitMQ cluster for failover tests (recipe: integration/README.md).

:class:`Cluster` starts three private :class:`~integration.nodes.BrokerNode`
nodes in parallel, joins nodes 2 and 3 to node 1, and offers the faults a
failover test needs, per node: ``stop_app``/``start_app``, ``freeze``/``thaw``
(SIGSTOP/SIGCONT of the node's VM), ``kill9``/``restart``.  It also answers
where things are: quorum queue leader and members, a classic queue's home
node, the node a client connection is on.  Every RabbitMQ CLI call has a
timeout (``list_queues`` hangs while a member is frozen) and passes ``-n``:
the nodes share the Erlang cookie with the shared broker on 5672, which is
never addressed.

Nodes are numbered 1..size, as in the README and the tests.  Use it as a
context manager, or through the module-scoped :func:`cluster` fixture::

    from integration.cluster import cluster  # noqa: F401  (a pytest fixture)

    def test_something(cluster):
        failover, urls = cluster.urls()
        cluster.stop_app(1)
        ...
"""

from __future__ import annotations

import enum
import json
import shutil
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, TypeVar

import pytest

from .nodes import BrokerNode, NodeError, NodeTimeout, reap_orphaned_nodes

__all__ = ("Cluster", "ClusterUrls", "ClusterView", "NodeState", "NodeError", "NodeTimeout", "cluster")

T = TypeVar("T")

NAME_PREFIX = "ckc"  # every cluster node name starts with it: never the shared broker's ``rabbit``
MAX_FREEZE = 45.0  # auto-thaw before the Erlang net tick time (60 s) partitions the cluster
LOCAL_CONNECTION_NAMES = (  # connection_name of every AMQP connection on the node asked
    "lists:usort([N || P <- rabbit_networking:connections_local(),"
    " {client_properties, Props} <- (try rabbit_reader:info(P, [client_properties]) catch _:_ -> [] end),"
    " {<<\"connection_name\">>, longstr, N} <- Props])."
)


class NodeState(enum.Enum):
    """What the harness last did to a node (it changes only through :class:`Cluster` methods)."""

    NEW = "new"
    RUNNING = "running"
    APP_STOPPED = "app_stopped"  # the VM runs, the broker application does not
    FROZEN = "frozen"  # SIGSTOP
    KILLED = "killed"  # SIGKILL, VM gone
    STOPPED = "stopped"  # shut down by close()


class ClusterView(NamedTuple):
    """One node's ``cluster_status``, as node indices."""

    running: list[int]  # broker application running
    members: list[int]  # disk nodes: members of the cluster, running or not


class ClusterUrls(NamedTuple):
    failover: str  # "url1;url2;url3", kombu's failover syntax
    each: list[str]


def parallel(fn: Callable[[int], T], indices: Sequence[int]) -> list[T]:
    """Run ``fn(i)`` for every index in threads; wait for all, then raise the first error."""
    with ThreadPoolExecutor(max_workers=max(1, len(indices))) as pool:
        futures = [pool.submit(fn, i) for i in indices]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return [f.result() for f in futures]


class Cluster:
    """A private RabbitMQ cluster of ``size`` nodes on 127.0.0.1 (nodes numbered from 1).

    Args:
        size: number of nodes (3 for quorum queues that survive one node).
        formation: ``"join"``: boot all, then ``stop_app``/``join_cluster``/``start_app``
            on nodes 2..n; ``"discovery"``: nodes 2..n find node 1 at boot through
            classic-config peer discovery (no app restarts, ~5 s faster here); a node
            that did not cluster that way is joined as with ``"join"``.
        stop_with: ``"sigterm"`` (graceful, ~1 s for all) or ``"rabbitmqctl"``
            (``rabbitmqctl stop <pidfile>``, ~5 s: each call boots a CLI VM); both
            fall back to SIGKILL.
        boot_timeout: seconds a node may take to boot (2-30 s here).
        ctl_timeout: default timeout of each CLI call (one call costs ~0.8 s).
        max_freeze: a frozen node is thawed automatically after this long.
    """

    def __init__(self, size: int = 3, *, formation: str = "join", stop_with: str = "sigterm",
                 boot_timeout: float = 120.0, ctl_timeout: float = 20.0, max_freeze: float = MAX_FREEZE) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if formation not in ("join", "discovery"):
            raise ValueError(f"formation must be 'join' or 'discovery', not {formation!r}")
        if stop_with not in ("sigterm", "rabbitmqctl"):
            raise ValueError(f"stop_with must be 'sigterm' or 'rabbitmqctl', not {stop_with!r}")
        if not 0 < max_freeze < 60:
            raise ValueError("max_freeze must stay under the 60 s net tick time")
        token = uuid.uuid4().hex[:6]
        names = [f"{NAME_PREFIX}{token}n{i}@localhost" for i in range(1, size + 1)]
        discovery = (
            "cluster_formation.peer_discovery_backend = classic_config",
            f"cluster_formation.classic_config.nodes.1 = {names[0]}",
            "cluster_formation.discovery_retry_limit = 240",  # x 250 ms: node 1 may boot last
            "cluster_formation.discovery_retry_interval = 250",
        )
        self.nodes = [
            BrokerNode(name=name, listen_host="127.0.0.1", extra_conf=discovery if formation == "discovery" and n else ())
            for n, name in enumerate(names)
        ]
        self.formation = formation
        self.stop_with = stop_with
        self.boot_timeout = boot_timeout
        self.ctl_timeout = ctl_timeout
        self.max_freeze = max_freeze
        self.timings: dict[str, float] = {}
        self._states = {i: NodeState.NEW for i in self.indices}
        self._thaw_timers: dict[int, threading.Timer] = {}
        self._lock = threading.Lock()  # guards _states and _thaw_timers; no I/O under it

    # -- identity -------------------------------------------------------------------

    @property
    def indices(self) -> list[int]:
        return list(range(1, len(self.nodes) + 1))

    def node(self, i: int) -> BrokerNode:
        if not 1 <= i <= len(self.nodes):
            raise IndexError(f"node {i}: this cluster has nodes 1..{len(self.nodes)}")
        return self.nodes[i - 1]

    def name(self, i: int) -> str:
        return self.node(i).name

    def index_of(self, node_name: str) -> Optional[int]:
        for i, node in enumerate(self.nodes, 1):
            if node.name == node_name:
                return i
        return None

    def state(self, i: int) -> NodeState:
        with self._lock:
            return self._states[i]

    def _set_state(self, i: int, state: NodeState) -> None:
        with self._lock:
            self._states[i] = state

    def __repr__(self) -> str:
        with self._lock:
            states = dict(self._states)
        parts = ", ".join(f"{i}: {states[i].value} :{self.node(i).port}" for i in self.indices)
        return f"<Cluster {self.nodes[0].name.split('n1@')[0]} [{parts}]>"

    # -- URLs -----------------------------------------------------------------------

    def url(self, i: int) -> str:
        return self.node(i).url  # amqp://guest:guest@127.0.0.1:<port>//

    def urls(self) -> ClusterUrls:
        each = [self.url(i) for i in self.indices]
        return ClusterUrls(";".join(each), each)

    def index_of_port(self, port: int) -> Optional[int]:
        for i, node in enumerate(self.nodes, 1):
            if node.port == port:
                return i
        return None

    # -- life -----------------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def start(self) -> "Cluster":
        """Boot all nodes in parallel, join 2..n to node 1, check ``cluster_status``.

        On any failure everything started so far is torn down before the error propagates.
        """
        started = time.monotonic()
        reap_orphaned_nodes()  # VMs of an earlier run that was killed outright
        try:
            parallel(lambda i: self.node(i).launch(), self.indices)
            self.timings["launch_s"] = time.monotonic() - started
            parallel(lambda i: self.node(i)._await(self.boot_timeout), self.indices)
            self.timings["boot_s"] = time.monotonic() - started
            for i in self.indices:
                self._set_state(i, NodeState.RUNNING)
            joiners = self.indices[1:]
            if self.formation == "discovery":
                clustered = set(self.running_nodes(via=1))
                joiners = [i for i in joiners if i not in clustered]
            join_lock = threading.Lock()  # joins one at a time; stop_app/start_app overlap

            def join(i: int) -> None:
                node = self.node(i)
                node.ctl("stop_app", timeout=60)
                self._set_state(i, NodeState.APP_STOPPED)
                with join_lock:
                    node.ctl("join_cluster", self.name(1), timeout=60)
                node.start_app()
                self._set_state(i, NodeState.RUNNING)

            if joiners:
                parallel(join, joiners)
            self._await_members(self.indices, via=1, timeout=30)
        except BaseException:
            self.close()
            raise
        self.timings["start_s"] = time.monotonic() - started
        return self

    def close(self) -> None:
        """Stop every node in parallel (graceful, SIGKILL as fallback) and delete the data dirs.

        Idempotent; a frozen node is killed outright.
        """
        started = time.monotonic()
        with self._lock:
            timers, self._thaw_timers = self._thaw_timers, {}
        for timer in timers.values():
            timer.cancel()
        try:
            parallel(lambda i: self.node(i).shutdown(timeout=30, sigterm=self.stop_with == "sigterm"), self.indices)
        finally:
            for i, node in enumerate(self.nodes, 1):
                node.kill9(wait=5)  # no-op unless shutdown failed
                shutil.rmtree(node.dir, ignore_errors=True)
                self._set_state(i, NodeState.STOPPED)
        self.timings["close_s"] = time.monotonic() - started

    # -- CLI --------------------------------------------------------------------------

    def ctl(self, i: int, *args: str, timeout: Optional[float] = None) -> str:
        """``rabbitmqctl -n <node i> args``; its stdout, NodeError on failure, NodeTimeout on overrun."""
        return self.node(i).ctl(*args, timeout=timeout or self.ctl_timeout).stdout

    def queues_tool(self, i: int, *args: str, timeout: Optional[float] = None) -> str:
        """``rabbitmq-queues -n <node i> args``."""
        return self.node(i).tool("rabbitmq-queues", *args, timeout=timeout or self.ctl_timeout).stdout

    def running(self) -> list[int]:
        """Nodes whose broker application the harness last left running."""
        with self._lock:
            return [i for i, state in self._states.items() if state is NodeState.RUNNING]

    def _via(self, via: Optional[int]) -> int:
        if via is not None:
            return via
        running = self.running()
        if not running:
            raise NodeError(f"{self!r}: no running node to ask")
        return running[0]

    def cluster_status(self, via: Optional[int] = None, timeout: Optional[float] = None) -> dict[str, Any]:
        out = self.ctl(self._via(via), "cluster_status", "--formatter", "json", timeout=timeout)
        return dict(json.loads(out))

    def view(self, via: Optional[int] = None, timeout: Optional[float] = None) -> ClusterView:
        """Who runs and who belongs, as node ``via`` sees it (one ``cluster_status`` call).

        Hangs while a node is frozen (the timeout raises :class:`NodeTimeout`).
        """
        status = self.cluster_status(via, timeout)

        def indices(key: str) -> list[int]:
            return sorted(i for i in map(self.index_of, status.get(key, [])) if i is not None)

        return ClusterView(indices("running_nodes"), indices("disk_nodes"))

    def running_nodes(self, via: Optional[int] = None, timeout: Optional[float] = None) -> list[int]:
        """Indices of the nodes that node ``via`` sees running (the broker app, not just the VM)."""
        return self.view(via, timeout).running

    def disk_nodes(self, via: Optional[int] = None, timeout: Optional[float] = None) -> list[int]:
        """Indices of the cluster's members (running or not) as node ``via`` knows them."""
        return self.view(via, timeout).members

    def _await_members(self, expected: Sequence[int], via: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen: list[int] = []
        while True:
            seen = self.running_nodes(via=via)
            if set(expected) <= set(seen):
                return
            if time.monotonic() > deadline:
                raise NodeError(f"{self!r}: node {via} sees {seen} running, expected {list(expected)}")
            time.sleep(0.2)

    # -- per-node faults ----------------------------------------------------------------

    def stop_app(self, i: int) -> None:
        """Stop the broker application on node i (the VM stays; clients are disconnected)."""
        self.node(i).ctl("stop_app", timeout=60)
        self._set_state(i, NodeState.APP_STOPPED)

    def start_app(self, i: int) -> None:
        """Start it again; returns when node i accepts AMQP connections."""
        self.node(i).start_app()
        self._set_state(i, NodeState.RUNNING)

    def freeze(self, i: int) -> None:
        """SIGSTOP node i's VM: it neither answers nor closes its sockets.

        It is thawed automatically after ``max_freeze`` seconds (< 60 s net tick time).
        """
        timer = threading.Timer(self.max_freeze, self._auto_thaw, args=(i,))
        timer.daemon = True
        self.node(i).freeze()
        with self._lock:
            self._states[i] = NodeState.FROZEN
            old, self._thaw_timers[i] = self._thaw_timers.get(i), timer
        if old is not None:
            old.cancel()
        timer.start()

    def thaw(self, i: int) -> None:
        with self._lock:
            timer = self._thaw_timers.pop(i, None)
        if timer is not None:
            timer.cancel()
        self.node(i).thaw()
        self._set_state(i, NodeState.RUNNING)

    def _auto_thaw(self, i: int) -> None:
        with self._lock:
            timer = self._thaw_timers.pop(i, None)
        if timer is not None:  # not thawed (or killed) meanwhile
            try:
                self.node(i).thaw()
            except NodeError:
                return
            self._set_state(i, NodeState.RUNNING)

    @contextmanager
    def frozen(self, i: int) -> Iterator[None]:
        """``with cluster.frozen(3): ...`` freezes node 3 and always thaws it."""
        self.freeze(i)
        try:
            yield
        finally:
            if self.state(i) is NodeState.FROZEN:
                self.thaw(i)

    def kill9(self, i: int) -> None:
        """SIGKILL node i's VM; returns when it is gone and unregistered from epmd."""
        with self._lock:
            timer = self._thaw_timers.pop(i, None)
        if timer is not None:
            timer.cancel()
        pid = self.node(i).kill9()
        if pid is None:
            raise NodeError(f"node {i} ({self.name(i)}) had no VM to kill")
        self._set_state(i, NodeState.KILLED)

    def restart(self, i: int, timeout: Optional[float] = None) -> None:
        """kill -9 node i if its VM still runs, boot it on the same data dir, wait until it rejoined."""
        node = self.node(i)
        if node.vm_pid() is not None:
            self.kill9(i)
        node.launch()
        self._set_state(i, NodeState.NEW)
        self.wait_running(i, timeout)

    def wait_running(self, i: int, timeout: Optional[float] = None) -> None:
        """Wait until node i's broker app runs and another running node sees it in the cluster."""
        timeout = timeout or self.boot_timeout
        deadline = time.monotonic() + timeout
        self.node(i)._await(timeout)
        self._set_state(i, NodeState.RUNNING)
        others = [j for j in self.running() if j != i]
        self._await_members([i], via=others[0] if others else i, timeout=max(1.0, deadline - time.monotonic()))

    def heal(self) -> None:
        """Bring every node back to RUNNING, whatever a test did to it (thaw, start_app, restart).

        Costs nothing when the harness left all nodes running.
        """
        healed = False
        for i in self.indices:
            state = self.state(i)
            if state is NodeState.RUNNING:
                continue
            healed = True
            if state is NodeState.FROZEN:
                self.thaw(i)
            elif state is NodeState.APP_STOPPED:
                self.start_app(i)
            else:
                self.restart(i)
        if healed:
            self._await_members(self.indices, via=1, timeout=60)

    # -- where things are ---------------------------------------------------------------

    def list_queues(self, *columns: str, via: Optional[int] = None, timeout: Optional[float] = None,
                    local: bool = False) -> list[dict[str, Any]]:
        """``list_queues name <columns>`` as dicts. Hangs while a member is frozen: the timeout
        (default ``ctl_timeout``) then raises :class:`NodeTimeout`."""
        args = ["list_queues", "--formatter", "json", "name", *columns]
        if local:
            args.append("--local")
        return list(json.loads(self.ctl(self._via(via), *args, timeout=timeout) or "[]"))

    def _queue(self, queue: str, *columns: str, **kwargs: Any) -> dict[str, Any]:
        for row in self.list_queues(*columns, **kwargs):
            if row.get("name") == queue:
                return row
        raise NodeError(f"queue {queue!r} not found")

    def locate_queue(self, queue: str, *columns: str, timeout: Optional[float] = None
                     ) -> tuple[Optional[int], dict[str, Any]]:
        """The node that hosts ``queue`` (a quorum queue's leader, a classic queue's home) and
        its ``list_queues`` row with ``columns``; ``(None, {})`` if no running node hosts it.

        Asks ``list_queues --local`` of each running node in turn: unlike the
        cluster-wide listing it answers while another member is frozen.
        """
        for i in self.running():
            try:
                rows = self.list_queues(*columns, via=i, timeout=timeout, local=True)
            except NodeError:
                continue
            for row in rows:
                if row.get("name") == queue:
                    return i, row
        return None, {}

    def quorum_leader(self, queue: str, timeout: Optional[float] = None) -> Optional[int]:
        """Index of the node that leads quorum queue ``queue`` as the queue record says
        (what channels route to); None while that node is not running.

        While the recorded leader is frozen the record keeps naming it, even after
        Ra elected another leader (see :meth:`raft_leader`), and publishes to the
        queue wait, from every node, until it thaws.
        """
        _, row = self.locate_queue(queue, "leader", timeout=timeout)
        leader = row.get("leader")
        return self.index_of(leader) if isinstance(leader, str) else None

    def raft_leader(self, queue: str, via: Optional[int] = None, timeout: Optional[float] = None) -> Optional[int]:
        """Index of the quorum queue's leader as Ra's member on node ``via`` knows it (vhost ``/``)."""
        if "'" in queue or "\\" in queue:
            raise ValueError(f"queue name {queue!r} cannot be quoted as an Erlang atom here")
        server = f"'%2F_{queue}'"  # rabbit_quorum_queue's internal name for vhost "/"
        out = self.ctl(self._via(via), "eval",
                       f"case ra:members({{{server}, node()}}, 5000) of {{ok, _, {{_, L}}}} -> L; E -> E end.",
                       timeout=timeout)
        return self.index_of(out.strip().strip("'"))

    def quorum_members(self, queue: str, timeout: Optional[float] = None) -> list[int]:
        """Indices of the quorum queue's members (from its leader's node; [] if no running node leads it)."""
        _, row = self.locate_queue(queue, "members", timeout=timeout)
        members = row.get("members") or []
        return sorted(i for i in map(self.index_of, members) if i is not None)

    def quorum_online(self, queue: str, timeout: Optional[float] = None) -> list[int]:
        """Indices of the quorum queue's members that run (``list_queues online``, from its leader's node)."""
        _, row = self.locate_queue(queue, "online", timeout=timeout)
        online = row.get("online") or []
        return sorted(i for i in map(self.index_of, online) if i is not None)

    def wait_quorum_online(self, queue: str, members: Sequence[int], timeout: float = 30) -> None:
        """Wait until every node in ``members`` runs its member of quorum queue ``queue``.

        ``start_app`` returns once the node accepts AMQP connections, which may
        be before its queue members rejoined: stopping a second node of three
        then leaves a quorum queue without a majority, and it stops serving.
        """
        deadline = time.monotonic() + timeout
        while True:
            online = self.quorum_online(queue)
            if set(members) <= set(online):
                return
            if time.monotonic() > deadline:
                raise NodeError(f"{self!r}: quorum queue {queue!r} has {online} online, expected {list(members)}")
            time.sleep(0.2)

    def home_node(self, queue: str, timeout: Optional[float] = None) -> Optional[int]:
        """Index of the node that hosts classic queue ``queue`` (for a quorum queue: its leader)."""
        return self.locate_queue(queue, timeout=timeout)[0]

    def connection_node(self, connection_name: str, timeout: Optional[float] = None) -> Optional[int]:
        """Index of the node holding the client connection whose ``client_properties`` carry
        this ``connection_name``; None if no running node holds one.

        ``list_connections`` is cluster-wide and hangs while any node is frozen, so
        each running node is asked for its *local* connections instead (``eval`` of
        ``rabbit_networking:connections_local/0``; read-only).
        """
        needle = f'<<"{connection_name}">>'
        for i in self.running():
            try:
                out = self.ctl(i, "eval", LOCAL_CONNECTION_NAMES, timeout=timeout)
            except NodeError:
                continue
            if needle in out:
                return i
        return None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active, SIGTERM (a CI timeout) raises KeyboardInterrupt, so pytest stops the
    session and the finalisers stop the nodes; Python's default would die at once,
    skipping finalisers and atexit alike.  Only where nobody else handles SIGTERM."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """One private 3-node cluster per test module, always torn down (also on failure,
    Ctrl-C and SIGTERM; atexit and :func:`~integration.nodes.reap_orphaned_nodes` catch the rest)."""
    with sigterm_as_interrupt(), Cluster() as c:
        yield c
