"""``carrot-kombu demo [URL]``: the main job, on ``memory://`` by default.

Starts a manager, publishes a batch from several threads through pooled
channel leases, consumes it back, and prints a short summary.
"""

from __future__ import annotations

import threading
import time
import uuid

import kombu

from .exceptions import CarrotKombuError
from .manager import ConnectionManager


def run_demo(url: str, threads: int = 4, messages: int = 250, pool_limit: int = 4) -> dict[str, object]:
    """Publish ``threads * messages`` messages through leases and read them back."""
    queue_name = f"carrot-kombu-demo-{uuid.uuid4().hex[:8]}"
    with ConnectionManager(url, pool_limit=pool_limit) as manager:
        if not manager.wait_connected(15):
            raise CarrotKombuError(f"could not connect: {manager.status().last_error}")
        queue = kombu.Queue(queue_name, auto_delete=False, durable=False)
        with manager.channel() as lease:
            queue(lease).declare()
        leases = [0]
        count_lock = threading.Lock()
        errors: list[BaseException] = []

        def publish(worker: int) -> None:
            try:
                for n in range(messages):
                    with manager.channel(timeout=10) as lease:
                        kombu.Producer(lease).publish({"worker": worker, "n": n}, routing_key=queue_name)
                    with count_lock:
                        leases[0] += 1
            except BaseException as exc:  # reported in the summary
                errors.append(exc)

        started = time.perf_counter()
        workers = [threading.Thread(target=publish, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        published = time.perf_counter() - started
        received = 0
        with manager.channel() as lease:
            bound = queue(lease)
            while received < threads * messages:
                message = bound.get(no_ack=True)
                if message is None:
                    break
                received += 1
            bound.delete()
        elapsed = time.perf_counter() - started
        status = manager.status()
    if errors:
        raise CarrotKombuError(f"{len(errors)} publisher thread(s) failed: {errors[0]!r}")
    return {
        "broker": status.broker,
        "threads": threads,
        "published": threads * messages,
        "received": received,
        "leases": leases[0],
        "pool_limit": status.pool.limit,
        "publish_seconds": round(published, 3),
        "total_seconds": round(elapsed, 3),
    }
