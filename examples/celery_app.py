"""A minimal Celery app that publishes through one carrot_kombu manager per worker process.

Run a worker::

    CELERY_BROKER_URL=amqp://guest:guest@localhost// celery -A examples.celery_app worker --pool=prefork -c 2

and call ``report_pid.delay("some-queue")``: the task publishes its worker
process id to ``some-queue`` through that process's own pooled connection.
That queue is the caller's: it outlives the worker's connection (the caller
reads it from another one), so it cannot be exclusive, and the caller deletes
it when done (``lease.queue_delete("some-queue")``).
"""

from __future__ import annotations

import os

from celery import Celery

from carrot_kombu.celery import install, manager_for

app = Celery("carrot_kombu_example", broker=os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@localhost//"))
app.conf.broker_connection_retry_on_startup = True
install(app)


@app.task
def report_pid(queue: str) -> int:
    """Publish this worker process's pid to ``queue`` through the process's manager."""
    manager = manager_for(app)
    manager.wait_connected(10)
    with manager.channel() as lease:
        lease.queue_declare(queue, auto_delete=False)
        lease.basic_publish(lease.prepare_message(str(os.getpid()).encode()), routing_key=queue)
    return os.getpid()
