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
    """Publish ``threads * messages`` messages through leases and read them back.

    The demo runs on a user's broker, so it must leave nothing there however
    it ends: its queue is *exclusive* (the broker deletes it when the
    manager's connection closes, also after ``kill -9`` or a lost network),
    and it is deleted in a ``finally`` as well, after the publishing threads
    were told to stop (so none of them publishes into a deleted queue).
    The price: should the connection drop mid-run, the queue and what it
    held go with it and the summary shows fewer messages received.
    """
    queue_name = f"carrot-kombu-demo-{uuid.uuid4().hex[:8]}"
    with ConnectionManager(url, pool_limit=pool_limit) as manager:
        if not manager.wait_connected(15):
            raise CarrotKombuError(f"could not connect: {manager.status().last_error}")
        queue = kombu.Queue(queue_name, exclusive=True, durable=False, auto_delete=False)
        with manager.channel() as lease:
            queue(lease).declare()
        leases = [0]
        count_lock = threading.Lock()
        errors: list[BaseException] = []
        halt = threading.Event()

        def publish(worker: int) -> None:
            try:
                for n in range(messages):
                    if halt.is_set():
                        return
                    with manager.channel(timeout=10) as lease:
                        kombu.Producer(lease).publish({"worker": worker, "n": n}, routing_key=queue_name)
                    with count_lock:
                        leases[0] += 1
            except BaseException as exc:  # reported in the summary
                errors.append(exc)

        # Daemon threads: after Ctrl-C a publisher stuck beyond the join below
        # must not keep the process alive.
        workers = [threading.Thread(target=publish, args=(i,), daemon=True) for i in range(threads)]
        try:
            started = time.perf_counter()
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
            elapsed = time.perf_counter() - started
            status = manager.status()
        finally:
            halt.set()
            for w in workers:
                if w.is_alive():
                    w.join(15)
            _delete_quietly(manager, queue)
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


def _delete_quietly(manager: ConnectionManager, queue: kombu.Queue) -> None:
    """Delete the demo's queue if the connection still allows it.

    Called from a ``finally``: a failure here must not hide the error that
    ended the run, and the queue is exclusive, so the broker removes it with
    the connection anyway when this delete cannot be sent.
    """
    try:
        with manager.channel(timeout=5) as lease:
            queue(lease).delete()
    except Exception:  # the exclusive queue ends with the connection (see run_demo)
        pass
