"""Celery worker pools over ``carrot+amqp://`` through broker outages, next to plain ``amqp://``.

Default run (fast): a ``-P gevent`` and a ``-P eventlet`` worker each connect,
run a task, and ride out one cut of every connection by the fault proxy: the
task sent during the cut and the one sent after it each run exactly once.
Before the green-pool support the eventlet worker never connected
(``select.poll`` is gone under eventlet) and the gevent worker never
reconnected after a refused attempt (Celery's retry loop froze it).

Slow (``make test-slow``): every pool (prefork, threads, solo, gevent,
eventlet) through a refusing outage (fault proxy) and a restarted private
node, each on ``carrot+amqp://`` and on plain ``amqp://``: ours must reconnect,
lose nothing and run nothing twice wherever py-amqp does.  The figures are
printed (``-s``); docs/celery.rst has the measured table
(``python -m integration.green_matrix``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from .green_matrix import POOLS, Outcome, run
from .nodes import BrokerNode, private_nodes

#: Generous bounds for a shared 2-core machine: measured ~1 s (cut), ~0.3-2 s (outages).
CUT_RECOVERY_SECONDS = 10.0
OUTAGE_RECOVERY_SECONDS = 20.0


def figure(name: str, outcome: Outcome) -> None:
    values: dict[str, Any] = {k: v for k, v in vars(outcome).items() if k != "worker_log"}
    print(f"\nFIGURE {name}: {json.dumps(values, default=str)}")


@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_a_green_pool_worker_connects_runs_tasks_and_survives_a_cut(pool, tmp_path, amqp_url) -> None:
    outcome = run(pool, "carrot+amqp", "cut", tmp_path, shared_url=amqp_url)
    figure(f"green-cut-{pool}", outcome)
    assert "has no attribute 'poll'" not in outcome.worker_log
    assert outcome.sent == [1, 2, 3], (outcome.send_errors, outcome.worker_log)
    assert outcome.lost == [], outcome.worker_log
    assert outcome.reconnected and outcome.worker_alive, outcome.worker_log
    assert outcome.back_to_first_done is not None and outcome.back_to_first_done < CUT_RECOVERY_SECONDS
    assert outcome.duplicated == []


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    with private_nodes(1) as (private,):
        yield private


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["refuse", "node"])
@pytest.mark.parametrize("pool", POOLS)
def test_every_pool_rides_out_an_outage_wherever_pyamqp_does(pool, outage, tmp_path: Path, amqp_url, request) -> None:
    private = request.getfixturevalue("node") if outage == "node" else None
    theirs = run(pool, "amqp", outage, tmp_path / "amqp", node=private, shared_url=amqp_url)
    ours = run(pool, "carrot+amqp", outage, tmp_path / "carrot", node=private, shared_url=amqp_url)
    figure(f"pools-{outage}-{pool}-amqp", theirs)
    figure(f"pools-{outage}-{pool}-carrot", ours)
    assert ours.sent == [1, 2, 3], (ours.send_errors, ours.worker_log)
    assert ours.reconnected and ours.worker_alive and not ours.lost, ours.worker_log
    assert ours.back_to_first_done is not None and ours.back_to_first_done < OUTAGE_RECOVERY_SECONDS
    assert len(ours.duplicated) <= len(theirs.duplicated), (ours.duplicated, theirs.duplicated)
