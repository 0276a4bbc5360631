"""Row 12: many consumers on one manager (``manager.consume`` at scale).

For each N, a fresh child process (``python -m benchmarks.consumers N URL``)
starts a manager, subscribes N consumers of N queues of its own (unique
prefix, ``x-expires``, deleted at the end), and measures:

* subscribe: the N ``consume()`` calls (each declares its queue);
* threads added and RSS per consumer, once all N got a message;
* back after a forced close: ``rabbitmqctl close_connection`` on the
  manager's own, uniquely named connection; one message per queue is
  published (by a separate raw connection) as soon as the manager sees the
  loss; the time from the loss to the last of the N deliveries;
* cancel all: N ``cancel()`` calls.

The child prints its figures as JSON; the shared broker is never touched
beyond our own queues and connection.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import amqp
import kombu

from carrot_kombu import Backoff
from integration.broker import unique

from .clients import QUEUE_EXPIRES_MS, raw_connection, started
from .faults import force_close
from .memory import snapshot
from .model import Context, Row

ROOT = Path(__file__).resolve().parent.parent
#: Issue 20's acceptance goals.
THREADS_GOAL = 40
RSS_GOAL_KIB = 50
BACK_GOALS_S = {1000: 1.5, 10000: 5.0}
CANCEL_GOAL_S = 20.0


class Tally:
    """Which queues got a message of the current round, and when the last one did."""

    def __init__(self, queues: list[str]) -> None:
        self.lock = threading.Condition()
        self.round = 0
        self.got: set[str] = set()
        self.total = len(queues)
        self.last = 0.0

    def callback(self, queue: str) -> Any:
        def on_message(body: Any, message: Any) -> None:
            message.ack()
            with self.lock:
                if body == self.round and queue not in self.got:
                    self.got.add(queue)
                    self.last = time.monotonic()
                    if len(self.got) == self.total:
                        self.lock.notify_all()
        return on_message

    def start(self, n: int) -> None:
        with self.lock:
            self.round, self.got = n, set()

    def wait(self, timeout: float) -> float:
        """The monotonic time of the last delivery of the round."""
        with self.lock:
            if not self.lock.wait_for(lambda: len(self.got) == self.total, timeout):
                raise TimeoutError(f"round {self.round}: {self.total - len(self.got)} of {self.total} consumers "
                                   f"got nothing within {timeout:g} s")
            return self.last


def measure(url: str, n: int) -> dict[str, Any]:
    prefix = unique("ck-bench-cons")
    queues = [f"{prefix}-{i}" for i in range(n)]
    admin_conn = raw_connection(url)
    admin = admin_conn.channel()
    tally = Tally(queues)

    def publish_round(number: int) -> None:
        body = json.dumps(number)
        for queue in queues:
            admin.basic_publish(amqp.Message(body, content_type="application/json"), "", queue)

    try:
        with started(url, backoff=Backoff(min=0.05, max=1.0)) as (manager, name):
            time.sleep(0.2)
            before = snapshot()
            started_at = time.monotonic()
            consumers = [
                manager.consume(kombu.Queue(q, durable=False, queue_arguments={"x-expires": QUEUE_EXPIRES_MS}),
                                tally.callback(q), prefetch_count=10)
                for q in queues
            ]
            subscribe_s = time.monotonic() - started_at
            tally.start(1)
            publish_round(1)
            tally.wait(60)
            loaded = snapshot()
            # A forced close of our own connection; the loss is when the manager sees it.
            closer = force_close(manager, name, "carrot_kombu consumers benchmark")
            lost_at = time.monotonic()
            tally.start(2)
            publish_round(2)
            last = tally.wait(120)
            closer.join()
            back_s = last - lost_at
            time.sleep(0.5)
            after = snapshot()
            started_at = time.monotonic()
            for consumer in consumers:
                consumer.cancel()
            cancel_s = time.monotonic() - started_at
    finally:
        for queue in queues:
            try:
                admin.queue_delete(queue)
            except Exception:  # noqa: BLE001 - x-expires removes it later
                admin = admin_conn.channel()
        admin_conn.close()
    return {
        "n": n, "subscribe_s": round(subscribe_s, 3), "back_s": round(back_s, 3), "cancel_s": round(cancel_s, 3),
        "threads_added": loaded["threads"] - before["threads"],
        "threads_added_after_recovery": after["threads"] - before["threads"],
        "rss_kib_per_consumer": round((loaded["rss_mb"] - before["rss_mb"]) * 1024 / n, 1),
        "before": before, "loaded": loaded, "after": after,
    }


def child(url: str, n: int, timeout: float = 900) -> dict[str, Any]:
    """Run one size in a fresh interpreter.

    Raises:
        RuntimeError: The child failed (its stderr is in the message).
    """
    result = subprocess.run([sys.executable, "-m", "benchmarks.consumers", str(n), url],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"consumers child N={n} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def consumers_row(ctx: Context) -> list[Row]:
    """Row 12: one row per size."""
    rows = []
    for n in ctx.sizes.consumer_counts:
        ctx.log(f"consumers: N={n:,} (child process)")
        f = child(ctx.url, n)
        back_goal = BACK_GOALS_S.get(n)
        met = (f["threads_added"] <= THREADS_GOAL and f["rss_kib_per_consumer"] <= RSS_GOAL_KIB
               and f["cancel_s"] <= CANCEL_GOAL_S and (back_goal is None or f["back_s"] <= back_goal))
        goal = (f"threads ≤ {THREADS_GOAL}, RSS ≤ {RSS_GOAL_KIB} KiB/consumer, cancel all ≤ {CANCEL_GOAL_S:g} s"
                + (f", all deliver again ≤ {back_goal:g} s after the loss" if back_goal else ""))
        rows.append(Row(
            key="consumers",
            label=f"12. {n:,} consumers on one manager (``consume()``, ``prefetch_count=10``)",
            measured=(f"subscribe {f['subscribe_s']:.2f} s; +{f['threads_added']} threads; "
                      f"{f['rss_kib_per_consumer']:.1f} KiB/consumer; all deliver again "
                      f"{f['back_s']:.2f} s after a forced close; cancel all {f['cancel_s']:.2f} s"),
            comparison="before issue 20: a thread and a channel per consumer (3,000 failed at channel_max 2,047)",
            ratio="—",
            goal=goal,
            met=met,
            figures=f,
        ))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    """Child entry point: print one measurement as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consumers")
    parser.add_argument("n", type=int)
    parser.add_argument("url")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.url, args.n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
