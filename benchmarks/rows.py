"""The benchmark rows, in order: key -> (title, function)."""

from __future__ import annotations

from .aio import asyncio_row
from .celery_tasks import celery_row
from .consumers import consumers_row
from .failover import failover_row
from .faults import dead_peer_row, recovery_row
from .memory import memory_row
from .metrics_cost import metrics_row
from .model import RowFunction
from .speed import confirm_row, lease_row, publish_row, sharing_row

ROWS: dict[str, tuple[str, RowFunction]] = {
    "lease": ("1. Lease latency", lease_row),
    "publish": ("2. Publish throughput", publish_row),
    "confirm": ("3. Confirmed publish", confirm_row),
    "sharing": ("4. Sharing one manager between threads", sharing_row),
    "celery": ("5. Celery .delay() through carrot+amqp://", celery_row),
    "recovery": ("6. Recovery", recovery_row),
    "failover": ("7. Failover on a 3-node cluster", failover_row),
    "dead_peer": ("8. Dead-peer detection", dead_peer_row),
    "memory": ("9. Memory", memory_row),
    "metrics": ("10. Cost of exporting metrics", metrics_row),
    "asyncio": ("11. asyncio: carrot_kombu.aio vs aio-pika", asyncio_row),
    "consumers": ("12. Consumers at scale", consumers_row),
}
