"""Benchmarks: carrot_kombu against raw py-amqp and kombu, in one process, on one broker.

``python -m benchmarks`` runs every row and writes ``docs/benchmarks.rst``;
``python -m benchmarks --quick`` is the CI smoke run (tiny sizes, prints the
table, writes nothing unless ``--write`` is given).  Benchmarks are not tests:
nothing here asserts a timing, a missed goal is reported, not raised.
"""

from __future__ import annotations

#: Every row, in the order they run and are rendered (``--only`` takes these).
ROW_KEYS: tuple[str, ...] = (
    "lease", "publish", "confirm", "sharing", "celery", "recovery", "failover", "dead_peer", "memory", "metrics", "asyncio",
    "consumers",
)
