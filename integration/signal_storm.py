"""A raising signal handler interrupts the main thread's publishes at random moments, for a while.

Run in a subprocess by ``test_integrity.py`` (a wedged process must not take
pytest with it)::

    python -m integration.signal_storm URL SECONDS [publish|lease|stopstart]

The main thread publishes (single messages and batches) and is interrupted by
``SIGALRM`` 0.5-20 ms into each round, like Ctrl-C or Celery's soft time
limit would.  Another thread publishes with ``timeout=2`` every 0.1 s: each of
its calls must return within its timeout whatever the main thread was doing.
In ``lease`` mode the main thread takes leases and asks the broker a
question on each (RPCs, channel opens and closes) instead of publishing; in
``stopstart`` mode it stops and starts the manager (an interrupted ``stop()``
or ``start()`` must be finished by the next one, and the final ``stop()``
must be prompt).
Prints one JSON line with what happened (``other_drops``: connection losses
for any reason but an interrupted frame handling, e.g. a reused channel id);
exit status 0 unless wedged.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
import uuid

from carrot_kombu import ConnectionManager


class Alarm(BaseException):
    """What the signal handler raises."""


def _handler(signum: int, frame: object) -> None:
    raise Alarm()


def main(url: str, seconds: float, mode: str = "publish") -> int:
    signal.signal(signal.SIGALRM, _handler)
    queue = "ck-storm-" + uuid.uuid4().hex[:8]
    manager = ConnectionManager(url, heartbeat=5, backoff={"min": 0.05, "max": 0.5})
    disconnects = [0]
    other_drops: list[str] = []

    def on_disconnected(error: BaseException) -> None:
        disconnects[0] += 1
        if "interrupted the handling of a frame" not in str(error):
            other_drops.append(f"{type(error).__name__}: {error}"[:200])

    manager.on("disconnected", on_disconnected)
    manager.start(wait=10)
    with manager.channel(timeout=5) as lease:
        lease.queue_declare(queue, auto_delete=False)
    report: dict[str, object] = {"interrupted": 0, "probes": 0, "probe_failures": 0, "probe_max": 0.0}
    done = threading.Event()
    wedged = threading.Event()

    def probe() -> None:
        while not done.is_set():
            outcome: dict[str, object] = {}

            def one() -> None:
                try:
                    manager.publish(b"probe", routing_key=queue, timeout=2)
                except Exception as exc:  # noqa: BLE001 - the probe reports any failure
                    outcome["error"] = f"{type(exc).__name__}: {exc}"

            call = threading.Thread(target=one, daemon=True)
            start = time.monotonic()
            call.start()
            call.join(10)
            took = time.monotonic() - start
            if call.is_alive():
                report["wedged_after"] = round(time.monotonic() - began, 1)
                wedged.set()
                return
            report["probes"] = int(report["probes"]) + 1  # type: ignore[call-overload]
            report["probe_max"] = round(max(float(report["probe_max"]), took), 3)  # type: ignore[arg-type]
            if "error" in outcome:
                report["probe_failures"] = int(report["probe_failures"]) + 1  # type: ignore[call-overload]
                report["last_probe_error"] = outcome["error"]
            done.wait(0.1)

    began = time.monotonic()
    prober = threading.Thread(target=probe, name="probe", daemon=True)
    prober.start()
    batch = [b"b" * 2000] * 20
    while time.monotonic() - began < seconds and not wedged.is_set():
        try:
            signal.setitimer(signal.ITIMER_REAL, random.uniform(0.0005, 0.02))
            try:
                if mode == "stopstart":
                    manager.stop()
                    manager.start(wait=5)
                elif mode == "lease":
                    for _ in range(5):
                        with manager.channel(timeout=5) as lease:
                            lease.queue_declare(queue, passive=True)
                elif random.random() < 0.5:
                    manager.publish_many(batch, routing_key=queue, timeout=5)
                else:
                    for _ in range(20):
                        manager.publish(b"s" * 200, routing_key=queue, timeout=5)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Alarm:
            report["interrupted"] = int(report["interrupted"]) + 1  # type: ignore[call-overload]
        except Exception:  # noqa: BLE001 - a publish may fail while the connection is replaced
            pass
    done.set()
    prober.join(15)
    if mode == "stopstart":
        manager.start(wait=10)  # the storm may have left it stopped
        report["dispatchers"] = sum(t.name == "carrot-kombu-events" and t.is_alive() for t in threading.enumerate())
    report["disconnects"] = disconnects[0]
    report["other_drops"] = other_drops[:5]
    if wedged.is_set():
        report["wedged"] = True
        print(json.dumps(report), flush=True)
        os._exit(1)  # threads are stuck: do not wait for them
    stopper = threading.Thread(target=lambda: _cleanup(manager, queue), daemon=True)
    start = time.monotonic()
    stopper.start()
    stopper.join(15)
    report["stop_seconds"] = round(time.monotonic() - start, 3)
    report["wedged"] = stopper.is_alive()
    print(json.dumps(report), flush=True)
    if stopper.is_alive():
        os._exit(1)
    return 0


def _cleanup(manager: ConnectionManager, queue: str) -> None:
    try:
        with manager.channel(timeout=5) as lease:
            lease.queue_delete(queue)
    finally:
        manager.stop(timeout=3)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], float(sys.argv[2]), *sys.argv[3:4]))
