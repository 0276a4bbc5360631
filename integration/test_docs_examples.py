"""The examples of ``README.md`` and ``docs/*.rst`` that need RabbitMQ, run as written.

The rules are in :mod:`tests.test_docs_examples`.  The examples name
``localhost:5672`` (guest/guest), so they run only when the integration broker
is that one.  Besides what every example must do, one that needs the broker
must leave nothing behind: no queue and no exchange named by one of its string
literals may exist afterwards unless it existed before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import amqp
import pytest
from amqp.exceptions import NotFound

from tests.test_docs_examples import Program, all_blocks, broker_programs, check_outcome, literal_names, run_program

PROGRAMS = broker_programs()


class Entities:
    """Which queues and exchanges exist (passive declares on a plain py-amqp connection)."""

    def __init__(self) -> None:
        self.conn = amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", connect_timeout=10)
        self.conn.connect()

    def exists(self, kind: str, name: str) -> bool:
        channel = self.conn.channel()
        try:
            if kind == "queue":
                channel.queue_declare(name, passive=True)
            else:
                channel.exchange_declare(name, "direct", passive=True)
        except NotFound:
            return False  # the broker closed this channel
        channel.close()
        return True

    def snapshot(self, names: set[str]) -> set[tuple[str, str]]:
        return {(kind, name) for name in names for kind in ("queue", "exchange") if self.exists(kind, name)}

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def entities(amqp_url: str) -> Iterator[Entities]:
    parsed = urlparse(amqp_url)
    if (parsed.hostname, parsed.port or 5672, parsed.username, parsed.password) not in {
        ("127.0.0.1", 5672, "guest", "guest"), ("localhost", 5672, "guest", "guest"),
    }:
        pytest.skip("the examples are written for guest:guest@localhost:5672; CARROT_KOMBU_TEST_URL points elsewhere")
    checker = Entities()
    try:
        yield checker
    finally:
        checker.close()


def test_some_examples_need_the_broker() -> None:
    assert PROGRAMS, "no example names an amqp:// URL: the README's usage example must"
    assert any(p.blocks[0].page == "README.md" for p in PROGRAMS)


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.label for p in PROGRAMS])
def test_example_runs_against_rabbitmq(program: Program, entities: Entities, tmp_path: Path) -> None:
    names = literal_names(program.code)
    before = entities.snapshot(names)
    outcome = run_program(program, tmp_path)
    check_outcome(program, outcome)
    left = entities.snapshot(names) - before
    deadline = time.monotonic() + 3  # exclusive queues go with their connection, a moment later
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = entities.snapshot(names) - before
    assert not left, f"{program.label} left {sorted(left)} on the broker: delete what the example creates"


def test_the_celery_pytest_plugin_recipe_works_as_written(entities: Entities, tmp_path: Path) -> None:
    """docs/celery.rst: under Celery's pytest plugin the carrot scheme is unknown until ``-p carrot_kombu``."""
    (block,) = [b for b in all_blocks() if b.page == "docs/celery.rst" and "def celery_config" in b.code]
    (tmp_path / "test_tasks.py").write_text(block.code, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("CARROT_KOMBU_URL", "CELERY_BROKER_URL", "PYTHONPATH")}

    def pytest_run(*plugins: str) -> subprocess.CompletedProcess[str]:
        options = [arg for plugin in plugins for arg in ("-p", plugin)]
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *options, "test_tasks.py"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )

    try:
        without = pytest_run("celery.contrib.pytest")
        assert without.returncode != 0 and "KeyError: 'No such transport: carrot'" in without.stdout, without.stdout
        recipe = pytest_run("celery.contrib.pytest", "carrot_kombu")
        assert recipe.returncode == 0 and "1 passed" in recipe.stdout, recipe.stdout + recipe.stderr
    finally:
        with amqp.Connection("127.0.0.1:5672", userid="guest", password="guest", connect_timeout=10) as conn:
            channel = conn.channel()
            channel.queue_delete("docs-celery-pytest")
            channel.exchange_delete("docs-celery-pytest")
