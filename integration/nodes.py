"""Private RabbitMQ nodes for tests that restart, alarm, fail over or need TLS.

The shared broker on 5672 is never touched: each :class:`BrokerNode` is a
separate Erlang node with its own name, ports and data directory, started
with ``rabbitmq-server -detached`` and always stopped again (see
:func:`private_nodes`).  Recipe: ../shared/BROKER.md.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

RABBITMQ_USER = "rabbitmq"
RABBITMQ_HOME = "/var/lib/rabbitmq"  # holds the Erlang cookie every node and CLI call shares
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts behind /usr/sbin's su wrapper
OWNER_ENV = "CARROT_KOMBU_NODE_OWNER"  # in each private node's VM environment: pid of the test process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeError(RuntimeError):
    pass


class NodeTimeout(NodeError):
    """A RabbitMQ CLI call overran its timeout; its whole process group was killed."""


def run_tool(tool: str, *args: str, timeout: float, env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Run a RabbitMQ CLI script (``rabbitmqctl``, ``rabbitmq-queues``, ``rabbitmq-server``...).

    As root it runs the script behind ``/usr/sbin``'s wrapper directly as the
    ``rabbitmq`` user, in a new session: the wrapper goes through ``su -c``,
    which starts its own session, so killing the wrapper on a timeout would leave
    the CLI's Erlang VM hanging (``list_queues`` waits forever for a frozen
    member).  Here a timeout kills the whole process group and raises
    :class:`NodeTimeout`.  ``env`` replaces the ``RABBITMQ_*`` part of the
    environment (none is inherited).
    """
    script = RABBITMQ_BIN / tool
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
    run_env.update(env or {})
    extra: dict[str, Any] = {}
    if os.geteuid() == 0 and script.exists():
        command = [str(script), *args]
        extra = dict(user=RABBITMQ_USER, group=RABBITMQ_USER, extra_groups=[], cwd=RABBITMQ_HOME)
        run_env["HOME"] = RABBITMQ_HOME
    else:
        command = [tool, *args]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=run_env, start_new_session=True, **extra,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        proc.communicate()
        raise NodeTimeout(f"{tool} {' '.join(args)}: no answer within {timeout}s") from None
    except BaseException:  # KeyboardInterrupt: leave no CLI VM behind
        _kill_group(proc.pid)
        proc.wait()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _vm_environ(pid: int) -> dict[str, str]:
    """Environment of the Erlang VM ``pid`` (empty if it is no beam.smp or gone)."""
    try:
        if not os.readlink(f"/proc/{pid}/exe").endswith("beam.smp"):
            return {}
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (entry.decode(errors="replace").split("=", 1) for entry in environ.split(b"\0") if b"=" in entry)
    return {key: value for key, value in pairs}


def _vm_nodename(pid: int) -> Optional[str]:
    """``RABBITMQ_NODENAME`` of the Erlang VM ``pid`` (None if it is no beam.smp or gone)."""
    return _vm_environ(pid).get("RABBITMQ_NODENAME")


def reap_orphaned_nodes() -> list[str]:
    """SIGKILL private-node VMs whose test process died without stopping them (kill -9, OOM).

    Only VMs started by :class:`BrokerNode` carry ``CARROT_KOMBU_NODE_OWNER``;
    one is reaped only when that process no longer exists, so nodes of test runs
    still going (other engineers', other sessions') are left alone, and so is
    the shared broker.  Returns the reaped node names.
    """
    reaped = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        env = _vm_environ(int(entry))
        owner = env.get(OWNER_ENV, "")
        if not owner.isdigit() or not env.get("RABBITMQ_NODENAME") or _alive(int(owner)):
            continue
        try:
            os.kill(int(entry), signal.SIGKILL)
        except ProcessLookupError:
            continue
        reaped.append(env["RABBITMQ_NODENAME"])
        base = Path(env.get("RABBITMQ_PID_FILE", "/nonexistent")).parent
        if base.name.startswith("ck-node-") and base.parent == Path(tempfile.gettempdir()):
            shutil.rmtree(base, ignore_errors=True)
    return reaped


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


# Nodes whose VM may still run: killed at interpreter exit if a finaliser never ran.
_LIVE: "set[BrokerNode]" = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _kill_leftover_nodes() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for node in leftovers:
        node.kill9(wait=5)
        shutil.rmtree(node.dir, ignore_errors=True)


class BrokerNode:
    """One private RabbitMQ node; ``url`` is its AMQP URL (and ``tls_url``)."""

    def __init__(self, *, tls: bool = False, name: Optional[str] = None, listen_host: Optional[str] = None,
                 extra_conf: tuple[str, ...] = ()) -> None:
        self.name = name or f"ck{uuid.uuid4().hex[:8]}@localhost"
        self.listen_host = listen_host  # None: listen on all interfaces
        self.extra_conf = list(extra_conf)  # more rabbitmq.conf lines, written by every launch()
        self.port = free_port()
        self.dist_port = free_port()
        self.tls_port = free_port() if tls else None
        self.dir = Path(tempfile.mkdtemp(prefix="ck-node-"))
        self.certs: Optional[dict[str, Path]] = None
        self.started = False

    # -- URLs -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def tls_url(self) -> str:
        assert self.tls_port is not None
        return f"amqps://guest:guest@localhost:{self.tls_port}//"

    # -- life -------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "BrokerNode":
        self.launch()
        self._await(timeout)
        return self

    @property
    def env(self) -> dict[str, str]:
        """The ``RABBITMQ_*`` environment that makes ``rabbitmq-server`` this node."""
        return dict(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
            **{OWNER_ENV: str(os.getpid())},  # lets reap_orphaned_nodes() find it if we die
        )

    def launch(self) -> None:
        """Write the config and run ``rabbitmq-server -detached``; do not wait for the boot.

        Also relaunches a node that was killed, on the same data dir (its VM
        must be gone: ``-detached`` for a running node fails and deletes that
        node's pid file).
        """
        listener = f"{self.listen_host}:{self.port}" if self.listen_host else str(self.port)
        conf = ["loopback_users = none", f"listeners.tcp.default = {listener}"]
        if self.tls_port is not None:
            if self.certs is None:
                self.certs = make_certs(self.dir / "certs")
            conf += [
                f"listeners.ssl.default = {self.tls_port}",
                f"ssl_options.cacertfile = {self.certs['ca']}",
                f"ssl_options.certfile = {self.certs['cert']}",
                f"ssl_options.keyfile = {self.certs['key']}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        conf += self.extra_conf
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        subprocess.run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", str(self.dir)], check=True)
        with _LIVE_LOCK:
            _LIVE.add(self)
        self.started = True
        result = run_tool("rabbitmq-server", "-detached", timeout=60, env=self.env)
        if result.returncode != 0:
            raise NodeError(f"rabbitmq-server -detached for {self.name}: {(result.stderr or result.stdout).strip()[-500:]}")

    def _await(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        short_name = self.name.split("@")[0]
        next_vm_check, vm_missing = time.monotonic() + 1, 0
        while time.monotonic() < deadline:
            if not self.started:  # shut down meanwhile (e.g. by a finaliser after Ctrl-C)
                raise NodeError(f"node {self.name} was stopped while waiting for it to start")
            # await_startup fails at once until the node has registered with epmd, and
            # each try boots a CLI VM (~1 s of CPU taken from the booting nodes): ask
            # epmd itself first, which costs nothing
            names = epmd_names()
            if names and short_name not in names:
                if time.monotonic() > next_vm_check:  # a VM that died at boot never registers
                    next_vm_check = time.monotonic() + 1
                    vm_missing = vm_missing + 1 if self.vm_pid() is None else 0
                    if vm_missing >= 10:
                        log = self.log_text()[-1500:] or (
                            "nothing logged (a config error is printed to the VM's stdout, which "
                            "-detached discards: run rabbitmq-server with node.env in the foreground)")
                        raise NodeError(f"node {self.name} died while booting: {log}")
                time.sleep(0.1)
                continue
            result = self.ctl("await_startup", "--timeout", str(int(max(1, deadline - time.monotonic()))), check=False)
            if result.returncode == 0:
                self.wait_port(deadline - time.monotonic())
                return
            last = result.stderr.strip()[-500:]
            time.sleep(0.5)
        raise NodeError(f"node {self.name} did not start within {timeout}s: {last}")

    def wait_port(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise NodeError(f"node {self.name} does not listen on {self.port}") from None
                time.sleep(0.05)

    def ctl(self, *args: str, check: bool = True, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return self.tool("rabbitmqctl", *args, check=check, timeout=timeout)

    def tool(self, tool: str, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """``<tool> -n <this node> args`` (``rabbitmqctl``, ``rabbitmq-queues``...), see :func:`run_tool`."""
        result = run_tool(tool, "-n", self.name, *args, timeout=timeout)
        if check and result.returncode != 0:
            raise NodeError(f"{tool} {' '.join(args)} on {self.name}: {(result.stderr or result.stdout).strip()[-500:]}")
        return result

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_port()

    def alarm(self, on: bool = True) -> None:
        """Memory alarm on/off: the broker blocks publishing connections."""
        self.ctl("set_vm_memory_high_watermark", "0.000001" if on else "0.4")

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in (self.dir / "log").glob("*.log"))

    def stop(self) -> None:
        if self.started:
            self.shutdown(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the node's Erlang VM ---------------------------------------------------------

    def vm_pid(self) -> Optional[int]:
        """OS pid of this node's ``beam.smp``, or None when it does not run.

        The pid file names it, confirmed by ``RABBITMQ_NODENAME`` in
        ``/proc/PID/environ`` (beam.smp's command line names neither node nor
        dirs, and a stale pid file may name a recycled pid).  Without a usable
        pid file, e.g. deleted by a failed ``-detached``, /proc is searched.
        """
        try:
            pid = int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid and _vm_nodename(pid) == self.name and _alive(pid):
            return pid
        for entry in os.listdir("/proc"):
            if entry.isdigit() and _vm_nodename(int(entry)) == self.name and _alive(int(entry)):
                return int(entry)
        return None

    def signal_vm(self, sig: int) -> int:
        pid = self.vm_pid()
        if pid is None:
            raise NodeError(f"node {self.name}: no running VM to signal")
        os.kill(pid, sig)
        return pid

    def freeze(self) -> None:
        """SIGSTOP the VM: the node stays registered and its sockets open, but answers nothing.

        Thaw within the Erlang net tick time (60 s) or the cluster partitions.
        """
        self.signal_vm(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal_vm(signal.SIGCONT)

    def is_frozen(self) -> bool:
        pid = self.vm_pid()
        if pid is None:
            return False
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
        except (OSError, IndexError):
            return False

    def kill9(self, wait: float = 15.0) -> Optional[int]:
        """SIGKILL the VM (if it runs) and wait until it is gone and epmd forgot the name."""
        pid = self.vm_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and (
            (pid is not None and _alive(pid)) or self.name.split("@")[0] in epmd_names()
        ):
            time.sleep(0.05)
        return pid

    def shutdown(self, timeout: float = 30.0, *, sigterm: bool = False) -> None:
        """Stop the node and its VM, keeping the data dir; never leaves the VM running.

        ``rabbitmqctl stop <pidfile>`` (waits for the VM to exit), or with
        ``sigterm`` a SIGTERM to the VM, which RabbitMQ also takes as a graceful
        stop and which saves the CLI's own VM (~1 s of CPU per call).  Falls back
        to SIGKILL when that fails or overruns; a frozen VM is killed at once.
        """
        pid = self.vm_pid()
        if pid is not None and self.is_frozen():
            self.kill9()
        elif pid is not None and sigterm:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.kill9()
        elif pid is not None:
            try:
                self.ctl("stop", str(self.dir / "pid"), check=False, timeout=timeout)
            except NodeTimeout:
                pass
            self.kill9()
        self.started = False
        with _LIVE_LOCK:
            _LIVE.discard(self)


def epmd_names(host: str = "127.0.0.1", port: int = 4369) -> set[str]:
    """Short node names registered with the local epmd (``rabbit`` is the shared broker).

    Speaks epmd's NAMES_REQ directly (``epmd -names`` without a process); empty
    when epmd does not answer.
    """
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(b"\x00\x01n")  # length 1, NAMES_REQ
            chunks = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError:
        return set()
    text = b"".join(chunks)[4:].decode(errors="replace")  # after epmd's own port
    return {line.split()[1] for line in text.splitlines() if line.startswith("name ")}


def make_certs(where: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 (openssl CLI)."""
    where.mkdir(parents=True, exist_ok=True)
    ca_key, ca = where / "ca.key", where / "ca.pem"
    key, csr, cert = where / "server.key", where / "server.csr", where / "server.pem"
    ext = where / "ext.cnf"
    ext.write_text("subjectAltName = DNS:localhost,IP:127.0.0.1\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=carrot_kombu test CA",
        "-keyout", str(ca_key), "-out", str(ca))
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert))
    for p in where.iterdir():
        p.chmod(0o644)
    return {"ca": ca, "cert": cert, "key": key}


@contextmanager
def private_nodes(count: int = 1, *, tls: bool = False) -> Iterator[list[BrokerNode]]:
    """Start ``count`` private nodes; they are stopped at the end, also on failure."""
    nodes = [BrokerNode(tls=tls) for _ in range(count)]
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
