"""carrot_kombu.metrics on memory:// and faulty://: what a scrape shows is what happened."""

from __future__ import annotations

import base64
import io
import json
import pathlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Optional

import kombu
import pytest

from carrot_kombu import ConnectionManager, Disconnected, PoolTimeout, cli, metrics
from carrot_kombu._deadline import Deadline
from carrot_kombu._metrics import Histogram, Metrics

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "contrib" / "grafana"

#: The names issue 19 fixed for good (never renamed).
STABLE = (
    "carrot_kombu_connected", "carrot_kombu_blocked", "carrot_kombu_reconnects_total",
    "carrot_kombu_connection_attempts_total", "carrot_kombu_published_total",
    "carrot_kombu_publish_confirm_seconds", "carrot_kombu_pending_confirms", "carrot_kombu_pool_leased",
    "carrot_kombu_pool_idle", "carrot_kombu_pool_waiting", "carrot_kombu_pool_wait_seconds",
    "carrot_kombu_consumers", "carrot_kombu_degraded", "carrot_kombu_delivered_total",
)


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def registry():
    registry = CollectorRegistry()
    metrics.register(registry)
    yield registry
    metrics.unregister(registry)


@pytest.fixture
def managers():
    made: list[ConnectionManager] = []

    def make(url="memory://", name=None, start=True, **options):
        if name is not None:
            options["client_properties"] = {"connection_name": name}
        options.setdefault("backoff", {"min": 0.01, "max": 0.05, "jitter": False})
        manager = ConnectionManager(url, **options)
        made.append(manager)
        if start:
            manager.start(wait=5)
        return manager

    yield make
    for manager in made:
        manager.stop(timeout=5)


def scrape(registry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(registry, name, manager, **labels):
    key = (name, tuple(sorted({"manager": manager, **labels}.items())))
    return scrape(registry).get(key)


def test_every_stable_name_is_exported_for_a_manager(registry, managers):
    managers(name="names")
    exposed = {name for name, _labels in scrape(registry)}
    for name in STABLE:
        if name.endswith("_seconds"):
            assert {name + "_bucket", name + "_count", name + "_sum"} <= exposed, name
        else:
            assert name in exposed, name


def test_a_publish_is_counted_confirmed_with_its_latency(registry, managers):
    manager = managers(name="publisher")
    before = value(registry, "carrot_kombu_publish_confirm_seconds_count", "publisher")
    manager.publish_many([b"a", b"b", b"c"], routing_key="metrics-q")
    manager.publish(b"d", routing_key="metrics-q")
    assert value(registry, "carrot_kombu_published_total", "publisher", outcome="confirmed") == 4
    for outcome in ("nacked", "returned", "timeout", "failed"):
        assert value(registry, "carrot_kombu_published_total", "publisher", outcome=outcome) == 0
    assert value(registry, "carrot_kombu_publish_confirm_seconds_count", "publisher") == before + 4
    assert value(registry, "carrot_kombu_publish_confirm_seconds_sum", "publisher") > 0
    assert value(registry, "carrot_kombu_pending_confirms", "publisher") == 0


def test_a_publish_after_stop_is_counted_failed(registry, managers):
    manager = managers(name="stopped-publisher")
    core = manager._core
    manager.stop()
    with pytest.raises(Disconnected):
        # Past the facade's own check (which refuses before anything is
        # admitted): the publisher itself refuses, the manager being stopped.
        core.publisher.publish_many([b"x"], exchange="", routing_key="q", headers=None, serializer=None,
                                    mandatory=False, deadline=Deadline.after(1), properties={})
    assert value(registry, "carrot_kombu_published_total", "stopped-publisher", outcome="failed") == 1


def test_outcomes_map_to_the_exported_names():
    m = Metrics()
    settled = [SimpleNamespace(outcome=o, settled_at=10.5) for o in
               ("ack", "nack", "returned", "rejected", "aborted", "blocked", None)]
    passed = SimpleNamespace(expired=lambda: True)
    m.publish_ended(settled, started=10.0, deadline=passed)
    m.publish_ended([SimpleNamespace(outcome=None, settled_at=0.0)], started=10.0,
                    deadline=SimpleNamespace(expired=lambda: False))
    assert m.published == {"confirmed": 1, "nacked": 1, "returned": 1, "timeout": 1, "failed": 4}
    counts, total = m.confirm_seconds.cumulative()
    assert counts[-1] == 1 and total == pytest.approx(0.5)


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.0, 1.0, 2.0), Metrics(), "test")  # 0.0: value <= bound, as Prometheus's le
    for v in (0.0, 0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    counts, total = h.cumulative()
    assert counts == [1, 3, 4, 5]  # le=0, le=1 (1.0 included), le=2, +Inf
    assert total == 6.0


def test_pool_gauges_and_wait_time_follow_the_pool(registry, managers):
    manager = managers(name="pool", pool_limit=1)
    lease = manager.open_channel()
    assert value(registry, "carrot_kombu_pool_leased", "pool") == 1
    waited_before = value(registry, "carrot_kombu_pool_wait_seconds_count", "pool")
    got = []
    waiter = threading.Thread(target=lambda: got.append(manager.open_channel(timeout=5)))
    waiter.start()
    assert wait_until(lambda: value(registry, "carrot_kombu_pool_waiting", "pool") == 1)
    time.sleep(0.02)  # a measurable wait (not a synchronisation: the waiter is already waiting)
    lease.release()
    waiter.join(5)
    assert got and value(registry, "carrot_kombu_pool_waiting", "pool") == 0
    got[0].release()
    assert waited_before == 0  # the first lease did not wait: not observed
    assert value(registry, "carrot_kombu_pool_wait_seconds_count", "pool") == 1
    assert value(registry, "carrot_kombu_pool_wait_seconds_bucket", "pool", le="0.01") == 0
    assert value(registry, "carrot_kombu_pool_wait_seconds_sum", "pool") >= 0.02
    assert value(registry, "carrot_kombu_pool_idle", "pool") == 1


def test_a_pool_timeout_counts_its_wait_and_leaves_nobody_waiting(registry, managers):
    manager = managers(name="pool-timeout", pool_limit=1)
    with manager.channel():
        with pytest.raises(PoolTimeout):
            manager.open_channel(timeout=0.05)
    assert value(registry, "carrot_kombu_pool_waiting", "pool-timeout") == 0
    assert value(registry, "carrot_kombu_pool_wait_seconds_count", "pool-timeout") == 1
    # Measured from when it started waiting, a little after its timeout started.
    assert 0.03 <= value(registry, "carrot_kombu_pool_wait_seconds_sum", "pool-timeout") < 5


def test_consumers_and_deliveries(registry, managers):
    manager = managers(name="consumer")
    got = threading.Event()
    seen = []

    def callback(body, message):
        seen.append(body)
        message.ack()
        if len(seen) == 3:
            got.set()

    consumer = manager.consume(kombu.Queue("metrics-consume"), callback)
    assert value(registry, "carrot_kombu_consumers", "consumer") == 1
    manager.publish_many([b"1", b"2", b"3"], routing_key="metrics-consume")
    assert got.wait(5)
    assert wait_until(lambda: value(registry, "carrot_kombu_delivered_total", "consumer") == 3)
    consumer.cancel()
    assert value(registry, "carrot_kombu_consumers", "consumer") == 0
    assert value(registry, "carrot_kombu_delivered_total", "consumer") == 3  # a counter never goes back


def test_connected_attempts_and_reconnects_through_a_cut(registry, managers, faults):
    manager = managers("faulty://", name="faulty")
    assert value(registry, "carrot_kombu_connected", "faulty") == 1
    assert value(registry, "carrot_kombu_reconnects_total", "faulty") == 0
    faults.refuse = 2  # the next two attempts fail: connected stays 0 meanwhile
    faults.cut()
    assert wait_until(lambda: value(registry, "carrot_kombu_connected", "faulty") == 0)
    assert manager.wait_connected(5)
    assert value(registry, "carrot_kombu_connected", "faulty") == 1
    assert value(registry, "carrot_kombu_reconnects_total", "faulty") == 1
    assert value(registry, "carrot_kombu_connection_attempts_total", "faulty") == 4  # 1 + 2 refused + 1


def test_counters_survive_stop_and_start(registry, managers):
    manager = managers(name="restart")
    manager.publish(b"x", routing_key="q")
    manager.stop()
    assert value(registry, "carrot_kombu_connected", "restart") == 0
    manager.start(wait=5)
    assert value(registry, "carrot_kombu_published_total", "restart", outcome="confirmed") == 1
    assert value(registry, "carrot_kombu_connection_attempts_total", "restart") == 2
    assert value(registry, "carrot_kombu_reconnects_total", "restart") == 0  # a start() is not a reconnect


def test_labels_connection_name_default_and_duplicates(registry, managers):
    named = managers(name="orders", start=False)
    twin = managers(name="orders", start=False)
    anonymous = managers(start=False)
    labels = {dict(labels)["manager"] for name, labels in scrape(registry) if name == "carrot_kombu_connected"}
    seq = {m: m._core.metrics.sequence for m in (named, twin, anonymous)}
    assert "orders" in labels and f"orders #{seq[twin]}" in labels  # the first keeps the name
    assert any(re.fullmatch(rf"carrot_kombu pid=\d+ #{seq[anonymous]}", label) for label in labels)


def test_a_label_is_kept_for_the_managers_life_and_never_shared(registry, managers):
    """A series that changed its name mid-life broke rate(); one label for two managers merged them (red team 19.4)."""
    first = managers(name="y")
    first.publish(b"x", routing_key="q")
    assert value(registry, "carrot_kombu_published_total", "y", outcome="confirmed") == 1
    twin = managers(name="y")
    managers(name=f"y #{twin._core.metrics.sequence}")  # another, literally named the twin's suffixed name
    lines = [line for line in generate_latest(registry).decode().splitlines()
             if line.startswith('carrot_kombu_connected{manager="y')]  # (other tests' managers may linger)
    assert len(lines) == len(set(lines)) == 3, lines  # no two series alike
    assert value(registry, "carrot_kombu_published_total", "y", outcome="confirmed") == 1  # still "y"


def test_the_connection_name_of_transport_options_labels_too(registry, managers):
    # How Celery's broker_transport_options reach the carrot+amqp:// transport's managers.
    managers(start=False, transport_options={"client_properties": {"connection_name": "celery-worker"}})
    assert value(registry, "carrot_kombu_connected", "celery-worker") == 0


def test_one_collector_serves_managers_made_after_registration(registry, managers):
    assert metrics.register(registry) is metrics.register(registry)  # idempotent: no duplicate series
    managers(name="later")
    assert value(registry, "carrot_kombu_connected", "later") == 1


def test_text_without_prometheus_client_matches_the_collector(registry, managers):
    manager = managers(name="text")
    manager.publish(b"x", routing_key="q")
    families = metrics.collect()

    def this_test(key: tuple[str, tuple[tuple[str, str], ...]]) -> bool:
        # Managers other tests of this worker left for the garbage collector
        # may go between the two readings: compare this test's own series.
        return dict(key[1]).get("manager", "text") == "text"

    ours = {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.text(families)) for s in f.samples}
    ours = {k: v for k, v in ours.items() if this_test(k)}
    theirs = {k: v for k, v in scrape(registry).items() if not k[0].endswith("_created") and this_test(k)}
    assert ours == theirs and ours


def _referenced_names(text: str) -> set[str]:
    return set(re.findall(r"\bcarrot_kombu_[a-z_]+", text))


@pytest.mark.parametrize("path", ["dashboard.json", "alerts.yml"])
def test_the_grafana_dashboard_and_alerts_name_only_exported_metrics(registry, managers, path):
    managers(name="grafana")
    exposed = {name for name, _labels in scrape(registry)}
    source = (GRAFANA / path).read_text()
    if path.endswith(".json"):
        json.loads(source)  # valid JSON (Grafana imports it as is)
    referenced = _referenced_names(source)
    assert referenced, "no metric referenced"
    assert referenced <= exposed, referenced - exposed


def test_the_alerts_cover_what_issue_19_asks_for():
    source = (GRAFANA / "alerts.yml").read_text()
    for name in ("carrot_kombu_connected", "carrot_kombu_reconnects_total",
                 "carrot_kombu_publish_confirm_seconds_bucket", "carrot_kombu_pool_waiting", "carrot_kombu_blocked"):
        assert name in source, name


def test_every_metric_is_documented():
    page = (ROOT / "docs" / "metrics.rst").read_text()
    for name in metrics.NAMES:
        assert f"``{name}``" in page, name


def test_cli_metrics_prints_one_scrape_of_its_manager():
    out = io.StringIO()
    assert cli.metrics("memory://", 5.0, out=out) == cli.EXIT_OK
    samples = {(s.name, s.labels.get("manager")): s.value
               for f in text_string_to_metric_families(out.getvalue()) for s in f.samples}
    assert samples[("carrot_kombu_connected", cli.METRICS_CONNECTION_NAME)] == 1
    assert samples[("carrot_kombu_pool_idle", cli.METRICS_CONNECTION_NAME)] == 1  # the channel it took
    assert {label for _name, label in samples} == {cli.METRICS_CONNECTION_NAME}


def test_no_idle_channel_is_counted_once_the_manager_stopped(registry, managers):
    manager = managers(name="stopping")
    with manager.channel():
        pass
    assert value(registry, "carrot_kombu_pool_idle", "stopping") == 1
    manager.stop()
    assert value(registry, "carrot_kombu_pool_idle", "stopping") == 0  # was 1 (red team 19.11)
    assert manager.status().pool.idle == 0


@pytest.mark.parametrize("call", [metrics.register, metrics.unregister, metrics.instrument, metrics.uninstrument])
def test_a_wrong_registry_or_provider_is_a_type_error_naming_it(call):
    with pytest.raises(TypeError, match="registry|meter_provider"):
        call(42)


def test_cli_metrics_without_url_or_with_a_closed_port(capsys, monkeypatch):
    for name in ("CARROT_KOMBU_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["metrics"]) == cli.EXIT_REFUSED
    assert "no broker URL given" in capsys.readouterr().out
    assert cli.main(["metrics", "http://127.0.0.1:1/metrics", "--timeout", "1"]) == cli.EXIT_UNREACHABLE


def test_cli_metrics_scrapes_an_http_endpoint(registry, managers):
    managers(name="served")
    body = generate_latest(registry) + b"# HELP other_metric x\n# TYPE other_metric gauge\nother_metric 1.0\n"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = io.StringIO()
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        assert cli.metrics(url, 5.0, out=out) == cli.EXIT_OK
    finally:
        server.shutdown()
        server.server_close()
    printed = out.getvalue()
    assert 'carrot_kombu_connected{manager="served"} 1.0' in printed
    assert "other_metric" not in printed


class _Endpoint:
    """A metrics endpoint on a thread: answers ``body``, slowly if asked; records the Authorization header."""

    def __init__(self, body: bytes, trickle: float = 0.0) -> None:
        self.authorization: list[Optional[str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                endpoint.authorization.append(self.headers.get("Authorization"))
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                try:
                    for line in body.splitlines(keepends=True):
                        self.wfile.write(line)
                        self.wfile.flush()
                        if trickle:
                            time.sleep(trickle)  # the misbehaving endpoint under test: one line at a time
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (what the timeout test wants)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cli_metrics_sends_url_credentials_as_basic_auth_and_never_prints_them(registry, managers, capsys):
    managers(name="served")
    endpoint = _Endpoint(generate_latest(registry))
    try:
        out = io.StringIO()
        assert cli.metrics(f"http://scraper:S3cret%40pw@127.0.0.1:{endpoint.port}/metrics", 5.0, out=out) == cli.EXIT_OK
        assert endpoint.authorization == ["Basic " + base64.b64encode(b"scraper:S3cret@pw").decode()]
        assert "S3cret" not in out.getvalue()
    finally:
        endpoint.close()
    # Without a port (urllib took the password for one and crashed, printing it: red team 19.2).
    out = io.StringIO()
    assert cli.metrics("http://scraper:S3cretPW@127.0.0.1/metrics", 2.0, out=out) == cli.EXIT_UNREACHABLE
    captured = capsys.readouterr()
    assert "S3cretPW" not in out.getvalue() + captured.out + captured.err
    assert out.getvalue().startswith("FAILED http://scraper:**@127.0.0.1/metrics")


def test_cli_metrics_timeout_bounds_an_endpoint_that_trickles_its_answer(registry, managers):
    managers(name="served")
    endpoint = _Endpoint(generate_latest(registry), trickle=0.2)
    try:
        out = io.StringIO()
        began = time.monotonic()
        code = cli.metrics(f"http://127.0.0.1:{endpoint.port}/metrics", 1.0, out=out)
        took = time.monotonic() - began
    finally:
        endpoint.close()
    assert code == cli.EXIT_UNREACHABLE and "within" in out.getvalue(), out.getvalue()
    assert took < 1.5, took  # red team 19.3: it ran for minutes


def test_opentelemetry_sees_the_same_numbers(managers):
    pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from carrot_kombu import _metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    assert metrics.instrument(provider) is metrics.instrument(provider)  # idempotent
    try:
        manager = managers(name="otel", pool_limit=1)
        manager.publish_many([b"a", b"b"], routing_key="q")
        with manager.channel():
            with pytest.raises(PoolTimeout):
                manager.open_channel(timeout=0.01)  # pool_limit=1: a wait, observed
        points = {}
        for resource in reader.get_metrics_data().resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        attrs = dict(point.attributes)
                        if attrs.get("manager") == "otel":
                            points[(metric.name, attrs.get("outcome"))] = point
        assert points[("carrot_kombu.connected", None)].value == 1
        assert points[("carrot_kombu.published", "confirmed")].value == 2
        assert points[("carrot_kombu.publish_confirm_seconds", None)].count == 2
        assert points[("carrot_kombu.pool_wait_seconds", None)].count == 1
    finally:
        metrics.uninstrument(provider)
        provider.shutdown()
    assert not _metrics._LISTENERS  # nothing recorded for a provider that is gone
