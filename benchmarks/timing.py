"""Timing loops shared by the rows."""

from __future__ import annotations

import gc
from time import perf_counter
from typing import Callable, TypeVar

T = TypeVar("T")


def time_each(op: Callable[[], object], n: int) -> list[float]:
    """Run ``op`` ``n`` times; the duration of each call, in seconds."""
    clock = perf_counter
    samples = [0.0] * n
    for i in range(n):
        start = clock()
        op()
        samples[i] = clock() - start
    return samples


def alternate(rounds: int, runners: dict[str, Callable[[], T]]) -> dict[str, list[T]]:
    """Run every runner once per round, rotating who goes first.

    With ``{"a": ..., "b": ...}`` and 3 rounds the order is a b, b a, a b:
    machine noise (another process, a GC pause, broker housekeeping) lands on
    both sides instead of on one.

    Returns:
        Each runner's results, one per round, in round order.
    """
    names = list(runners)
    results: dict[str, list[T]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            results[name].append(runners[name]())
    return results
