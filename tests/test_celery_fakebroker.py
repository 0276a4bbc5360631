"""Celery on ``carrot+amqp://`` and ``carrot_kombu.celery`` over the scripted fake broker (no worker)."""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from celery import Celery, signals
from click.testing import CliRunner

import carrot_kombu  # noqa: F401 - registers carrot+amqp://
from carrot_kombu import ConnectionState, transport
from carrot_kombu.celery import carrot_kombu_command, install, manager_for, uninstall
from tests.fakebroker import FakeBroker


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake
        with transport._registry_lock:
            keys = [k for k in transport._registry if any(f":{fake.port}/" in u for u in k[1])]
            entries = [transport._registry.pop(k) for k in keys]
        for entry in entries:
            entry.manager.stop(timeout=5)


@pytest.fixture
def app(broker: FakeBroker) -> Iterator[Celery]:
    app = Celery("fake", broker=f"carrot+amqp://guest:guest@127.0.0.1:{broker.port}//?heartbeat=0",
                 set_as_current=False)
    app.conf.broker_connection_retry_on_startup = False
    yield app
    uninstall(app)


def test_send_task_and_manager_for_share_one_amqp_connection(app, broker):
    manager = install(app)
    assert manager.state is ConnectionState.STOPPED  # started by the worker's signals or on first use
    app.send_task("tasks.add", args=(2, 3))
    peer = broker.accept()
    peer.wait_for(lambda: peer.published)
    (task,) = peer.published
    assert task.routing_key == "celery"
    assert task.properties["application_headers"]["task"] == "tasks.add"
    assert json.loads(task.body)[0] == [2, 3]
    manager_for(app).publish({"event": 1}, routing_key="events", timeout=5)
    assert [p.routing_key for p in peer.published] == ["celery", "events"]
    assert len(broker.peers) == 1  # Celery's producer and the app's manager: one AMQP connection


def test_worker_init_starts_the_manager_except_in_a_prefork_parent(app, broker):
    manager = install(app)
    assert install(app) is manager  # once per app

    class Prefork:
        __module__ = "celery.concurrency.prefork"

    class Solo:
        __module__ = "celery.concurrency.solo"

    class Worker:  # what Celery passes as the sender of worker_init
        def __init__(self, app: Celery, pool_cls: type) -> None:
            self.app, self.pool_cls = app, pool_cls

    other = Celery("other", broker="memory://", set_as_current=False)
    signals.worker_init.send(sender=Worker(other, Solo))
    signals.worker_init.send(sender=Worker(app, Prefork))
    assert manager.state is ConnectionState.STOPPED  # another app's worker, or a prefork parent: not us
    signals.worker_init.send(sender=Worker(app, Solo))
    assert manager.wait_connected(5)
    broker.accept().wait_open()
    signals.worker_shutdown.send(sender=None)
    assert manager.state is ConnectionState.STOPPED


def test_install_with_overrides_builds_its_own_manager(broker):
    app = Celery("own", broker=f"amqp://guest:guest@127.0.0.1:{broker.port}//", set_as_current=False)
    try:
        manager = install(app, heartbeat=0, pool_limit=2)
        assert manager.settings.pool_limit == 2
        assert manager_for(app).wait_connected(5)  # started on first use
        with manager.channel(timeout=5) as lease:
            lease.queue_declare("from-celery")
        peer = broker.accept()
        assert [m["queue"] for m in peer.received("queue.declare")] == ["from-celery"]
    finally:
        uninstall(app)
    uninstall(app)  # a second uninstall is harmless


def test_the_celery_command_checks_the_apps_broker_with_its_credentials(broker):
    app = Celery("cmd", broker=f"amqp://127.0.0.1:{broker.port}", set_as_current=False)
    app.conf.broker_user, app.conf.broker_password, app.conf.broker_vhost = "alice", "s3cret", "jobs"
    result = CliRunner().invoke(carrot_kombu_command, ["--json", "--timeout", "5"], obj=SimpleNamespace(app=app))
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["healthy"] is True
    assert "s3cret" not in result.output
    peer = broker.accept()
    assert peer.login[1:] == ("alice", "s3cret") and peer.virtual_host == "jobs"


def test_the_celery_command_fails_when_the_broker_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Celery("down", broker=f"carrot+amqp://guest:guest@127.0.0.1:{port}//", set_as_current=False)
    result = CliRunner().invoke(carrot_kombu_command, ["--json", "--timeout", "2"], obj=SimpleNamespace(app=app))
    assert result.exit_code != 0
    report: dict[str, Any] = json.loads(result.output)
    assert report["healthy"] is False and report["error"]
