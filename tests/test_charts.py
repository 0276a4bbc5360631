"""The charts of the benchmark and reliability pages: drawn from the tables, shown by the docs."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import charts
from benchmarks.charts import BENCHMARK_CHARTS, Rate, Spread, benchmark_figures, charts_section, draw_benchmark_charts
from benchmarks.render import CHARTS_LEFT_OUT
from integration import report

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: A benchmark table as ``python -m benchmarks`` writes it, cut down to the charted rows.
BENCH_PAGE = """\
.. list-table::
   :header-rows: 1

   * - Benchmark
     - carrot_kombu
     - Compared with
     - Ratio
     - Goal
     - Result
   * - 2\\. Publish 1 KiB x 50,000 through a lease (``lease.basic_publish``)
     - 15.5k msgs/s (median of 7 rounds, 14.5k–18.7k)
     - raw py-amqp ``channel.basic_publish`` on one channel: 12k msgs/s (median of 7 rounds, 11.3k–13.4k)
     - 1.29x raw throughput
     - ≥ 0.95x raw throughput
     - met
   * - 4\\. Sharing: 1 thread publishing 1 KiB through leases of one manager, 50,000 messages in all
     - 14.9k msgs/s (median of 7 rounds, 14.4k–16.1k) in aggregate
     - —
     - 1.00x
     - —
     - —
   * - 4\\. Sharing: 8 threads publishing 1 KiB through leases of one manager, 50,000 messages in all
     - 968 msgs/s (median of 7 rounds, 900–1.1k) in aggregate
     - the 1-thread aggregate: 14.9k msgs/s
     - 0.97x the 1-thread aggregate
     - ≥ 0.9x the 1-thread aggregate
     - met
   * - 6\\. Recovery after a proxy ``cut()``, ``Backoff(min=0.05)``; from the cut
     - median 62.8 ms, p95 63.9 ms, max 64.6 ms (n=20)
     - raw py-amqp, kombu: no supervisor
     - p95 = 0.64x the goal
     - ≤ Backoff.min + 50 ms = 100 ms (p95)
     - met
   * - 6\\. Recovery after a broker restart (private node: ``stop_app``, 5 s down, ``start_app``), default ``Backoff()``
     - until a lease made a round trip: median 210 ms, p95 237 ms, max 1.5 s (n=3)
     - plain kombu: median 65.9 ms, p95 76.5 ms, max 800 µs (n=3)
     - median 3.19x kombu's
     - ≤ 1 s (p95)
     - met
   * - 7\\. Failover: ``stop_app`` of the connected node (of 3); longest publishing gap
     - ``manager.publish``: longest gap 28 ms, starting +1.33 s from the stop (runs: 24 ms, 28 ms; median 26 ms); 7,319 confirmed
     - plain kombu: longest gap 29 ms, starting +1.40 s from the stop (runs: 18 ms, 1.2 s; median 23.5 ms); 5,089 confirmed
     - 0.97x kombu's longest gap
     - ≤ 500 ms (longest gap over 2 runs)
     - met
"""

#: A reliability table as ``python -m integration.report`` writes it, some rows only.
RELIABILITY_PAGE = """\
.. list-table::
   :header-rows: 1

   * - Scenario
     - Measured
   * - Forced close soak: proxy ``cut()`` in a row, then ``rabbitmqctl close_connection``
     - 1000 cuts, every one followed by a working lease; recovery median 24.1 ms, p95 28.7 ms, max 70.3 ms (n=1000). 20 broker-side closes: median 1470.0 ms, p95 1586.1 ms, max 1614.9 ms (n=20) (includes ~0.6 s of rabbitmqctl).
   * - Dead peer: proxy ``blackhole()``, application thread busy
     - heartbeat 2 s: detected after 4.08 s (bound 2 x heartbeat + 1 = 5 s), while the application computed
   * - Dead peer over TCP: the same, plain TCP
     - heartbeat 3 s: detected after 6.5 s
   * - Cluster: connected node (quorum leader) ``stop_app``, 3 confirmed publishers
     - longest publishing gap 0.27 s (goal 0.5 s); 1330 confirmed, 0 lost, 3 duplicates
   * - Cluster: ``kill -9`` of the connected node
     - longest publishing gap 0.048 s; 176 confirmed, 0 lost
   * - Cluster: connected node frozen (SIGSTOP), heartbeat 2 s
     - not measured in this run
"""


def svg_texts(path: Path) -> str:
    """The text of a drawn SVG (text stays text: svg.fonttype is none); fails if it is not XML."""
    return " ".join(t for t in ET.parse(path).getroot().itertext() if t.strip())


def test_figures_are_read_from_the_benchmark_table() -> None:
    found = benchmark_figures(BENCH_PAGE)
    assert found.recovery == [
        ("proxy cut(), Backoff(min=0.05)", Spread(0.0628, 0.0639, 0.0646, 20), 0.1),
        ("broker restart, default Backoff()", Spread(0.21, 0.237, 1.5, 3), 1.0),
    ]
    assert found.recovery_kombu == [("broker restart, default Backoff()", Spread(0.0659, 0.0765, 0.0008, 3))]
    assert found.threads == {1: Rate(14900, 14400, 16100), 8: Rate(968, 900, 1100)}
    assert found.raw_one_thread == Rate(12000, 11300, 13400)
    assert found.failover_runs == {"carrot_kombu": [0.024, 0.028], "plain kombu": [0.018, 1.2]}
    assert found.failover_goal == 0.5


def test_a_cell_without_its_figure_is_an_error_naming_the_cell() -> None:
    with pytest.raises(ValueError, match="no median/p95/max in 'failed: OSError'"):
        charts.spread("failed: OSError")
    with pytest.raises(ValueError, match="not a duration: '5 parsecs'"):
        charts.duration("5 parsecs")


def test_benchmark_charts_are_drawn_from_a_small_table(tmp_path: Path) -> None:
    drawn = draw_benchmark_charts(BENCH_PAGE, into=tmp_path)
    assert sorted(p.name for p in drawn) == sorted(BENCHMARK_CHARTS)
    recovery = svg_texts(tmp_path / "bench-recovery.svg")
    assert "proxy cut(), Backoff(min=0.05)" in recovery and "plain kombu (median..max)" in recovery
    assert "goal 500 ms" in svg_texts(tmp_path / "bench-failover.svg")
    assert "publishing threads" in svg_texts(tmp_path / "bench-threads.svg")
    first = {p.name: p.read_bytes() for p in drawn}
    again = draw_benchmark_charts(BENCH_PAGE, into=tmp_path)  # a redraw of the same figures: same files
    assert {p.name: p.read_bytes() for p in again} == first


def test_a_table_without_a_charted_row_draws_no_chart_for_it(tmp_path: Path) -> None:
    only_threads = BENCH_PAGE.split("   * - 6\\.")[0]
    assert [p.name for p in draw_benchmark_charts(only_threads, into=tmp_path)] == ["bench-threads.svg"]


def test_reliability_charts_are_drawn_from_a_small_table(tmp_path: Path) -> None:
    found = report.reliability_figures(RELIABILITY_PAGE)
    assert [label for label, _, _ in found["recovery"]] == [
        "proxy cut(), soak", "close_connection (incl. ~0.6 s rabbitmqctl)"]
    assert found["recovery"][1][1] == Spread(1.47, 1.5861, 1.6149, 20)
    assert found["detection"] == [
        ("dead peer, application busy", 4.08, 5.0), ("dead peer over TCP, mid-message", 6.5, 7.0)]
    assert found["cluster"] == [
        ("stop_app: connected node, quorum leader", 0.27, 0.5), ("kill -9 of the connected node", 0.048, None)]
    drawn = report.draw_charts(RELIABILITY_PAGE, into=tmp_path)
    assert sorted(p.name for p in drawn) == sorted(report.CHARTS)
    assert "kill -9 of the connected node" in svg_texts(tmp_path / "reliability-cluster.svg")


def test_the_pages_show_every_chart_and_every_shown_chart_is_committed() -> None:
    committed = {p.name for p in (DOCS / "charts").glob("*.svg")}
    shown: dict[str, str] = {}
    for page in DOCS.glob("*.rst"):
        for name in re.findall(r"^\.\. (?:figure|image):: charts/(\S+)$", page.read_text(encoding="utf-8"), re.M):
            shown[name] = page.name
    assert committed == set(shown), (committed, shown)
    assert set(BENCHMARK_CHARTS) | set(report.CHARTS) == committed
    assert {shown[name] for name in BENCHMARK_CHARTS} == {"benchmarks.rst"}
    assert {shown[name] for name in report.CHARTS} == {"reliability.rst"}


def test_the_committed_pages_have_the_chart_section_their_writers_write() -> None:
    """The pages are written by programs: the section added by hand is the one they will write."""
    bench = "\n".join(charts_section(BENCHMARK_CHARTS, "python -m benchmarks --charts-only", CHARTS_LEFT_OUT))
    assert bench in (DOCS / "benchmarks.rst").read_text(encoding="utf-8")
    reliability = "\n".join(charts_section(report.CHARTS, report.CHARTS_COMMAND))
    assert reliability in (DOCS / "reliability.rst").read_text(encoding="utf-8")


def test_the_committed_tables_still_draw_every_chart(tmp_path: Path) -> None:
    """``--charts-only`` on the committed pages: every chart has its figures (a format change would lose one)."""
    drawn = draw_benchmark_charts((DOCS / "benchmarks.rst").read_text(encoding="utf-8"), into=tmp_path)
    drawn += report.draw_charts((DOCS / "reliability.rst").read_text(encoding="utf-8"), into=tmp_path)
    assert sorted(p.name for p in drawn) == sorted({p.name for p in (DOCS / "charts").glob("*.svg")})
