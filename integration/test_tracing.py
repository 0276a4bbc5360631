"""carrot_kombu.tracing on the real broker: parentage across RabbitMQ, real refusals, and beside Celery's instrumentation."""

from __future__ import annotations

import queue
import time
from typing import Any, Iterator

import kombu
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.celery")

from opentelemetry import trace  # noqa: E402
from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from carrot_kombu import Rejected, Unroutable, tracing  # noqa: E402

from .broker import unique  # noqa: E402


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.exporter = InMemorySpanExporter()  # type: ignore[attr-defined]
    provider.add_span_processor(SimpleSpanProcessor(provider.exporter))  # type: ignore[attr-defined]
    tracing.instrument(tracer_provider=provider)
    try:
        yield provider
    finally:
        tracing.uninstrument()
        provider.shutdown()


def ours(provider: TracerProvider, kind: SpanKind, count: int) -> list[ReadableSpan]:
    """carrot_kombu's finished spans of ``kind``, waiting (bounded) for ``count`` of them; never more."""
    deadline = time.monotonic() + 10
    while True:
        found = [s for s in provider.exporter.get_finished_spans()  # type: ignore[attr-defined]
                 if s.kind is kind and s.instrumentation_scope is not None
                 and s.instrumentation_scope.name == "carrot_kombu"]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        time.sleep(0.02)


def test_the_consumer_span_is_a_child_of_the_producer_span_across_rabbitmq(provider, rabbit):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    name = unique("ck-trace")
    target = kombu.Queue(name, auto_delete=True)
    got: "queue.Queue[tuple[dict[str, Any], Any]]" = queue.Queue()
    consumer = manager.consume(target, lambda body, message: (got.put((dict(message.headers), trace.get_current_span())),
                                                           message.ack()))
    try:
        manager.publish({"n": 1}, routing_key=name, message_id="m-1", timeout=10)
        headers, current = got.get(timeout=10)
    finally:
        consumer.cancel()
    (producer,) = ours(provider, SpanKind.PRODUCER, 1)
    (process,) = ours(provider, SpanKind.CONSUMER, 1)
    assert producer.status.status_code is StatusCode.OK  # the broker confirmed it
    assert producer.attributes["messaging.message.id"] == "m-1"
    assert headers["traceparent"].split("-")[2] == f"{producer.context.span_id:016x}"
    assert process.parent.span_id == producer.context.span_id
    assert process.context.trace_id == producer.context.trace_id
    assert current.get_span_context().span_id == process.context.span_id


def test_the_brokers_refusals_are_error_spans(provider, rabbit):
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    with pytest.raises(Unroutable):
        manager.publish(b"x", routing_key=unique("ck-nobody"), mandatory=True, timeout=10)
    with pytest.raises(Rejected):
        manager.publish(b"x", exchange=unique("ck-missing"), routing_key="k", timeout=10)
    unroutable, rejected = ours(provider, SpanKind.PRODUCER, 2)
    for span, error in ((unroutable, Unroutable), (rejected, Rejected)):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == error.__name__
        assert [e.attributes["exception.type"] for e in span.events if e.name == "exception"] == [
            f"carrot_kombu.exceptions.{error.__name__}"]


@pytest.fixture
def celery_traced(provider: TracerProvider) -> Iterator[TracerProvider]:
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider
    finally:
        instrumentor.uninstrument()


def test_a_celery_task_through_carrot_amqp_keeps_one_trace(celery_traced, rabbit, amqp_url):
    """Celery's instrumentation and ours together: one traceparent per message, no broken parentage.

    client span -> Celery apply_async (PRODUCER, Celery's) -> Celery run (CONSUMER, Celery's)
    -> our publish from inside the task (PRODUCER) -> our consume callback (CONSUMER).
    Celery's own publish and delivery go through kombu, not manager.publish/consume: we add no
    span and no header to them.
    """
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    provider = celery_traced
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    task_queue, out_queue = unique("ck-trace-task"), unique("ck-trace-out")
    got: "queue.Queue[dict[str, Any]]" = queue.Queue()
    consumer = manager.consume(kombu.Queue(out_queue, auto_delete=True), lambda body, message: (got.put(body), message.ack()))

    app = Celery(unique("ck-trace-app"), broker=amqp_url.replace("amqp://", "carrot+amqp://", 1), set_as_current=False)
    app.conf.update(task_default_queue=task_queue, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, task_ignore_result=True)

    @app.task(name="relay")
    def relay(n: int) -> None:
        manager.publish({"relayed": n}, routing_key=out_queue, timeout=10)

    client = provider.get_tracer("client")
    try:
        with client.start_as_current_span("client") as request:
            relay.delay(7)
        # The task message as Celery published it, before any worker took it.
        with manager.channel(timeout=10) as lease:
            deadline = time.monotonic() + 10
            raw = lease.basic_get(task_queue)
            while raw is None and time.monotonic() < deadline:
                time.sleep(0.05)
                raw = lease.basic_get(task_queue)
            assert raw is not None
            task_headers = dict(raw.properties["application_headers"])
            lease.basic_reject(raw.delivery_tag, requeue=True)
        assert ours(provider, SpanKind.PRODUCER, 0) == []  # Celery's publish is not ours
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
            assert got.get(timeout=20) == {"relayed": 7}
            (our_publish,) = ours(provider, SpanKind.PRODUCER, 1)
            (our_process,) = ours(provider, SpanKind.CONSUMER, 1)
    finally:
        consumer.cancel()
        with manager.channel(timeout=10) as lease:
            lease.queue_delete(task_queue)  # Celery declared it durable
    spans = {s.name: s for s in provider.exporter.get_finished_spans()}  # type: ignore[attr-defined]
    apply_async, run = spans["apply_async/relay"], spans["run/relay"]
    # The message carries Celery's context (its apply_async span), once, untouched by us.
    assert task_headers["traceparent"].split("-")[2] == f"{apply_async.context.span_id:016x}"
    assert apply_async.parent.span_id == request.get_span_context().span_id
    assert run.parent.span_id == apply_async.context.span_id
    assert our_publish.parent.span_id == run.context.span_id
    assert our_process.parent.span_id == our_publish.context.span_id
    trace_ids = {s.context.trace_id for s in (apply_async, run, our_publish, our_process)}
    assert trace_ids == {request.get_span_context().trace_id}
