"""Tasks a solo Celery worker runs twice when its connection is cut: ``carrot+amqp://`` next to ``amqp://``.

Issue 17, red-team finding F1.  One real ``celery worker -P solo -c 1`` (no
mingle, no gossip, ``confirm_publish`` on, as in the finding) reaches the
shared broker through the fault proxy; this process sends ``-n`` short tasks
directly (py-amqp), at ``--rate`` per second or all at once, and resets the
worker's connections ``--cuts`` times, each after a random number (3-25) of
further tasks ran plus a random 0..``--jitter`` s (default: one task period).  Each task appends
its number to a file when it runs (``O_APPEND``), so runs are counted on disk.
Printed per run: tasks run twice (``twice``), split into those that were
running at a cut (their ack, written by Celery after the task under
``-P solo``, is lost on any transport) and those that were not (deliveries
that waited in the worker: ``twice_not_running``), extra runs, and how many
runs were redeliveries.

    python -m integration.cut_duplicates --scheme carrot+amqp --rate 10 --runs 3
    python -m integration.cut_duplicates --scheme amqp --rate 10 --runs 3 --acks-late
    python -m integration.cut_duplicates --scheme carrot+amqp --rate 0 --sleep 0.05   # a backlog

Only the test's own queue and connections are touched (the proxy cuts only
what goes through it); the worker is always terminated.
"""

from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from .celery_apps import AppModule, celery_worker, wait_for
from .proxy import FaultProxy

APP = """\
import os
import time

from celery import Celery

app = Celery({name!r})
app.conf.update({config!r})
LOG = {log!r}


@app.task(name="record", bind=True, shared=False)
def record(self, x, sleep):
    redelivered = int(bool((self.request.delivery_info or {{}}).get("redelivered")))
    began = time.monotonic()
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, ("S %d %d %.6f\\n" % (x, redelivered, began)).encode())
        time.sleep(sleep)
        os.write(fd, ("E %d %d %.6f\\n" % (x, redelivered, time.monotonic())).encode())
    finally:
        os.close(fd)
"""
#: How long after a task ended a cut still counts as falling while it ran
#: (Celery writes the ack on its event loop's next turn, at once).
ACK_SLACK = 0.0


def one_run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    rnd = random.Random(seed)
    where = Path(tempfile.mkdtemp(prefix="ck-cut-dup-"))
    name = "ckdup_" + uuid.uuid4().hex[:8]
    queue = "ck-cut-dup-" + uuid.uuid4().hex[:8]
    log = where / "ran.log"
    with FaultProxy("127.0.0.1", args.port) as proxy:
        options: dict[str, Any] = {"confirm_publish": True} if args.confirm else {}
        config = dict(broker_url=f"{args.scheme}://guest:guest@{proxy.url_hostport}//", task_default_queue=queue,
                      broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
                      task_ignore_result=True, task_acks_late=args.acks_late,
                      worker_prefetch_multiplier=args.prefetch, broker_transport_options=options)
        (where / f"{name}.py").write_text(APP.format(name=name, config=config, log=str(log)))
        app = AppModule(where, name, queue)
        sys.path.insert(0, str(where))
        module = importlib.import_module(name)
        module.app.conf.broker_url = f"pyamqp://guest:guest@127.0.0.1:{args.port}//"  # this process: direct
        module.app.conf.broker_transport_options = {}

        def lines() -> list[list[str]]:
            try:
                return [line.split() for line in log.read_text().splitlines() if line]
            except OSError:
                return []

        def runs() -> list[tuple[int, int]]:
            return [(int(x), int(r)) for kind, x, r, _ in lines() if kind == "S"]

        def produce() -> None:
            for x in range(args.n):
                module.record.delay(x, args.sleep)
                if args.rate:
                    time.sleep(1 / args.rate)

        cuts = 0
        cut_at: list[float] = []
        period = args.jitter if args.jitter is not None else max(args.sleep, 1 / args.rate if args.rate else 0.0)
        try:
            with celery_worker(app, "solo", 1) as worker:
                producer = threading.Thread(target=produce, daemon=True)
                producer.start()
                if not wait_for(lambda: len(runs()) >= 3, 60):
                    raise RuntimeError("the worker ran nothing: " + worker.output())
                for _ in range(args.cuts):
                    want = len(runs()) + rnd.randint(3, 25)
                    if not wait_for(lambda: len(runs()) >= want, 60):
                        break
                    time.sleep(rnd.uniform(0, period))
                    cut_at.append(time.monotonic())
                    cuts += proxy.cut() > 0
                done = wait_for(lambda: len({x for x, _ in runs()}) >= args.n, 180)
                # Redeliveries of tasks that already ran come a little later: wait until quiet.
                seen = len(runs())
                while wait_for(lambda: len(runs()) > seen, 3):
                    seen = len(runs())
                producer.join(5)
        finally:
            module.app.close()
            sys.modules.pop(name, None)
            sys.path.remove(str(where))
            import kombu

            with kombu.Connection(f"pyamqp://guest:guest@127.0.0.1:{args.port}//") as conn:
                conn.default_channel.queue_delete(queue)
    ran = runs()
    counts = Counter(x for x, _ in ran)
    twice = {x for x, c in counts.items() if c > 1}
    # The first run of each task: [start, end]; a task whose end is missing ran until the cut ended it.
    spans: dict[int, list[float]] = {}
    for kind, x, _, at in lines():
        if kind == "S" and int(x) not in spans:
            spans[int(x)] = [float(at), float("inf")]
        elif kind == "E" and spans.get(int(x), [0, 0])[1] == float("inf"):
            spans[int(x)][1] = float(at)
    running = {x for at in cut_at for x, (start, end) in spans.items() if start <= at <= end + ACK_SLACK}
    return dict(scheme=args.scheme, acks_late=args.acks_late, rate=args.rate, seed=seed, tasks=args.n,
                cuts=cuts, all_ran=bool(done), runs=len(ran), twice=len(twice),
                running_at_a_cut=len(running), twice_running=len(twice & running),
                twice_not_running=len(twice - running), extra_runs=len(ran) - len(counts),
                redelivered_runs=sum(r for _, r in ran))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scheme", default="carrot+amqp", help="carrot+amqp, amqp or pyamqp")
    parser.add_argument("-n", type=int, default=300, help="tasks per run")
    parser.add_argument("--cuts", type=int, default=8, help="connection cuts per run")
    parser.add_argument("--rate", type=float, default=10.0, help="tasks sent per second (0: all at once)")
    parser.add_argument("--sleep", type=float, default=0.02, help="seconds each task works")
    parser.add_argument("--jitter", type=float, default=None,
                        help="each cut waits a random 0..JITTER s after its task count (default: one task period)")
    parser.add_argument("--prefetch", type=int, default=4, help="worker_prefetch_multiplier (-c 1)")
    parser.add_argument("--acks-late", action="store_true")
    parser.add_argument("--no-confirm", dest="confirm", action="store_false")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11, help="first run's seed (then +1 per run)")
    parser.add_argument("--port", type=int, default=5672, help="the broker's AMQP port on 127.0.0.1")
    args = parser.parse_args(argv)
    totals: Counter[str] = Counter()
    for run in range(args.runs):
        result = one_run(args, args.seed + run)
        totals.update({k: result[k] for k in ("twice", "running_at_a_cut", "twice_running", "twice_not_running")})
        print(json.dumps(result), flush=True)
    print(f"TOTAL {args.scheme} acks_late={args.acks_late} rate={args.rate} jitter={args.jitter}: "
          f"{args.runs} runs x {args.cuts} cuts: {totals['twice']} tasks run twice, of which "
          f"{totals['twice_running']} were running at a cut (of {totals['running_at_a_cut']} running at one) "
          f"and {totals['twice_not_running']} were not", flush=True)


if __name__ == "__main__":
    main()
