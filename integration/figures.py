"""Measured figures from the reliability scenarios, collected for the report.

Each scenario calls :func:`record`; ``python -m integration.report`` runs the
scenarios and renders ``docs/reliability.rst`` from what they recorded.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent


def figures_dir() -> Path:
    return Path(os.environ.get("CARROT_KOMBU_FIGURES", ROOT / "build" / "figures"))


def record(scenario: str, **figures: Any) -> None:
    where = figures_dir()
    where.mkdir(parents=True, exist_ok=True)
    payload = {"scenario": scenario, "recorded_at": time.time(), "figures": figures}
    (where / f"{scenario}.json").write_text(json.dumps(payload, indent=2, default=str))


def summary(seconds: Iterable[float]) -> dict[str, float]:
    """median / p95 / max of durations, in milliseconds."""
    values = sorted(seconds)
    if not values:
        return {}
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1000, 1),
        "p95_ms": round(p95 * 1000, 1),
        "max_ms": round(values[-1] * 1000, 1),
    }


def resources() -> dict[str, float]:
    """This process: threads, open file descriptors, RSS in MB."""
    import threading

    rss_kb = 0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_kb = int(line.split()[1])
    return {
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mb": round(rss_kb / 1024, 1),
    }
