"""Celery worker pools through a broker outage: ``carrot+amqp://`` next to plain ``amqp://`` (py-amqp).

For each pool (prefork, threads, solo, gevent, eventlet) and transport, one
real ``celery worker`` and one producer process (:mod:`integration.celery_apps`)
go through one outage:

* ``cut``: the fault proxy resets every connection once (the broker stays up);
* ``refuse``: the proxy resets every connection and refuses new ones for
  ``--seconds``, then accepts again;
* ``node``: a private RabbitMQ node is stopped (``stop_app``) for ``--seconds``
  and started again.

Three tasks: one sent and done before the outage, one sent *during* it (the
producer's ``.delay()`` rides Celery's publish retry policy until the broker
is back), one sent after it.  Each task appends a line to a file when it runs,
so what ran (and how often) is read from disk, not from a result backend.
Recorded per run: whether the worker reconnected (ran a task after the
outage), seconds from "broker back" to the first task done, tasks whose
``.delay()`` returned but that never ran within ``--settle`` s (lost), tasks
that ran twice.

    python -m integration.green_matrix --outage refuse --seconds 5
    python -m integration.green_matrix --outage node --pools gevent,eventlet --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from .broker import rabbitmqctl, unique
from .celery_apps import Producer, celery_worker, marks, wait_for, write_mark_app
from .nodes import BrokerNode, private_nodes
from .proxy import FaultProxy

POOLS = ("prefork", "threads", "solo", "gevent", "eventlet")
SCHEMES = ("carrot+amqp", "amqp")
OUTAGES = ("cut", "refuse", "node")
CONCURRENCY = {"prefork": 2, "threads": 4, "solo": 1, "gevent": 10, "eventlet": 10}
#: Celery's publish retry, stretched to outlast the outage (about 30 s).
RETRY_POLICY = {"max_retries": 60, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5}
BEFORE, DURING, AFTER = 1, 2, 3


@dataclass
class Outcome:
    """One pool x transport through one outage (times in seconds)."""

    pool: str
    scheme: str
    outage: str
    outage_seconds: float
    #: The worker ran a task after the outage.
    reconnected: bool = False
    #: From the broker being back to the first task (during/after) done.
    back_to_first_done: Optional[float] = None
    #: Tasks whose ``.delay()`` returned.
    sent: list[int] = field(default_factory=list)
    #: ``.delay()`` errors (the caller knows: not lost).
    send_errors: list[str] = field(default_factory=list)
    #: Sent, never ran within the settle time.
    lost: list[int] = field(default_factory=list)
    #: Ran more than once.
    duplicated: list[int] = field(default_factory=list)
    #: The worker process still ran at the end.
    worker_alive: bool = False
    #: Connections the proxy accepted (worker + producer, all attempts; proxy outages only).
    accepted: Optional[int] = None
    worker_log: str = ""

    @property
    def ok(self) -> bool:
        return self.reconnected and not self.lost and self.worker_alive and DURING in self.sent and AFTER in self.sent


class _Broker:
    """Where the processes connect, and how the outage is made."""

    def __init__(self, outage: str, stack: ExitStack, node: Optional[BrokerNode], shared_url: str) -> None:
        self.outage = outage
        self.node = node
        self.proxy: Optional[FaultProxy] = None
        if outage == "node":
            assert node is not None, "a node outage needs a private node"
            self.port = node.port
            self.userinfo = "guest:guest"
        else:
            shared = urlparse(shared_url)
            self.proxy = stack.enter_context(FaultProxy(shared.hostname or "127.0.0.1", shared.port or 5672))
            self.port = self.proxy.port
            self.userinfo = f"{shared.username or 'guest'}:{shared.password or 'guest'}"

    def url(self, scheme: str) -> str:
        return f"{scheme}://{self.userinfo}@127.0.0.1:{self.port}//"

    def down(self) -> None:
        if self.proxy is not None:
            if self.outage == "refuse":
                self.proxy.refuse()
            self.proxy.cut()
        else:
            assert self.node is not None
            self.node.stop_app()

    def unacked(self, queue: str) -> int:
        """Deliveries of ``queue`` the broker still waits an ack for (one rabbitmqctl call, ~1 s)."""
        args = ("list_queues", "name", "messages_unacknowledged", "-q", "--no-table-headers")
        out = self.node.ctl(*args).stdout if self.node is not None and self.proxy is None else rabbitmqctl(*args)
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == queue:
                return int(fields[1])
        return 0

    def up(self) -> None:
        if self.proxy is not None:
            self.proxy.heal()
        else:
            assert self.node is not None
            self.node.start_app()


def run(pool: str, scheme: str, outage: str, where: Path, *, node: Optional[BrokerNode] = None,
        shared_url: str = "amqp://guest:guest@127.0.0.1:5672//", outage_seconds: float = 5.0, settle: float = 60.0) -> Outcome:
    """One worker of ``pool`` over ``scheme`` through one ``outage``; see the module docstring."""
    outcome = Outcome(pool, scheme, outage, 0.0 if outage == "cut" else outage_seconds)
    with ExitStack() as stack:
        broker = _Broker(outage, stack, node, shared_url)
        name = unique(f"ckgreen_{pool}").replace("-", "_")
        queue = unique(f"ck-green-{pool}")
        app = write_mark_app(where / name, name, broker.url(scheme), queue,
                             task_publish_retry_policy=RETRY_POLICY)
        worker = stack.enter_context(celery_worker(app, pool, CONCURRENCY[pool]))
        producer = stack.enter_context(Producer(app))

        def fire(x: int) -> None:
            answer = producer.call("fire", count=1, start=x, pause=0, wait=120)
            outcome.sent.extend(answer["ok"])
            outcome.send_errors.extend(answer["errors"])

        fire(BEFORE)
        if not wait_for(lambda: BEFORE in marks(app), 90):
            outcome.worker_log = worker.output()
            outcome.lost = [BEFORE]
            return outcome  # never worked: nothing to learn from an outage
        # The task ran; its ack may still be on its way.  An outage before the
        # broker has it redelivers the task (at-least-once, both transports
        # alike): wait for it so that "ran twice" counts what the outage did.
        wait_for(lambda: broker.unacked(queue) == 0, 30, interval=0.2)
        down_at = time.monotonic()
        broker.down()
        during = threading.Thread(target=fire, args=(DURING,), name="during")
        during.start()
        threading.Event().wait(outcome.outage_seconds)
        broker.up()
        back_at = time.monotonic()
        fire(AFTER)
        during.join(150)
        expected = [x for x in (DURING, AFTER) if x in outcome.sent]
        wait_for(lambda: set(expected) <= set(marks(app)), settle)
        ran = marks(app)
        outcome.lost = [x for x in outcome.sent if x not in ran]
        outcome.duplicated = [x for x, runs in ran.items() if len(runs) > 1]
        after = [t for x in (DURING, AFTER) for t in ran.get(x, []) if t > down_at]
        outcome.reconnected = bool(after)
        if after:
            outcome.back_to_first_done = round(max(0.0, min(after) - back_at), 2)
        outcome.worker_alive = worker.proc.poll() is None
        if broker.proxy is not None:
            outcome.accepted = broker.proxy.accepted
        if not outcome.ok:
            outcome.worker_log = worker.output()
    if outage != "node":
        _delete(shared_url, queue)  # the shared broker keeps nothing of ours (a private node is discarded)
    return outcome


def _delete(url: str, queue: str) -> None:
    """Delete ``queue`` and Celery's exchange of the same name on the shared broker (plain py-amqp)."""
    import kombu

    with kombu.Connection(url, connect_timeout=10) as conn:
        channel = conn.channel()
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


def table(outcomes: list[Outcome]) -> str:
    """The outcomes as an RST list-table body (pool x transport)."""
    rows = ["   * - pool", "     - transport", "     - reconnects", "     - broker back -> first task done",
            "     - lost (of 3)", "     - ran twice"]
    for o in outcomes:
        back = "never" if o.back_to_first_done is None else f"{o.back_to_first_done:.1f} s"
        rows += [f"   * - {o.pool}", f"     - ``{o.scheme}://``", f"     - {'yes' if o.reconnected else 'NO'}",
                 f"     - {back}", f"     - {len(o.lost)}", f"     - {len(o.duplicated)}"]
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.green_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", choices=OUTAGES, default="refuse")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long the broker stays away")
    parser.add_argument("--pools", default=",".join(POOLS))
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--settle", type=float, default=60.0, help="how long to wait for the tasks after the outage")
    parser.add_argument("--json", type=Path, help="also write the outcomes here")
    parser.add_argument("--broker", default=os.environ.get("CARROT_KOMBU_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//"),
                        help="the shared broker behind the fault proxy (cut, refuse)")
    args = parser.parse_args(argv)
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="ck-green-") as tmp, ExitStack() as stack:
        node = stack.enter_context(private_nodes(1))[0] if args.outage == "node" else None
        for pool in args.pools.split(","):
            for scheme in args.schemes.split(","):
                started = time.monotonic()
                outcome = run(pool, scheme, args.outage, Path(tmp), node=node, shared_url=args.broker,
                              outage_seconds=args.seconds,
                              settle=args.settle)
                outcomes.append(outcome)
                summary = {k: v for k, v in asdict(outcome).items() if k != "worker_log"}
                print(json.dumps({**summary, "run_seconds": round(time.monotonic() - started, 1)}), flush=True)
                if not outcome.ok:
                    print(outcome.worker_log[-3000:], file=sys.stderr, flush=True)
    print(table(outcomes))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
