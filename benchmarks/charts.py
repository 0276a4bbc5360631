"""Charts of the measured figures, drawn from the pages' tables (SVG, matplotlib).

The tables in ``docs/benchmarks.rst`` and ``docs/reliability.rst`` are the
committed record of a run, so the charts are drawn from them and nothing
else: ``python -m benchmarks --charts-only`` and ``python -m integration.report
--charts-only`` redraw every chart without measuring anything, and a full run
draws them from the page it has just written.  The tables keep the exact
figures; a chart shows their shape.

A latency cell gives median, p95 and max (not every sample), so a
"distribution" here is those three marks per fault.

matplotlib is imported only when drawing (the ``bench`` and ``docs`` extras
install it) and always with the non-interactive Agg backend.  The SVG output
is deterministic (fixed hash salt, no date), so redrawing unchanged figures
leaves ``git status`` clean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ROOT = Path(__file__).resolve().parent.parent
#: Where the SVG files go: beside the pages that show them.
CHART_DIR = ROOT / "docs" / "charts"

#: The benchmark page's charts: file name -> caption.
BENCHMARK_CHARTS: dict[str, str] = {
    "bench-recovery.svg": "Recovery after each fault (rows 6): median, p95 and max per fault, with the goal.",
    "bench-threads.svg": "Aggregate publishing throughput against the number of threads sharing one manager "
                         "(rows 4): median round, with the range of the rounds.",
    "bench-failover.svg": "Longest publishing gap when the connected cluster node stops (row 7): every run, "
                          "carrot_kombu and plain kombu, with the goal.",
}

_UNITS = {"µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION = r"([\d.]+) (µs|us|ms|s)\b"


# -- reading the pages ---------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """One latency cell: median, p95 and max in seconds, and the sample count (None when the cell has no such figure)."""

    median: float
    p95: Optional[float] = None
    max: Optional[float] = None
    n: Optional[int] = None


@dataclass(frozen=True)
class Rate:
    """One throughput cell: the median round and the range of the rounds, in messages per second."""

    median: float
    low: float
    high: float


def table_rows(text: str) -> list[list[str]]:
    """The rows of every ``list-table`` of an rST page, as lists of cell texts (header rows included)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("   * - "):
            rows.append([line[len("   * - "):].strip()])
        elif line.startswith("     - ") and rows:
            rows[-1].append(line[len("     - "):].strip())
        elif line.startswith("       ") and rows and line.strip():  # a wrapped cell
            rows[-1][-1] += " " + line.strip()
    return rows


def _seconds(number: str, unit: str) -> float:
    """Rounded to the nanosecond: ``64.6 * 1e-3`` is 0.06459999999999999 otherwise."""
    return round(float(number) * _UNITS[unit], 9)


def duration(text: str) -> float:
    """``"62.8 ms"`` -> 0.0628 (seconds); µs, ms and s."""
    found = re.fullmatch(_DURATION, text.strip())
    if found is None:
        raise ValueError(f"not a duration: {text!r}")
    return _seconds(found.group(1), found.group(2))


def spread(text: str) -> Spread:
    """The first ``median X, p95 Y, max Z (n=N)`` in a cell."""
    found = re.search(rf"median {_DURATION}, p95 {_DURATION}, max {_DURATION} \(n=(\d+)\)", text)
    if found is None:
        raise ValueError(f"no median/p95/max in {text!r}")
    g = found.groups()
    return Spread(_seconds(g[0], g[1]), _seconds(g[2], g[3]), _seconds(g[4], g[5]), int(g[6]))


def count(text: str) -> float:
    """``"15.5k"`` -> 15500.0; ``"968"`` -> 968.0."""
    text = text.strip()
    return round(float(text[:-1]) * 1000, 6) if text.endswith("k") else float(text)


def rate(text: str) -> Rate:
    """The first ``M msgs/s (median of R rounds, L–H)`` in a cell."""
    found = re.search(r"([\d.]+k?) msgs/s \(median of \d+ rounds, ([\d.]+k?)–([\d.]+k?)\)", text)
    if found is None:
        raise ValueError(f"no msgs/s figure in {text!r}")
    return Rate(*(count(group) for group in found.groups()))


def goal_seconds(text: str) -> Optional[float]:
    """The bound of a goal cell such as ``≤ Backoff.min + 50 ms = 1.05 s (p95)`` or ``≤ 1 s (p95)``."""
    found = re.search(rf"{_DURATION} \((?:p95|longest gap[^)]*)\)", text)
    return _seconds(found.group(1), found.group(2)) if found else None


@dataclass(frozen=True)
class BenchmarkFigures:
    """What the benchmark charts show, read from ``docs/benchmarks.rst``."""

    #: (label, carrot_kombu's spread, the goal in seconds or None), one per fault.
    recovery: list[tuple[str, Spread, Optional[float]]]
    #: (label, spread) of plain kombu where the row compares (the broker restart).
    recovery_kombu: list[tuple[str, Spread]]
    #: threads -> aggregate throughput through one manager's leases.
    threads: dict[int, Rate]
    #: raw py-amqp on one channel from one thread (row 2's comparison), or None.
    raw_one_thread: Optional[Rate]
    #: every run's longest gap in seconds: {"carrot_kombu": [...], "plain kombu": [...]}.
    failover_runs: dict[str, list[float]]
    failover_goal: Optional[float]


def _fault_label(label: str) -> str:
    """A short name for a recovery row: fault, then backoff."""
    fault = ("proxy cut()" if "cut()" in label else "close_connection" if "close_connection" in label
             else "broker restart" if "restart" in label else label[:30])
    backoff = "Backoff(min=0.05)" if "min=0.05" in label else "default Backoff()"
    return f"{fault}, {backoff}"


def benchmark_figures(page: str) -> BenchmarkFigures:
    """Read the charted figures from the text of ``docs/benchmarks.rst``."""
    rows = table_rows(page)[1:]
    recovery: list[tuple[str, Spread, Optional[float]]] = []
    recovery_kombu: list[tuple[str, Spread]] = []
    threads: dict[int, Rate] = {}
    raw_one: Optional[Rate] = None
    runs: dict[str, list[float]] = {}
    failover_goal: Optional[float] = None
    for row in rows:
        label, measured, comparison, _, goal = row[:5]
        if label.startswith("6\\. Recovery") and "median" in measured:
            name = _fault_label(label)
            recovery.append((name, spread(measured), goal_seconds(goal)))
            if "median" in comparison:
                recovery_kombu.append((name, spread(comparison)))
        elif label.startswith("4\\. Sharing") and "msgs/s" in measured:
            found = re.search(r"(\d+) threads?", label)
            if found:
                threads[int(found.group(1))] = rate(measured)
        elif label.startswith("2\\. Publish") and "msgs/s" in comparison:
            raw_one = rate(comparison)
        elif label.startswith("7\\. Failover") and "runs:" in measured:
            for who, cell in (("carrot_kombu", measured), ("plain kombu", comparison)):
                found = re.search(r"\(runs: ([^;]+);", cell)
                if found:
                    runs[who] = [duration(part) for part in found.group(1).split(", ")]
            failover_goal = goal_seconds(goal)
    return BenchmarkFigures(recovery, recovery_kombu, threads, raw_one, runs, failover_goal)


# -- drawing -------------------------------------------------------------------------


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, set for reproducible SVG (the module, typed loosely)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "svg.hashsalt": "carrot_kombu",  # stable element ids: a redraw of the same figures is the same file
        "svg.fonttype": "none",          # text stays text: smaller files, searchable labels
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
    })
    return plt


def _save(fig: "Figure", path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _seconds_axis(ax: "Axes", values: Sequence[float]) -> None:
    """A log axis in seconds when the values span more than a decade, linear otherwise."""
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_xscale("log")
    ax.set_xlabel("seconds" + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.grid(axis="x", alpha=0.3, which="both")


def spread_chart(
    path: Path,
    title: str,
    rows: Sequence[tuple[str, Spread, Optional[float]]],
    compared: Sequence[tuple[str, Spread]] = (),
    compared_name: str = "plain kombu",
) -> Path:
    """One line per fault: median (dot), p95 (diamond), max (bar) and the goal (red cross).

    Args:
        path: The SVG file to write.
        title: The chart's title.
        rows: (label, spread, goal or None), top to bottom.
        compared: (label, spread) of a comparison for some of those labels,
            drawn hollow just under them.
        compared_name: The comparison's name in the legend.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 0.55 * len(rows) + 1.4))
    others = dict(compared)
    values: list[float] = []
    seen: set[str] = set()

    def once(name: str) -> Optional[str]:
        """A legend label the first time it is drawn (rows may lack p95, max or a goal)."""
        if name in seen:
            return None
        seen.add(name)
        return name

    for index, (label, figures, goal) in enumerate(rows):
        y = len(rows) - 1 - index
        marks = [v for v in (figures.median, figures.p95, figures.max) if v is not None]
        values += marks + ([goal] if goal else [])
        ax.plot([min(marks), max(marks)], [y, y], color="tab:blue", linewidth=1)
        ax.plot(figures.median, y, "o", color="tab:blue", label=once("median"))
        if figures.p95 is not None:
            ax.plot(figures.p95, y, "D", color="tab:blue", markersize=4, label=once("p95"))
        if figures.max is not None:
            ax.plot(figures.max, y, "|", color="tab:blue", markersize=10, label=once("max"))
        if goal:
            ax.plot(goal, y, "x", color="tab:red", markersize=8, label=once("goal"))
        other = others.get(label)
        if other is not None:
            omarks = [v for v in (other.median, other.p95, other.max) if v is not None]
            values += omarks
            ax.plot([min(omarks), max(omarks)], [y - 0.3, y - 0.3], color="tab:gray", linewidth=1)
            ax.plot(other.median, y - 0.3, "o", markerfacecolor="none", color="tab:gray", label=once(f"{compared_name} (median..max)"))
    ax.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)])
    _seconds_axis(ax, values)
    ax.set_title(title)
    # Outside the axes: inside, it hid the points of whichever row it sat on.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, path)


def threads_chart(path: Path, title: str, threads: dict[int, Rate], raw_one_thread: Optional[Rate]) -> Path:
    """Aggregate msgs/s against thread count: median with the rounds' range; raw py-amqp as a line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    counts = sorted(threads)
    medians = [threads[n].median for n in counts]
    below = [threads[n].median - threads[n].low for n in counts]
    above = [threads[n].high - threads[n].median for n in counts]
    ax.errorbar(counts, medians, yerr=[below, above], fmt="o-", capsize=4, color="tab:blue",
                label="carrot_kombu: threads sharing one manager (leases)")
    if raw_one_thread is not None:
        ax.axhline(raw_one_thread.median, color="tab:gray", linestyle="--",
                   label="raw py-amqp, one channel, one thread (threads cannot share it)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("publishing threads")
    ax.set_ylabel("messages per second (aggregate)")
    ax.set_ylim(bottom=0)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def runs_chart(path: Path, title: str, runs: dict[str, list[float]], goal: Optional[float], unit: str = "ms") -> Path:
    """Every run's figure as a dot, one line per client, and the goal."""
    plt = _pyplot()
    scale = _UNITS[unit]
    fig, ax = plt.subplots(figsize=(6.5, 0.5 * len(runs) + 1.5))
    names = list(runs)
    for index, name in enumerate(names):
        y = len(names) - 1 - index
        ax.plot([v / scale for v in runs[name]], [y] * len(runs[name]), "o", alpha=0.8, color="tab:blue")
    if goal:
        ax.axvline(goal / scale, color="tab:red", linestyle="--", label=f"goal {goal / scale:g} {unit}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(range(len(names)), list(reversed(names)))
    ax.set_ylim(-0.7, len(names) - 0.3)
    ax.set_xlim(left=0)
    ax.set_xlabel(unit)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def bar_chart(path: Path, title: str, bars: Sequence[tuple[str, float, Optional[float]]], unit: str = "s") -> Path:
    """One horizontal bar per scenario (its single figure), with its bound as a red tick when it has one."""
    plt = _pyplot()
    scale = _UNITS[unit]
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(bars) + 1.4))
    for index, (_, value, bound) in enumerate(bars):
        y = len(bars) - 1 - index
        ax.barh(y, value / scale, color="tab:blue", height=0.55)
        ax.text(value / scale, y, f" {value / scale:g} {unit}", va="center", fontsize=8)
        if bound:
            ax.plot(bound / scale, y, "|", color="tab:red", markersize=14, markeredgewidth=2,
                    label="bound / goal" if "bound / goal" not in ax.get_legend_handles_labels()[1] else None)
    ax.set_yticks(range(len(bars)), [label for label, _, _ in reversed(bars)])
    ax.set_xlabel(unit)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def draw_benchmark_charts(page: str, into: Path = CHART_DIR) -> list[Path]:
    """Every chart of :data:`BENCHMARK_CHARTS` from the page's text; charts without figures are skipped."""
    figures = benchmark_figures(page)
    drawn: list[Path] = []
    if figures.recovery:
        drawn.append(spread_chart(into / "bench-recovery.svg", "Recovery time after a fault (until a lease works)",
                                  figures.recovery, figures.recovery_kombu))
    if figures.threads:
        drawn.append(threads_chart(into / "bench-threads.svg", "Publishing 1 KiB messages through one manager",
                                   figures.threads, figures.raw_one_thread))
    if figures.failover_runs:
        drawn.append(runs_chart(into / "bench-failover.svg", "Cluster failover: longest publishing gap per run",
                                figures.failover_runs, figures.failover_goal))
    return drawn


def charts_section(charts: dict[str, str], command: str, left_out: str = "") -> list[str]:
    """The rST lines that show ``charts`` (file -> caption) on a page in ``docs/``.

    Args:
        charts: The chart files in ``docs/charts`` and their captions.
        command: The command that redraws them, for the introduction.
        left_out: A sentence naming charts left out and why (optional).
    """
    lines = [
        "Charts",
        "------",
        "",
        f"Drawn from the table above by ``{command}``; the table has the exact figures.",
    ]
    if left_out:
        lines[-1] += " " + left_out
    lines.append("")
    for name, caption in charts.items():
        lines += [f".. figure:: charts/{name}", f"   :alt: {caption}", "", f"   {caption}", ""]
    return lines
