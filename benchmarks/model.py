"""What a benchmark row is, and what every row function is given."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .settings import Sizes


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        key: The benchmark it belongs to (one of :data:`benchmarks.ROW_KEYS`).
        label: What was measured, reStructuredText inline markup allowed.
        measured: carrot_kombu's figure (median and p95, or throughput).
        comparison: The same work done by raw py-amqp and/or kombu, or why
            there is nothing to compare with.
        ratio: carrot_kombu against the comparison (or against the goal).
        goal: The goal from issue 6 (``—`` when it sets none).
        met: True/False against the goal, None when there is no goal or
            nothing was measured.
        figures: Raw numbers, JSON-ready (written to ``build/benchmarks``).
    """

    key: str
    label: str
    measured: str
    comparison: str = "—"
    ratio: str = "—"
    goal: str = "—"
    met: Optional[bool] = None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """``met``, ``missed`` or ``—``."""
        if self.met is None:
            return "—"
        return "met" if self.met else "missed"


@dataclass(frozen=True)
class Context:
    """Shared by every row function.

    Attributes:
        url: The broker URL (the shared RabbitMQ).
        sizes: How many iterations.
        log: Prints a progress line (stderr).
    """

    url: str
    sizes: Sizes
    log: Callable[[str], None]


RowFunction = Callable[[Context], list[Row]]
