"""The numbers behind :mod:`carrot_kombu.metrics`, kept by the parts that see them happen.

One :class:`Metrics` per manager, carried across ``stop()``/``start()`` (its
counters never go back).  Each owner changes its numbers where the thing
happens: the state board counts attempts and reconnects, the publisher its
outcomes, the pool its waits, the consumers their deliveries.  Gauges
(connected, blocked, pool figures, pending confirms...) are not kept here:
the exporters read them from their owners at scrape time.

Cheap enough to be always on, so no lock is taken for them: a number is
changed under its owner's existing lock, or by one ``+=`` statement, which
CPython (with its GIL) never interrupts half-way in practice: no thread
switch happens between the read and the write of ``x.n += 1`` (the
interpreter only switches threads at calls and backward jumps).  A scrape
reads them without a lock: a histogram's sum may be one observation ahead
of its count, never more.

This module imports nothing of the package (every owner imports it).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from typing import Callable, Iterable, Optional, Protocol

__all__ = ("Histogram", "Metrics", "OUTCOMES", "CONFIRM_BUCKETS", "POOL_WAIT_BUCKETS", "now", "off_histogram", "on_histogram")

#: ``published_total`` outcomes, in the order they are exported.
OUTCOMES = ("confirmed", "nacked", "returned", "timeout", "failed")

#: Upper bounds (seconds) of the ``publish_confirm_seconds`` buckets: a
#: confirm takes ~0.1-1 ms on a LAN, seconds while the broker is blocked or
#: the connection is being replaced.
CONFIRM_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Upper bounds (seconds) of the ``pool_wait_seconds`` buckets: the calls that
#: found no free channel wait for a release or time out
#: (``open_channel(timeout=5.0)`` by default).  Calls served at once (almost
#: all) are not observed: the lease is the hottest path there is.
POOL_WAIT_BUCKETS = (0.0005, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The clock of every duration here.
now = time.monotonic

#: Creation order of the managers' metrics: tells apart managers sharing a connection name.
_SEQUENCE = itertools.count(1)

#: How a publish's internal outcome is exported (``ack`` is ``confirmed``; anything else ``failed``).
_EXPORTED = {"nack": "nacked", "returned": "returned"}


#: Told of every histogram observation (``listener(metrics, which, value)``):
#: OpenTelemetry has no histogram read at collection time.  Empty unless
#: ``carrot_kombu.metrics.instrument()`` was called.
_LISTENERS: list[Callable[["Metrics", str, float], None]] = []


def on_histogram(listener: Callable[["Metrics", str, float], None]) -> None:
    """Tell ``listener`` of every histogram observation from now on (idempotent)."""
    if listener not in _LISTENERS:
        _LISTENERS.append(listener)


def off_histogram(listener: Callable[["Metrics", str, float], None]) -> None:
    """Undo :func:`on_histogram` (idempotent)."""
    if listener in _LISTENERS:
        _LISTENERS.remove(listener)


class Histogram:
    """Observations in fixed buckets (``value <= bound``, plus one above every bound)."""

    __slots__ = ("bounds", "counts", "sum", "owner", "which")

    def __init__(self, bounds: tuple[float, ...], owner: "Metrics", which: str) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.owner = owner
        self.which = which

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if _LISTENERS:
            for listener in list(_LISTENERS):
                listener(self.owner, self.which, value)

    def cumulative(self) -> tuple[list[int], float]:
        """Counts of observations ``<= bound`` for each bound then in all (the last), and their sum."""
        counts = list(self.counts)  # one copy: every bucket as of one moment
        total = 0
        running = []
        for count in counts:
            total += count
            running.append(total)
        return running, self.sum


class _Settled(Protocol):
    """What :meth:`Metrics.publish_ended` reads of a publish (the publisher's ``_Pending``)."""

    outcome: Optional[str]
    settled_at: float


class _Expires(Protocol):
    def expired(self) -> bool: ...


class Metrics:
    """The counters of one manager (see the module docstring for who writes which)."""

    __slots__ = ("sequence", "connection_attempts", "reconnects", "published", "confirm_seconds",
                 "pool_wait_seconds", "delivered", "__weakref__")

    def __init__(self) -> None:
        self.sequence = next(_SEQUENCE)
        #: Connection attempts started (the state board, on the supervisor).
        self.connection_attempts = 0
        #: Connections made after the first of a run (the state board).
        self.reconnects = 0
        #: Publishes by exported outcome (their callers, when the call ends).
        self.published = dict.fromkeys(OUTCOMES, 0)
        #: Seconds from a publish call until the broker's confirm of a message.
        self.confirm_seconds = Histogram(CONFIRM_BUCKETS, self, "confirm_seconds")
        #: Seconds ``open_channel()`` calls that found no free slot waited (the pool, under its lock).
        self.pool_wait_seconds = Histogram(POOL_WAIT_BUCKETS, self, "pool_wait_seconds")
        #: Deliveries handed to ``consume()`` callbacks (the consumers' workers).
        self.delivered = 0

    def publish_ended(self, messages: Iterable[_Settled], started: float, deadline: _Expires) -> None:
        """A ``publish``/``publish_many`` call ends: count each message's outcome.

        Args:
            messages: Every message of the call (settled or not).
            started: :func:`now` when the call began.
            deadline: The call's; once passed, an unsettled message timed out
                (else the call was cut short: the manager stopped, an interrupt).
                Asked only about an unsettled message.
        """
        # The histogram's observe() inlined: this runs for every message of publish_many.
        published = self.published
        histogram = self.confirm_seconds
        counts, bounds = histogram.counts, histogram.bounds
        confirmed = 0
        total = 0.0
        latencies: Optional[list[float]] = [] if _LISTENERS else None
        for message in messages:
            outcome = message.outcome
            if outcome == "ack":
                confirmed += 1
                latency = message.settled_at - started
                counts[bisect_left(bounds, latency)] += 1
                total += latency
                if latencies is not None:
                    latencies.append(latency)
            elif outcome is None:
                published["timeout" if deadline.expired() else "failed"] += 1
            else:
                published[_EXPORTED.get(outcome, "failed")] += 1
        if confirmed:
            published["confirmed"] += confirmed
            histogram.sum += total
            for latency in latencies or ():
                for listener in list(_LISTENERS):
                    listener(self, histogram.which, latency)
