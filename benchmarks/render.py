"""The results as ``docs/benchmarks.rst`` (reStructuredText) and as console lines."""

from __future__ import annotations

import re
from typing import Any, Iterable

from .charts import BENCHMARK_CHARTS, charts_section
from .model import Row
from .settings import Sizes

#: Said under the charts: the chart the issue asked for that no row can draw yet.
CHARTS_LEFT_OUT = ("Consumers at scale (rows 12) have no chart: three sizes, each with five figures, read best "
                   "in the table.")

HEADINGS = ("Benchmark", "carrot_kombu", "Compared with", "Ratio", "Goal", "Result")

METHOD = """\
How it is measured
------------------

* carrot_kombu, raw py-amqp and kombu run in one process against one broker.
  Comparisons run in alternating rounds (A B, B A, A B...) and the median
  round counts, so machine noise lands on both sides.
* Latencies are per call (``time.perf_counter``).  Plain-publish throughputs
  count from the first publish to the reply of one synchronous round trip on
  the same channel after the last, so every message has reached the broker.
  Queues are uniquely named scratch queues, purged between rounds and
  deleted after.
* Raw py-amqp runs with its defaults (no heartbeat); the manager with its
  own (heartbeat 10 s) unless the row says otherwise.
* CPU per confirmed message: ``time.process_time()`` of this process (all
  its threads, the manager's included) over a round, divided by the
  messages confirmed in it; the median round counts.
* Celery: two Celery apps in this process (``set_as_current=False``, each
  with its own producer pool), one on ``carrot+amqp://``, one on plain
  ``amqp://``; no worker, each sends to its own scratch queue (declared by
  the benchmark: kombu would declare an expiring queue again before every
  message).  The clock runs from the first ``.delay()`` to the return of
  the last; the queue is then waited for until it holds every message and
  purged.
* Recovery: after a proxy ``cut()`` the clock starts at the cut; after
  ``rabbitmqctl close_connection`` it starts when the manager leaves
  ``CONNECTED`` (rabbitmqctl's own start-up is excluded).  It stops when a
  lease made a round trip (polled every millisecond).  After a broker
  restart (a private node, ``stop_app`` then ``start_app``) it starts when
  a raw TCP connect to the node (tried every 20 ms) first succeeds; the
  manager and a plain kombu publisher live through the same restarts.
* Failover: a private 3-node cluster; one thread publishes confirmed
  messages to a quorum queue declared through node 2 (its leader), the
  client starts on node 1, which gets ``stop_app``.  The figure is the
  longest time between two confirmed publishes, from a second before the
  stop to 5 s after it; carrot_kombu and plain kombu alternate on the same
  cluster, each on a fresh queue.  The cluster is not started by
  ``--quick``.
* Dead peer: the blackhole starts at a random moment of the heartbeat cycle;
  the clock stops when the manager leaves ``CONNECTED``.
* Memory: each figure comes from a fresh child process; "threads of its own"
  are the manager's threads (supervisor, reader, event dispatcher).
* Raw py-amqp never shares a connection between threads: one raw connection
  shared by threads hangs (see :doc:`behaviour`).  Where raw py-amqp runs
  from several threads (confirmed publish from 8 threads), each thread has
  a raw connection of its own.
"""


def page(rows: Iterable[Row], env: dict[str, Any], sizes: Sizes, seconds: float) -> str:
    """The whole ``docs/benchmarks.rst``.

    Args:
        rows: Every measured row, in order.
        env: :func:`benchmarks.machine.environment`.
        sizes: The sizes used.
        seconds: How long the run took.
    """
    rows = list(rows)
    run = "full run (``python -m benchmarks``)" if sizes.mode == "full" else "quick run (``python -m benchmarks --quick``)"
    lines = [
        ".. This page is written by ``python -m benchmarks``; do not edit it by hand.",
        "",
        "Benchmarks",
        "==========",
        "",
        f"Measured {env['date']} on ``{env['host']}``: {env['cpu']}, {env['cores']} cores, {env['system']}; "
        f"{env['python']}, carrot_kombu {env['carrot_kombu']} (commit {env['commit']}), kombu {env['kombu']}, py-amqp {env['amqp']}; "
        f"{env['broker']} at {env['broker_at']} (the same machine).  A {run}, {seconds:.0f} s in all; "
        f"{sizes.rounds} alternating rounds per comparison.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 24 20 24 12 12 8",
        "",
    ]
    lines += _table_row(HEADINGS)
    for row in rows:
        verdict = "**missed**" if row.met is False else row.verdict
        lines += _table_row((row.label, row.measured, row.comparison, row.ratio, row.goal, verdict))
    lines.append("")
    missed = [row for row in rows if row.met is False]
    if missed:
        lines += ["Goals missed in this run:", ""]
        lines += [f"* {_cell(row.label)}: {row.ratio} (goal {row.goal})" for row in missed]
        lines.append("")
    else:
        lines += ["Every goal set for a row was met in this run.", ""]
    lines += charts_section(BENCHMARK_CHARTS, "python -m benchmarks --charts-only", CHARTS_LEFT_OUT)
    lines.append(METHOD)
    return "\n".join(lines)


def _table_row(cells: Iterable[str]) -> list[str]:
    out = []
    for index, cell in enumerate(cells):
        bullet = "   * - " if index == 0 else "     - "
        out.append(bullet + (_cell(cell) or "—"))
    return out


def _cell(text: str) -> str:
    """``1. Lease`` would start an enumerated list: escape the dot."""
    return re.sub(r"^(\d+)\. ", r"\1\\. ", text)


def console(row: Row) -> str:
    """One line per row: ``[key] label: measured | vs ... | ratio | goal -> verdict``."""
    parts = [f"[{row.key}] {plain(row.label)}: {plain(row.measured)}"]
    if not row.comparison.startswith("—"):
        parts.append(f"vs {plain(row.comparison)}")
    if row.ratio != "—":
        parts.append(plain(row.ratio))
    if row.goal != "—":
        parts.append(f"goal {plain(row.goal)} -> {row.verdict.upper()}")
    return " | ".join(parts)


def plain(text: str) -> str:
    """reStructuredText inline markup as plain text."""
    text = re.sub(r":doc:`([^`]+)`", r"docs/\1.rst", text)
    return text.replace("``", "")
