"""Celery through the ``carrot+amqp://`` kombu transport: real workers, a producer process, real outages.

Every scenario runs real processes (``celery worker`` and a producer process that
calls ``.delay()``, see :mod:`integration.celery_apps`); faults come from the fault
proxy and from a private node, never from the shared broker.  The measured figures
are printed (``pytest -s``) and asserted against the user's expectations.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import pytest

from carrot_kombu import ConnectionManager

from .broker import connection_pids, rabbitmqctl, unique
from .celery_apps import AppModule, Producer, broker_sockets, celery_worker, wait_for, write_app
from .nodes import BrokerNode, private_nodes
from .proxy import FaultProxy

#: Celery's default ``task_publish_retry_policy``: 3 retries, 0 s / 0.2 s / 0.2 s apart.
POLICY_SECONDS = 0.4


def carrot(url: str) -> str:
    return f"carrot+{url}"


def figure(name: str, **values: Any) -> None:
    print(f"\nFIGURE {name}: {json.dumps(values, default=str)}")


def port_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def connections_named(names: list[str]) -> dict[str, int]:
    """How many connections the broker holds per ``connection_name`` (one rabbitmqctl call)."""
    out = rabbitmqctl("list_connections", "client_properties", "-q", "--no-table-headers")
    return {name: out.count(f'{{"connection_name","{name}"}}') for name in names}


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., AppModule]:
    """App modules with unique module and queue names, in this test's temp dir."""

    def make(broker_url: str, queue: str = "", **config: Any) -> AppModule:
        name = unique("ckapp").replace("-", "_")
        return write_app(tmp_path / name, name, broker_url, queue or unique("ck-celery-q"), **config)

    return make


class SharedBroker:
    """The test's own look at the shared broker; deletes the queues (and exchanges) Celery declared there."""

    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager
        self._queues: list[str] = []

    def owns(self, app: AppModule) -> AppModule:
        self._queues.append(app.queue)
        return app

    def queued(self, queue: str) -> int:
        with self.manager.channel() as lease:
            return int(lease.queue_declare(queue, passive=True)[1])

    def take_task_args(self, queue: str) -> set[Any]:
        """Empty ``queue``; the first argument of every task message (Celery protocol 2)."""
        args = set()
        with self.manager.channel() as lease:
            while (message := lease.basic_get(queue, no_ack=True)) is not None:
                args.add(json.loads(message.body)[0][0])
        return args

    def delete_owned(self) -> None:
        with self.manager.channel() as lease:
            for queue in self._queues:
                lease.queue_delete(queue)
                lease.exchange_delete(queue)  # Celery's default: a direct exchange named as the queue


@pytest.fixture
def shared(amqp_url: str) -> Iterator[SharedBroker]:
    manager = ConnectionManager(amqp_url, backoff={"min": 0.1, "max": 1.0},
                                client_properties={"connection_name": unique("ck-tc-test")}).start(wait=10)
    broker = SharedBroker(manager)
    try:
        yield broker
        broker.delete_owned()
    finally:
        manager.stop(timeout=10)


@pytest.fixture(scope="module")
def node() -> Iterator[BrokerNode]:
    """One private node for the tests that restart a broker or count its refused logins."""
    with private_nodes(1) as (private,):
        yield private


def proxy_to(url: str) -> FaultProxy:
    parsed = urlparse(url)
    return FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672)


# -- 1. one AMQP connection per process under load ----------------------------------------------------------


@pytest.mark.parametrize("pool, concurrency", [("prefork", 2), ("threads", 4)])
def test_worker_and_producer_hold_one_connection_each_under_load(make_app, shared, amqp_url, pool, concurrency):
    """8 producer threads x 25 tasks through a real worker: every result, one connection per process.

    Worker and producer each reach the broker through their own proxy, so
    ``accepted`` counts every connection they ever made (also short-lived
    ones a sample would miss); samples of each process's sockets and the
    broker's named connections during the run show at most one at a time.
    """
    with proxy_to(amqp_url) as worker_proxy, proxy_to(amqp_url) as producer_proxy:
        worker_app = shared.owns(make_app(carrot(worker_proxy.url())))
        producer_app = make_app(carrot(producer_proxy.url()), queue=worker_app.queue)
        with celery_worker(worker_app, pool, concurrency) as worker, Producer(producer_app) as producer:
            warm = producer.call("delay", result_timeout=60)
            assert warm.get("value") == 7, (warm, worker.output())

            most: dict[int, int] = {}
            sampling = threading.Event()

            def sample() -> None:
                while not sampling.is_set():
                    for pid in [producer.pid, *worker.pids()]:
                        port = producer_proxy.port if pid == producer.pid else worker_proxy.port
                        most[pid] = max(most.get(pid, 0), broker_sockets(pid, port))
                    sampling.wait(0.01)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                burst = producer.call("burst", threads=8, per_thread=25, timeout=60, wait=90)
                processes = [producer.pid, *worker.pids()]
                named = connections_named([f"carrot_kombu pid={pid}" for pid in processes])
            finally:
                sampling.set()
                sampler.join(5)
            figure(f"load-{pool}", results=len(burst["results"]), seconds=round(burst["elapsed"], 2),
                   errors=burst["errors"], worker_processes=len(processes) - 1, max_sockets=most,
                   broker_named=named, accepted={"worker": worker_proxy.accepted, "producer": producer_proxy.accepted})

            assert burst["results"] == list(range(200)), (burst["errors"], worker.output())
            assert producer_proxy.accepted == 1  # the producer made one connection in all
            assert named[f"carrot_kombu pid={producer.pid}"] == 1
            assert max(most.values()) == 1, most
            # each worker process that used the broker holds exactly one connection, and none made more
            worker_named = {pid: named[f"carrot_kombu pid={pid}"] for pid in worker.pids()}
            assert named[f"carrot_kombu pid={worker.pid}"] == 1, worker_named
            assert set(worker_named.values()) <= {0, 1}, worker_named
            assert worker_proxy.accepted == sum(worker_named.values()), (worker_proxy.accepted, worker_named)
            if pool == "prefork":
                assert sum(worker_named.values()) >= 2  # the parent and at least one pool child
        assert worker.proc.returncode == 0, worker.output()


# -- 2. outages ---------------------------------------------------------------------------------------


def test_delay_fails_within_the_retry_policy_while_the_broker_refuses(make_app, shared, amqp_url):
    """``.delay()`` against a refusing broker raises after Celery's retry policy, not after minutes."""
    with proxy_to(amqp_url) as proxy:
        app = shared.owns(make_app(carrot(proxy.url()), backend=None))
        with Producer(app) as producer:
            assert "error" not in producer.call("delay")  # connected, the queue declared
            proxy.cut()
            proxy.refuse()
            after_loss = [producer.call("delay") for _ in range(3)]
        with Producer(app) as fresh:  # never connected: the first connection is refused
            never_connected = [fresh.call("delay") for _ in range(3)]

    def seconds(answers: list[dict[str, Any]]) -> list[float]:
        return [round(a["failed"] - a["started"], 3) for a in answers if "failed" in a]

    figure("refused", after_loss=seconds(after_loss), never_connected=seconds(never_connected),
           errors=sorted({a.get("error", "")[:120] for a in after_loss + never_connected}),
           attempts_through_proxy=proxy.accepted)
    for answers in (after_loss, never_connected):
        assert all("error" in a for a in answers), answers
        assert all("OperationalError" in a["error"] for a in answers), answers
        assert max(seconds(answers)) < POLICY_SECONDS + 2.0, answers


def test_producer_and_worker_resume_within_2s_of_a_broker_restart(make_app, node):
    """A ~5 s outage of a private node: ``.delay()``, the worker and the producer's results resume within 2 s.

    After the first ``.delay()`` that works again, one task goes from a new
    thread (a new rpc:// result consumer: times the worker) and one from the
    producer thread whose result consumer was subscribed before the outage.
    """
    app = make_app(carrot(node.url))
    with celery_worker(app, "threads", 2) as worker, Producer(app) as producer:
        warm = producer.call("delay", result_timeout=60)
        assert warm.get("value") == 7, (warm, worker.output())

        node.stop_app()
        down_at = time.monotonic()
        assert not port_accepts(node.port)
        resumed: dict[str, Any] = {}
        poller = threading.Thread(
            target=lambda: resumed.update(producer.call("delay_until_ok", timeout=60, result_timeout=10, wait=120)))
        poller.start()
        try:
            time.sleep(max(0.0, down_at + 5.0 - time.monotonic()))  # the outage itself
            starting = threading.Thread(target=node.start_app)
            starting.start()
            assert wait_for(lambda: port_accepts(node.port), timeout=60, interval=0.02)
            up_at = time.monotonic()
            starting.join(60)
        finally:
            poller.join(120)
        worker_log = "\n".join(line for line in worker.output(20000).splitlines()
                               if "consumer:" in line or "carrot_kombu" in line or "Trying again" in line)

    def after_up(answer: dict[str, Any], key: str) -> Any:
        return round(answer[key] - up_at, 2) if key in answer else None

    fresh, same = resumed.get("fresh", {}), resumed.get("same_thread", {})
    figure("restart", outage_s=round(up_at - down_at, 2), failed_delays=resumed.get("failures"),
           last_error=resumed.get("last_error", "")[:160], producer_resumed_after_s=after_up(resumed, "sent"),
           worker_result_after_s=after_up(fresh, "got"), same_thread_result_after_s=after_up(same, "got"),
           fresh=fresh, same_thread=same)
    assert "sent" in resumed, (resumed, producer.output())
    late = []
    if resumed["sent"] - up_at > 2.0:
        late.append(f".delay() works again {after_up(resumed, 'sent')} s after the broker is back")
    if fresh.get("value") != 7 or fresh["got"] - up_at > 2.0:
        late.append(f"the worker: a new task's result {after_up(fresh, 'got')} s after the broker is back ({fresh})")
    if same.get("value") != 7 or same["got"] - up_at > 2.0:
        late.append(f"the producer thread subscribed before the outage: result {after_up(same, 'got')} s ({same})")
    assert not late, "\n".join(late) + "\n--- worker log ---\n" + worker_log[-2000:]


def test_silent_broker_is_detected_within_two_heartbeats(make_app, shared, amqp_url):
    """``broker_heartbeat = 2``: a black-holed broker is reported ``disconnected`` within 2 x 2 + 1 s."""
    with proxy_to(amqp_url) as proxy:
        app = shared.owns(make_app(carrot(proxy.url()), backend=None, broker_heartbeat=2))
        with Producer(app) as producer:
            assert "error" not in producer.call("delay")
            watched = producer.call("watch_disconnect")
            proxy.blackhole()
            silent_at = time.monotonic()
            seen = wait_for(lambda: producer.call("disconnects")["at"], timeout=25, interval=0.2)
            proxy.heal()
    detected = round(seen[0] - silent_at, 2) if seen else None
    figure("blackhole", manager=watched["manager"], heartbeat=watched["heartbeat"], detected_after_s=detected)
    assert seen, f"no 'disconnected' within 25 s of a black hole ({watched})"
    assert detected is not None and detected <= 2 * 2 + 1, (
        f"'disconnected' {detected} s after the black hole; the manager carrying Celery's connections "
        f"runs with heartbeat={watched['heartbeat']} s, not broker_heartbeat=2 ({watched['manager']})")


def test_wrong_password_does_not_hammer_the_broker(make_app, node):
    """8 threads calling ``.delay()`` for 5 s with a wrong password: a handful of logins, not hundreds."""
    attempts: dict[str, int] = {}
    outcome: dict[str, Any] = {}
    for scheme, url in (("carrot", carrot(node.url.replace(":guest@", ":wrong@"))),
                        ("amqp", node.url.replace(":guest@", ":wrong@"))):
        with proxy_to(node.url) as proxy:
            app = make_app(url.replace(f"127.0.0.1:{node.port}", proxy.url_hostport), backend=None)
            refused_before = node.log_text().lower().count("login refused")
            with Producer(app) as producer:
                outcome[scheme] = producer.call("storm", threads=8, seconds=5.0, wait=60)
            attempts[scheme] = proxy.accepted
            wait_for(lambda: node.log_text().lower().count("login refused") - refused_before >= attempts[scheme],
                     timeout=5, interval=0.2)
            outcome[scheme]["refused_in_broker_log"] = node.log_text().lower().count("login refused") - refused_before
    figure("wrong-password", logins=attempts, outcome=outcome)
    assert outcome["carrot"]["errors"].get("AccessRefused", 0) == outcome["carrot"]["calls"], outcome
    assert attempts["carrot"] <= 3, attempts
    assert attempts["amqp"] >= 100, attempts  # the baseline does hammer: the measure is sound


# -- 3. confirmed publishing per connection ---------------------------------------------------------------------


def test_confirm_publish_per_connection(make_app, shared, amqp_url):
    """``confirm_publish``: ``.delay()`` is confirmed; a publish to a missing exchange raises promptly."""
    app = shared.owns(make_app(carrot(amqp_url), backend=None, broker_transport_options={"confirm_publish": True}))
    with Producer(app) as producer:
        sent = producer.call("delay")
        name = f"carrot_kombu pid={producer.pid}"
        (connection,) = connection_pids(name)
        channels = rabbitmqctl("list_channels", "connection", "confirm", "-q", "--no-table-headers")
        confirm_modes = [line.split("\t")[1] for line in channels.splitlines() if line.startswith(connection + "\t")]
        missing = producer.call("publish_missing_exchange", exchange=unique("missing-x"), wait=60)
        after = producer.call("delay")
    queued = shared.queued(app.queue)
    figure("confirm", delay_s=round(sent["sent"] - sent["started"], 3), channel_confirm_modes=confirm_modes,
           missing_exchange=missing, queued=queued)
    assert "error" not in sent and "error" not in after, (sent, after)
    assert queued == 2
    assert "true" in confirm_modes, confirm_modes  # the publishing channel is in confirm mode
    assert "NotFound" in missing["error"] or "404" in missing["error"], missing
    assert missing["elapsed"] < 5.0, missing


# -- 4. fire-and-forget under a silent broker ----------------------------------------------------------------------


def _fire_through_a_black_hole(make_app, shared, amqp_url: str, scheme: str) -> dict[str, Any]:
    """200 ``.delay()`` calls; the proxy goes silent after 100 for 8 s.  Which ``ok`` calls arrived?"""
    with proxy_to(amqp_url) as proxy:
        url = proxy.url() + "?heartbeat=2"
        app = shared.owns(make_app(carrot(url) if scheme == "carrot" else url, backend=None))
        with Producer(app) as producer:
            first = producer.call("fire", count=100, start=0, pause=0.01)
            proxy.blackhole()
            silent_at = time.monotonic()
            second: dict[str, Any] = {}
            firing = threading.Thread(target=lambda: second.update(  # spans the 8 s black hole
                producer.call("fire", count=100, start=100, pause=0.08, wait=180)))
            firing.start()
            try:
                time.sleep(max(0.0, silent_at + 8.0 - time.monotonic()))
                proxy.heal()
            finally:
                firing.join(180)
            ok = first["ok"] + second.get("ok", [])
            errors = first["errors"] + second.get("errors", [])

            last, stable_since = -1, time.monotonic()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and time.monotonic() - stable_since < 3:  # until it settles
                count = shared.queued(app.queue)
                if count != last:
                    last, stable_since = count, time.monotonic()
                time.sleep(0.2)
    arrived = shared.take_task_args(app.queue)
    lost = sorted(set(ok) - arrived)
    return {"ok": len(ok), "failed": len(errors), "arrived": len(arrived), "lost": len(lost),
            "errors": sorted({e[:100] for e in errors})[:3]}


def test_fire_and_forget_loses_no_more_than_py_amqp_under_a_silent_broker(make_app, shared, amqp_url):
    """No confirms, a broker silent for 8 s mid-way: ``.delay()`` calls that returned but never arrived.

    Both apps are the same but for the scheme, both with ``?heartbeat=2`` in the
    URL so that the silence outlasts the heartbeat window of each (carrot_kombu
    then drops the connection; the broker drops py-amqp's, which never notices).
    """
    results = {scheme: _fire_through_a_black_hole(make_app, shared, amqp_url, scheme) for scheme in ("carrot", "amqp")}
    figure("fire-and-forget", **results)
    assert results["carrot"]["ok"] + results["carrot"]["failed"] == 200
    assert results["carrot"]["lost"] <= results["amqp"]["lost"], results
