"""Run the reliability scenarios and write ``docs/reliability.rst`` from their figures.

Usage::

    python -m integration.report                # full run (1000-cut soak, 30 s storm)
    python -m integration.report --render       # only re-render from build/figures
    python -m integration.report --charts-only  # only redraw docs/charts/reliability-*.svg from the page

Nothing in the page is typed by hand: every number comes from a scenario run.
The charts are drawn from the page's table (see :mod:`benchmarks.charts`), so
``--charts-only`` needs neither a broker nor the figures of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from benchmarks.charts import CHART_DIR, Spread, bar_chart, charts_section, duration, spread, spread_chart, table_rows

from .figures import ROOT, figures_dir

PAGE = ROOT / "docs" / "reliability.rst"

#: The test modules whose figures the page shows.
SCENARIOS = ("test_reliability.py", "test_recovery.py", "test_liveness.py", "test_cluster.py",
             "test_kombu_suite.py", "test_integrity.py", "test_consumer_scale.py")
#: CI runs smaller sizes; the report runs these.
FULL_SIZES = {
    "CARROT_KOMBU_SOAK_CUTS": "1000", "CARROT_KOMBU_BROKER_CLOSES": "20",
    "CARROT_KOMBU_RESTART_CYCLES": "20", "CARROT_KOMBU_STORM_SECONDS": "30",
}


def _ms(s: dict[str, Any]) -> str:
    return f"median {s['median_ms']} ms, p95 {s['p95_ms']} ms, max {s['max_ms']} ms (n={s['n']})"


def _res(r: dict[str, Any]) -> str:
    return f"{r['threads']} threads, {r['fds']} fds, {r['rss_mb']} MB RSS"


def _fatal(f: dict[str, Any]) -> str:
    return (
        f"``{f['error']}`` visible after {f['visible_after_s']} s (first attempt); "
        f"{f['attempts_in_5s']} attempt in 5 s; next retry in {f['next_retry_s']} s"
    )


ROWS: list[tuple[str, str, Callable[[dict[str, Any]], str]]] = [
    ("forced_close_soak", "Forced close soak: proxy ``cut()`` in a row, then ``rabbitmqctl close_connection``", lambda f: (
        f"{f['proxy_cuts']} cuts, every one followed by a working lease; recovery {_ms(f['cut_recovery'])}. "
        f"{f['broker_closes']} broker-side closes: {_ms(f['broker_close_recovery'])} (includes ~0.6 s of rabbitmqctl). "
        f"Broker afterwards: {f['broker_connections']} connection, {f['broker_channels']} channel(s). "
        f"Client before/after the cuts: {_res(f['resources_before'])} / {_res(f['resources_after'])} "
        f"(RSS growth {f['rss_growth_mb']} MB)")),
    ("broker_restart", "Broker restart: ``stop_app``/``start_app`` on a private node", lambda f: (
        f"{f['cycles']} cycles, all recovered; broker ready to usable lease: {_ms(f['ready_to_usable_lease'])} "
        "(Backoff min 0.05 s, max 0.5 s)")),
    ("dead_peer", "Dead peer: proxy ``blackhole()``, application thread busy", lambda f: (
        f"heartbeat {f['heartbeat_s']} s: detected after {f['detection_s']} s (bound 2 x heartbeat + 1 = {f['bound_s']} s), "
        "while the application computed; also while it slept; recovered after ``heal()``")),
    ("blocked", "Blocked: memory alarm on a private node", lambda f: (
        f"``blocked`` event with reason \"{f['reason']}\"; a publish failed with ``Blocked`` after "
        f"{f['publish_failed_after_s']} s and an RPC after {f['rpc_failed_after_s']} s (blocked_timeout "
        f"{f['blocked_timeout_s']} s); no false dead-peer detection while blocked {f['blocked_for_s']} s with "
        "heartbeat 1 s; ``unblocked`` and publishing resumed")),
    ("broker_down_at_start", "Broker down at start: proxy ``refuse()`` 3 s, then ``heal()``", lambda f: (
        f"{f['open_channel_calls']} ``open_channel`` calls meanwhile, slowest {f['open_channel_max_ms']} ms "
        f"(bound 10 ms); connected {f['connected_after_heal_s']} s after heal; delays {f['delays_s']}")),
    ("fatal_wrong_password", "Fatal: wrong password", lambda f: _fatal(f)),
    ("fatal_unknown_vhost", "Fatal: unknown vhost", lambda f: _fatal(f)),
    ("failover", "Failover: two private nodes, ``url1;url2``", lambda f: (
        f"node 1 stopped: on node 2 after {f['to_node2_s']} s; node 2 stopped: back on node 1 after "
        f"{f['back_to_node1_s']} s; ``status().broker`` names the node in use (masked)")),
    ("tls", "TLS: private node with a generated CA", lambda f: (
        f"verified ``amqps://`` connection, {f['threads']} threads of RPCs and 64 KiB publishes on it without error; "
        + "; ".join(f"{k.replace('_', ' ')}: ``{v}`` (fatal, retried every Backoff.max)" for k, v in f["errors"].items()))),
    ("zero_loss", "Zero loss: confirmed ``publish`` from 4 threads while the proxy cuts", lambda f: (
        f"{f['published']} published, {f['confirmed']} confirmed through {f['cuts']} cuts: {f['lost']} lost, "
        f"{f['duplicates']} duplicates (at-least-once), timeouts {f['timeouts'] or 'none'}")),
    ("thread_storm", "Thread storm: mixed work while the proxy cuts every 2 s", lambda f: (
        f"{f['threads']} threads x {f['seconds']} s, {f['cuts']} cuts, {f['reconnects']} reconnects; outcomes "
        + ", ".join(f"{k} {v}" for k, v in f["outcomes"].items())
        + "; no other exception, no deadlock, no frame error in the broker log")),
    ("liveness_restart_recovery", "Broker restart, default ``Backoff()`` (1 s to 30 s): 5 s down", lambda f: (
        f"a lease works {f['usable_after_accepting_s']} s after the node accepts TCP connections again "
        "(goal: 1 s; a TCP probe every 0.25 s during the backoff wait)")),
    ("liveness_dead_peer_tls_consumer", "Dead peer over TLS: 256 KiB messages, peer silent mid-record", lambda f: (
        f"heartbeat {f['heartbeat_s']} s: detected after {f['detected_s']} s (bound 2 x heartbeat + 1 s)")),
    ("liveness_dead_peer_tcp_consumer", "Dead peer over TCP: the same, plain TCP", lambda f: (
        f"heartbeat {f['heartbeat_s']} s: detected after {f['detected_s']} s")),
    ("cluster_stop_leader", "Cluster: connected node (quorum leader) ``stop_app``, 3 confirmed publishers", lambda f: (
        f"longest publishing gap {f['longest_gap_s']} s (goal 0.5 s); {f['confirmed']} confirmed, {f['lost']} lost, "
        f"{f['duplicates']} duplicates (republished or redelivered)")),
    ("cluster_stop_follower", "Cluster: connected node (a follower) ``stop_app``", lambda f: (
        f"longest publishing gap {f['longest_gap_s']} s; {f['confirmed']} confirmed, {f['lost']} lost")),
    ("cluster_kill9", "Cluster: ``kill -9`` of the connected node", lambda f: (
        f"longest publishing gap {f['longest_gap_s']} s; {f['confirmed']} confirmed, {f['lost']} lost")),
    ("cluster_freeze", "Cluster: connected node frozen (SIGSTOP), heartbeat 2 s", lambda f: (
        f"publishing resumed on a healthy node after {f['resumed_after_s']} s (bound {f['bound_s']} s)")),
    ("cluster_classic_queue_node_down", "Cluster: a classic queue's node down", lambda f: (
        "the rest stays usable; ``publish(mandatory=True)`` to it raises ``Unroutable``; its consumer resumed "
        f"{f['consumer_resumed_after_s']} s after the node returned (goal 2 s)")),
    ("cluster_kombu_baseline", "Cluster: plain kombu (``retry=True``, ``confirm_publish``), same fault", lambda f: (
        f"longest publishing gap {f['longest_gap_s']} s; {f['confirmed']} confirmed, {f['lost']} lost")),
    ("consumers_forced_close", "Consumers at scale: ``rabbitmqctl close_connection`` under 1000 consumers", lambda f: (
        f"all {f['consumers']} consumers delivered again {f['back_s']} s after the loss (goal 1.5 s), none lost or "
        f"doubled; {f['threads_added']} threads and {f['rss_kib_per_consumer']} KiB RSS per consumer added")),
    ("consumer_isolation_deleted_queue", "Consumers sharing channels: one queue deleted among 500", lambda f: (
        f"{f['consumers']} consumers on {f['channels']} channels; only its consumer cancelled "
        f"({f['cancelled']} ``consumer_cancelled``); the others: {f['lost']} lost, {f['duplicates']} duplicates")),
    ("consumer_isolation_double_ack", "Consumers sharing channels: a tag acked twice (406 closes the channel)",
     lambda f: (
        f"only the culprit cancelled ({f['cancelled']} ``consumer_cancelled``); its neighbours moved to a new channel "
        f"at once, with no event; {f['lost']} lost, {f['duplicates']} duplicates")),
    ("kombu_suite", "kombu's own ``test_py_amqp.py`` over ``carrot+amqp://``", lambda f: (
        f"{f['passed_carrot']} of {f['tests']} pass (over ``pyamqp://``: {f['passed_pyamqp']}); failing: "
        + (", ".join(f"``{t}``" for t in f["failed_carrot"]) or "none"))),
]


#: The page's charts: file name -> caption.
CHARTS: dict[str, str] = {
    "reliability-recovery.svg": "Recovery after each fault, until a lease works: median, p95 and max where the "
                                "scenario repeats the fault, its one figure otherwise; with the goal.",
    "reliability-detection.svg": "How long until a dead, frozen or blocked peer is noticed, against its bound.",
    "reliability-cluster.svg": "Longest publishing gap when a node of the 3-node cluster fails (and plain kombu "
                               "under the same fault), against the goal.",
}
CHARTS_COMMAND = "python -m integration.report --charts-only"


def _cells(page: str) -> dict[str, str]:
    """Scenario title -> its Measured cell, from the page's table."""
    return {row[0]: row[1] for row in table_rows(page)[1:] if len(row) >= 2}


def _first(pattern: str, text: Optional[str]) -> Optional[float]:
    """The first duration captured by ``pattern`` in ``text`` (None when absent)."""
    found = re.search(pattern, text or "")
    return duration(found.group(1)) if found else None


def _dead_peer_bound(text: Optional[str]) -> Optional[float]:
    """2 x heartbeat + 1 s, the detection bound, from a cell naming ``heartbeat N s``."""
    heartbeat = _first(r"heartbeat ([\d.]+ s)", text)
    return None if heartbeat is None else 2 * heartbeat + 1


def reliability_figures(page: str) -> dict[str, list[Any]]:
    """What the charts show, read from the text of ``docs/reliability.rst`` (rows not measured are left out)."""
    cells = _cells(page)
    cell = {key: cells.get(title) for key, title, _ in ROWS}
    recovery: list[tuple[str, Spread, Optional[float]]] = []
    soak = cell["forced_close_soak"]
    if soak and "median" in soak:
        recovery.append(("proxy cut(), soak", spread(soak), None))
        closes = soak.split("broker-side closes:", 1)[-1]
        recovery.append(("close_connection (incl. ~0.6 s rabbitmqctl)", spread(closes), None))
    restart = cell["broker_restart"]
    if restart and "median" in restart:
        recovery.append(("broker restart, Backoff(min=0.05)", spread(restart), None))
    single = [
        ("broker restart, default Backoff()", _first(r"a lease works ([\d.]+ s)", cell["liveness_restart_recovery"]), 1.0),
        ("broker down at start, after heal", _first(r"connected ([\d.]+ s) after heal", cell["broker_down_at_start"]), None),
    ]
    recovery += [(label, Spread(value), goal) for label, value, goal in single if value is not None]
    detection = [
        ("dead peer, application busy", _first(r"detected after ([\d.]+ s)", cell["dead_peer"]),
         _first(r"= ([\d.]+ s)\)", cell["dead_peer"])),
        ("dead peer over TLS, mid-record", _first(r"detected after ([\d.]+ s)", cell["liveness_dead_peer_tls_consumer"]),
         _dead_peer_bound(cell["liveness_dead_peer_tls_consumer"])),
        ("dead peer over TCP, mid-message", _first(r"detected after ([\d.]+ s)", cell["liveness_dead_peer_tcp_consumer"]),
         _dead_peer_bound(cell["liveness_dead_peer_tcp_consumer"])),
        ("cluster node frozen: publishing resumes", _first(r"after ([\d.]+ s) \(bound", cell["cluster_freeze"]),
         _first(r"\(bound ([\d.]+ s)\)", cell["cluster_freeze"])),
        ("blocked broker: publish raises Blocked", _first(r"``Blocked`` after ([\d.]+ s)", cell["blocked"]),
         _first(r"blocked_timeout ([\d.]+ s)", cell["blocked"])),
    ]
    gap, goal = r"longest publishing gap ([\d.]+ s)", r"\(goal ([\d.]+ s)\)"
    cluster = [
        (label, _first(gap, cell[key]), _first(goal, cell[key])) for key, label in (
            ("cluster_stop_leader", "stop_app: connected node, quorum leader"),
            ("cluster_stop_follower", "stop_app: connected node, a follower"),
            ("cluster_kill9", "kill -9 of the connected node"),
            ("cluster_kombu_baseline", "plain kombu, retry=True (same fault)"),
        )
    ]
    return {
        "recovery": recovery,
        "detection": [row for row in detection if row[1] is not None],
        "cluster": [row for row in cluster if row[1] is not None],
    }


def draw_charts(page: str, into: Path = CHART_DIR) -> list[Path]:
    """Every chart of :data:`CHARTS` that the page has figures for."""
    found = reliability_figures(page)
    drawn = []
    if found["recovery"]:
        drawn.append(spread_chart(into / "reliability-recovery.svg", "Recovery time after a fault (until a lease works)",
                                  found["recovery"]))
    if found["detection"]:
        drawn.append(bar_chart(into / "reliability-detection.svg", "Time until the client notices the fault and acts",
                               found["detection"]))
    if found["cluster"]:
        drawn.append(bar_chart(into / "reliability-cluster.svg", "3-node cluster: longest publishing gap",
                               found["cluster"]))
    return drawn


def render() -> str:
    found = {p.stem: json.loads(p.read_text()) for p in figures_dir().glob("*.json")}
    lines = [
        "Reliability figures",
        "===================",
        "",
        ".. This page is written by ``python -m integration.report``; do not edit it by hand.",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.node() or 'this machine'}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, {_versions()}.",
        "Each row is an integration test in ``integration/`` ("
        + ", ".join(f"``{name}``" for name in SCENARIOS)
        + "); they run in CI, at smaller sizes for the soak, restarts and storm.",
        "",
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 30 70",
        "",
        "   * - Scenario",
        "     - Measured",
    ]
    for key, title, fmt in ROWS:
        lines.append(f"   * - {title}")
        if key in found:
            lines.append(f"     - {fmt(found[key]['figures'])}")
        else:
            lines.append("     - not measured in this run")
    lines.append("")
    lines += charts_section(CHARTS, CHARTS_COMMAND)
    return "\n".join(lines)


def _versions() -> str:
    import amqp
    import kombu

    rabbit = "RabbitMQ ?"
    try:
        out = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, timeout=30)
        rabbit = f"RabbitMQ {out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"kombu {kombu.__version__}, py-amqp {amqp.__version__}, {rabbit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.report")
    parser.add_argument("--render", action="store_true", help="only render the page from recorded figures")
    parser.add_argument("--charts-only", action="store_true",
                        help="only redraw the page's charts from its table (no scenario runs, no page write)")
    args = parser.parse_args(argv)
    if args.charts_only:
        for path in draw_charts(PAGE.read_text()):
            print(f"drew {path.relative_to(ROOT)}")
        return 0
    if not args.render:
        shutil.rmtree(figures_dir(), ignore_errors=True)
        env = dict(os.environ, **FULL_SIZES)
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", *(str(ROOT / "integration" / name) for name in SCENARIOS)],
            cwd=ROOT, env=env,
        )
        if result.returncode != 0:
            print("some scenarios failed: the page lists them as not measured", file=sys.stderr)
    PAGE.write_text(render())
    print(f"wrote {PAGE}")
    for path in draw_charts(PAGE.read_text()):
        print(f"drew {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
