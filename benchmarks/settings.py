"""How big each benchmark is: the full run and the ``--quick`` smoke run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    """Iteration counts for one run of the benchmarks.

    Attributes:
        mode: ``"full"`` or ``"quick"`` (shown in the page header).
        rounds: Alternating rounds per comparison (the median round counts).
        lease_ops: ``open_channel()``/``release()`` pairs per round (also the
            kombu ``ChannelPool`` pairs).
        raw_channel_ops: Raw ``channel()``/``close()`` pairs per round.
        publish_messages: 1 KiB messages per publish round.
        confirm_messages: Confirmed 1 KiB messages per round.
        confirm_thread_messages: Confirmed 1 KiB messages per round from
            8 threads, over all threads.
        sharing_messages: 1 KiB messages per sharing round, over all threads.
        sharing_threads: Thread counts for the sharing row.
        celery_messages: ``.delay()`` calls per Celery round, over all threads.
        failover_runs: ``stop_app`` faults per client on the private cluster
            (0: the row is skipped).
        recovery_runs: Faults per (fault, backoff) pair.
        restart_runs: Broker restarts of a private node in the recovery row
            (0: that sub-row is skipped).
        restart_down_s: Seconds from ``stop_app`` to ``start_app``.
        dead_peer_heartbeats: Heartbeats (seconds) for dead-peer detection.
        dead_peer_runs: Blackholes per heartbeat.
        memory_cuts: Proxy cuts (each one a reconnect) in the memory row.
        consumer_counts: Consumers on one manager, one run each (consumers row).
    """

    mode: str
    rounds: int
    lease_ops: int
    raw_channel_ops: int
    publish_messages: int
    confirm_messages: int
    confirm_thread_messages: int
    sharing_messages: int
    sharing_threads: tuple[int, ...]
    celery_messages: int
    failover_runs: int
    recovery_runs: int
    restart_runs: int
    restart_down_s: float
    dead_peer_heartbeats: tuple[int, ...]
    dead_peer_runs: int
    memory_cuts: int
    consumer_counts: tuple[int, ...] = (100,)

    @classmethod
    def full(cls) -> "Sizes":
        """The sizes ``docs/benchmarks.rst`` is measured with."""
        return cls(
            mode="full", rounds=7, lease_ops=20_000, raw_channel_ops=1_000,
            publish_messages=50_000, confirm_messages=3_000, confirm_thread_messages=8_000, sharing_messages=50_000,
            sharing_threads=(1, 2, 4, 8), celery_messages=1_600, failover_runs=2, recovery_runs=20, restart_runs=3, restart_down_s=5.0, dead_peer_heartbeats=(1, 2, 5),
            dead_peer_runs=3, memory_cuts=1_000, consumer_counts=(100, 1_000, 10_000),
        )

    @classmethod
    def quick(cls) -> "Sizes":
        """Tiny sizes for a CI smoke run (well under a minute)."""
        return cls(
            mode="quick", rounds=3, lease_ops=500, raw_channel_ops=50,
            publish_messages=1_000, confirm_messages=100, confirm_thread_messages=400, sharing_messages=1_000,
            sharing_threads=(1, 2, 4, 8), celery_messages=80, failover_runs=0, recovery_runs=2, restart_runs=0, restart_down_s=5.0, dead_peer_heartbeats=(1,),
            dead_peer_runs=1, memory_cuts=20, consumer_counts=(100,),
        )
