"""Summaries of measured samples, and how they are written."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence


@dataclass(frozen=True)
class Latency:
    """Median, p95 and max of durations in seconds.

    Attributes:
        n: How many samples.
        median: Median, seconds.
        p95: 95th percentile (nearest rank), seconds.
        max: Largest sample, seconds.
    """

    n: int
    median: float
    p95: float
    max: float

    @classmethod
    def of(cls, samples: Iterable[float]) -> "Latency":
        """Summarise ``samples`` (seconds).

        Raises:
            ValueError: If there are no samples.
        """
        values = sorted(samples)
        if not values:
            raise ValueError("no samples")
        return cls(n=len(values), median=statistics.median(values), p95=percentile(values, 95), max=values[-1])

    def text(self, with_max: bool = False) -> str:
        """``median 1.6 µs, p95 2.1 µs (n=20000)``, optionally with the max."""
        parts = [f"median {duration(self.median)}", f"p95 {duration(self.p95)}"]
        if with_max:
            parts.append(f"max {duration(self.max)}")
        return f"{', '.join(parts)} (n={self.n})"

    def as_dict(self) -> dict[str, float]:
        """JSON-ready, in seconds."""
        return {"n": self.n, "median_s": self.median, "p95_s": self.p95, "max_s": self.max}


@dataclass(frozen=True)
class Throughput:
    """Messages per second over alternating rounds; the median round counts.

    Attributes:
        rounds: msgs/s of every round, in the order they ran.
    """

    rounds: tuple[float, ...]

    @property
    def median(self) -> float:
        """Median msgs/s over the rounds."""
        return statistics.median(self.rounds)

    def text(self) -> str:
        """``54.2k msgs/s (median of 3 rounds, 51.0k–55.3k)``."""
        if len(self.rounds) == 1:
            return f"{rate(self.median)} (1 round)"
        return (
            f"{rate(self.median)} (median of {len(self.rounds)} rounds, "
            f"{rate(min(self.rounds), unit=False)}–{rate(max(self.rounds), unit=False)})"
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {"median_per_s": self.median, "rounds_per_s": list(self.rounds)}


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = int(round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[min(len(sorted_values) - 1, max(0, index))]


def duration(seconds: float) -> str:
    """A duration with a unit that keeps 2-3 significant digits."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.3g} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def rate(per_second: float, unit: bool = True) -> str:
    """``54.2k msgs/s``."""
    text = f"{per_second / 1000:.3g}k" if per_second >= 1000 else f"{per_second:.3g}"
    return f"{text} msgs/s" if unit else text


def ratio(value: Optional[float]) -> str:
    """``1.02x`` (or ``—`` when unknown)."""
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}x"
    return f"{value:.2f}x"
