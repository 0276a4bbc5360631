"""The benchmark rows, in order: key -> (title, function)."""

from __future__ import annotations

from .faults import dead_peer_row, recovery_row
from .memory import memory_row
from .model import RowFunction
from .speed import confirm_row, lease_row, publish_row, sharing_row

ROWS: dict[str, tuple[str, RowFunction]] = {
    "lease": ("1. Lease latency", lease_row),
    "publish": ("2. Publish throughput", publish_row),
    "confirm": ("3. Confirmed publish", confirm_row),
    "sharing": ("4. Sharing one manager between threads", sharing_row),
    "recovery": ("5. Recovery", recovery_row),
    "dead_peer": ("6. Dead-peer detection", dead_peer_row),
    "memory": ("7. Memory", memory_row),
}
