"""carrot_kombu.metrics on the real broker: a scrape follows a forced close of the connection."""

from __future__ import annotations

import time

import kombu
import pytest

from carrot_kombu import Backoff, metrics

from .broker import close_connection, unique

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402


def scrape(registry, manager):
    """(name, outcome) -> value for this manager's series."""
    found = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.labels.get("manager") == manager:
                found[(sample.name, sample.labels.get("outcome"))] = sample.value
    return found


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def otel_points(reader, manager):
    points = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    attrs = dict(point.attributes)
                    if attrs.get("manager") == manager:
                        points[(metric.name, attrs.get("outcome"))] = point
    return points


def test_a_scrape_follows_a_forced_close(rabbit, proxy):
    registry = CollectorRegistry()
    metrics.register(registry)
    otel = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = otel.MeterProvider(metric_readers=[reader])
    metrics.instrument(provider)
    try:
        # Through the proxy only to hold the reconnect back while we look:
        # the close itself is the broker's (rabbitmqctl close_connection).
        manager, events, name = rabbit(proxy.url(), backoff=Backoff(min=0.05, max=0.2))
        assert manager.wait_connected(10)
        now = lambda key, outcome=None: scrape(registry, name).get((key, outcome))  # noqa: E731
        assert now("carrot_kombu_connected") == 1
        assert now("carrot_kombu_reconnects_total") == 0

        queue = unique("ck-metrics")
        delivered = []
        manager.consume(kombu.Queue(queue, auto_delete=True), lambda body, message: (delivered.append(body),
                                                                                       message.ack()))
        confirmed = 0
        for n in range(5):
            manager.publish(b"before %d" % n, routing_key=queue)
            confirmed += 1  # returned: the broker confirmed it
        assert wait_until(lambda: len(delivered) == 5)
        assert wait_until(lambda: now("carrot_kombu_delivered_total") == 5)

        proxy.refuse()  # the reconnect waits until we heal it
        close_connection(name, "carrot_kombu metrics test forced close")
        assert events.wait_count("disconnected", 1, timeout=10)
        assert now("carrot_kombu_connected") == 0
        assert events.wait_count("connect_failed", 1, timeout=10)  # an attempt, refused by the proxy
        assert now("carrot_kombu_connected") == 0

        proxy.heal()
        assert manager.wait_connected(10)
        assert now("carrot_kombu_connected") == 1
        assert now("carrot_kombu_reconnects_total") == 1
        assert now("carrot_kombu_connection_attempts_total") >= 3  # the first, a refused one, the last

        for n in range(5):
            manager.publish(b"after %d" % n, routing_key=queue)
            confirmed += 1
        assert wait_until(lambda: len(delivered) == 10)
        assert wait_until(lambda: now("carrot_kombu_delivered_total") == 10)

        assert now("carrot_kombu_published_total", "confirmed") == confirmed == 10
        for outcome in ("nacked", "returned", "timeout", "failed"):
            assert now("carrot_kombu_published_total", outcome) == 0, outcome
        assert now("carrot_kombu_publish_confirm_seconds_count") == confirmed
        assert now("carrot_kombu_pending_confirms") == 0
        assert now("carrot_kombu_consumers") == 1
        assert now("carrot_kombu_blocked") == 0

        points = otel_points(reader, name)
        assert points[("carrot_kombu.connected", None)].value == 1
        assert points[("carrot_kombu.reconnects", None)].value == 1
        assert points[("carrot_kombu.published", "confirmed")].value == confirmed
        assert points[("carrot_kombu.delivered", None)].value == 10
        assert points[("carrot_kombu.consumers", None)].value == 1
        assert points[("carrot_kombu.publish_confirm_seconds", None)].count == confirmed
    finally:
        metrics.unregister(registry)
        metrics.uninstrument(provider)
    provider.shutdown()
