"""Private RabbitMQ nodes for tests that restart, alarm, fail over or need TLS.

The shared broker on 5672 is never touched: each :class:`BrokerNode` is a
separate Erlang node with its own name, ports and data directory, started
with ``rabbitmq-server -detached`` and always stopped again (see
:func:`private_nodes`).  Recipe: ../shared/BROKER.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

RABBITMQ_USER = "rabbitmq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NodeError(RuntimeError):
    pass


class BrokerNode:
    """One private RabbitMQ node; ``url`` is its AMQP URL (and ``tls_url``)."""

    def __init__(self, *, tls: bool = False) -> None:
        self.name = f"ck{uuid.uuid4().hex[:8]}@localhost"
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
        conf = ["loopback_users = none", f"listeners.tcp.default = {self.port}"]
        if self.tls_port is not None:
            self.certs = make_certs(self.dir / "certs")
            conf += [
                f"listeners.ssl.default = {self.tls_port}",
                f"ssl_options.cacertfile = {self.certs['ca']}",
                f"ssl_options.certfile = {self.certs['cert']}",
                f"ssl_options.keyfile = {self.certs['key']}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        subprocess.run(["chown", "-R", f"{RABBITMQ_USER}:{RABBITMQ_USER}", str(self.dir)], check=True)
        env = dict(
            os.environ,
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq"),
        )
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, capture_output=True)
        self.started = True
        self._await(timeout)
        return self

    def _await(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            # await_startup fails at once until the node has registered with epmd
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
                    raise NodeError(f"node {self.name} does not listen on {self.port}")
                time.sleep(0.05)

    def ctl(self, *args: str, check: bool = True, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["rabbitmqctl", "-n", self.name, *args], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise NodeError(f"rabbitmqctl {' '.join(args)} on {self.name}: {result.stderr.strip()[-500:]}")
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
            self.ctl("stop", check=False, timeout=60)
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)


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
