"""Row 9: RSS and threads of an idle started manager, and after many reconnects.

Each measurement runs in a fresh child process (``python -m
benchmarks.memory``) so that what the other rows allocated does not count;
the child prints its figures as JSON.  The manager's child also runs the
fault proxy it cuts (one accept thread, one pump thread per connection),
created before the baseline is taken.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

from carrot_kombu import Backoff
from integration.broker import unique

from .clients import QUEUE_EXPIRES_MS, RECOVERABLE, raw_connection, started, until_lease_works
from .faults import proxy_for
from .model import Context, Row

ROOT = Path(__file__).resolve().parent.parent
#: Threads a manager runs, by name prefix.
OWN_THREADS = "carrot-kombu"


def snapshot() -> dict[str, Any]:
    """This process now: RSS (MB), threads (all, and carrot_kombu's), open fds."""
    gc.collect()
    rss_kb = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    # "carrot-kombu-reader-127.0.0.1:5672" -> "reader"
    own = sorted(t.name[len(OWN_THREADS) + 1:].split("-")[0] for t in threading.enumerate()
                 if t.name.startswith(OWN_THREADS))
    return {
        "rss_mb": round(rss_kb / 1024, 1),
        "threads": threading.active_count(),
        "own_threads": own,
        "fds": len(os.listdir("/proc/self/fd")),
    }


def measure_raw(url: str) -> dict[str, Any]:
    """A raw py-amqp connection with one channel, idle for a second."""
    before = snapshot()
    conn = raw_connection(url)
    conn.channel()
    time.sleep(1.0)
    idle = snapshot()
    conn.close()
    return {"before": before, "idle": idle}


def measure_manager(url: str, cuts: int) -> dict[str, Any]:
    """A started manager (one pooled channel) idle for a second, then ``cuts`` proxy cuts."""
    queue = unique("ck-bench-q")
    with proxy_for(url) as proxy:
        before = snapshot()
        with started(proxy.url(), backoff=Backoff(min=0.01, max=0.2, jitter=False), pool_limit=4) as (manager, _):
            with manager.channel() as lease:
                lease.queue_declare(queue, arguments={"x-expires": QUEUE_EXPIRES_MS})
            try:
                time.sleep(1.0)
                idle = snapshot()
                warm: dict[str, Any] = idle
                for index in range(cuts):
                    if index == cuts // 10:
                        proxy.settle()
                        warm = snapshot()
                    cut_at = time.monotonic()
                    if proxy.cut() != 1:
                        raise RuntimeError("expected exactly one connection through the proxy")
                    until_lease_works(manager, queue, cut_at)
                proxy.settle()
                time.sleep(0.5)
                after = snapshot()
                reconnects = manager.status().reconnects
            finally:
                try:
                    with manager.channel() as lease:
                        lease.queue_delete(queue)
                except RECOVERABLE:
                    pass  # x-expires removes it later
    return {"before": before, "idle": idle, "warm": warm, "warm_cuts": cuts // 10, "after": after, "cuts": cuts,
            "reconnects": reconnects}


def child(kind: str, url: str, cuts: int = 0, timeout: float = 600) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its figures.

    Raises:
        RuntimeError: The child failed (its stderr is in the message).
    """
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", kind, url, "--cuts", str(cuts)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child {kind!r} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def memory_row(ctx: Context) -> list[Row]:
    """Row 9: idle manager vs idle raw connection, and the manager after many reconnects."""
    cuts = ctx.sizes.memory_cuts
    raw = child("raw", ctx.url)
    ctx.log(f"memory: manager child, {cuts} proxy cuts")
    mgr = child("manager", ctx.url, cuts)
    raw_delta = raw["idle"]["rss_mb"] - raw["before"]["rss_mb"]
    idle_delta = mgr["idle"]["rss_mb"] - mgr["before"]["rss_mb"]
    growth = mgr["after"]["rss_mb"] - mgr["idle"]["rss_mb"]
    warm_cuts = mgr["warm_cuts"]
    steady = mgr["after"]["rss_mb"] - mgr["warm"]["rss_mb"]
    own_idle, own_after = mgr["idle"]["own_threads"], mgr["after"]["own_threads"]
    return [
        Row(
            key="memory",
            label="9. Memory: an idle started manager (connected, one pooled channel)",
            measured=(f"RSS +{idle_delta:.1f} MB ({mgr['idle']['rss_mb']} MB process); "
                      f"{len(own_idle)} threads of its own ({', '.join(own_idle)})"),
            comparison=(f"raw py-amqp connection + channel: RSS +{raw_delta:.1f} MB "
                        f"({raw['idle']['rss_mb']} MB process); "
                        f"{raw['idle']['threads'] - raw['before']['threads']} threads of its own"),
            ratio=f"{idle_delta - raw_delta:+.1f} MB, +{len(own_idle)} threads vs raw",
            goal="— (informational)",
            figures={"manager": mgr, "raw": raw},
        ),
        Row(
            key="memory",
            label=f"9. Memory after {cuts:,} proxy-cut reconnects (``Backoff(min=0.01)``)",
            measured=(f"RSS {mgr['after']['rss_mb']} MB ({growth:+.1f} MB vs idle); "
                      f"{len(own_after)} threads of its own (idle: {len(own_idle)}); "
                      f"{mgr['after']['fds']} fds (idle: {mgr['idle']['fds']}); "
                      f"{mgr['reconnects']} reconnects"),
            comparison=f"the same manager after its first {warm_cuts} reconnects: {mgr['warm']['rss_mb']} MB",
            ratio=f"{steady:+.1f} MB from reconnect {warm_cuts:,} to {cuts:,}",
            goal="— (informational)",
        ),
    ]


def main(argv: Optional[list[str]] = None) -> int:
    """Child entry point: print one measurement as JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("kind", choices=("raw", "manager"))
    parser.add_argument("url")
    parser.add_argument("--cuts", type=int, default=0)
    args = parser.parse_args(argv)
    figures = measure_raw(args.url) if args.kind == "raw" else measure_manager(args.url, args.cuts)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
