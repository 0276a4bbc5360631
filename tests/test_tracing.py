"""carrot_kombu.tracing: spans, attributes, outcomes and propagation (memory:// and the fake broker)."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import uuid
from typing import Any, Iterator, Optional

import kombu
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import propagate, trace  # noqa: E402
from opentelemetry.context import Context  # noqa: E402
from opentelemetry.propagators.textmap import (  # noqa: E402
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from carrot_kombu import (  # noqa: E402
    Backoff,
    Blocked,
    ConnectionManager,
    Disconnected,
    Nacked,
    PublishTimeout,
    Rejected,
    Unroutable,
    tracing,
)
from tests.fakebroker import FakeBroker, Peer  # noqa: E402
from tests.support import in_background  # noqa: E402


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into an in-memory exporter; off again after the test, also when it fails."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(tracer_provider=provider)
    try:
        yield exporter
    finally:
        tracing.uninstrument()
        provider.shutdown()


@pytest.fixture
def memory() -> Iterator[ConnectionManager]:
    manager = ConnectionManager("memory://").start(wait=5)
    try:
        yield manager
    finally:
        manager.stop(timeout=5)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Inbox:
    """A consume() callback that keeps (body, headers, current span) and acks."""

    def __init__(self) -> None:
        self.got: "queue.Queue[tuple[Any, dict[str, Any], trace.Span]]" = queue.Queue()

    def __call__(self, body: Any, message: Any) -> None:
        self.got.put((body, dict(message.headers or {}), trace.get_current_span()))
        message.ack()

    def next(self) -> tuple[Any, dict[str, Any], trace.Span]:
        return self.got.get(timeout=5)


def finished(exporter: InMemorySpanExporter, kind: SpanKind, count: int = 1) -> list[ReadableSpan]:
    """The ``count`` finished spans of ``kind``; a consumer span ends on the consumer's thread: waited for."""
    deadline = threading.Event()
    for _ in range(100):
        found = [s for s in exporter.get_finished_spans() if s.kind is kind]
        if len(found) >= count:
            assert len(found) == count, found
            return found
        deadline.wait(0.05)
    raise AssertionError(f"expected {count} {kind} span(s), got {exporter.get_finished_spans()}")


def traceparent_of(span: ReadableSpan) -> str:
    ctx = span.context
    assert ctx is not None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


# -- publish -> consume ---------------------------------------------------------------------------


def test_a_publish_is_a_confirmed_producer_span_and_its_delivery_a_child_consumer_span(spans, memory):
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    try:
        memory.publish({"n": 1}, routing_key=name, message_id="id-1")
        body, headers, current = inbox.next()
    finally:
        consumer.cancel()
    (producer,) = finished(spans, SpanKind.PRODUCER)
    (process,) = finished(spans, SpanKind.CONSUMER)

    assert body == {"n": 1}
    assert producer.name == f"publish {name}"
    assert producer.status.status_code is StatusCode.OK
    assert dict(producer.attributes or {}) == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": name,  # the default exchange: the routing key names it
        "messaging.rabbitmq.destination.routing_key": name,
        "messaging.message.id": "id-1",
    }
    # The message carries the producer span's context, once.
    assert headers["traceparent"] == traceparent_of(producer)
    # The consumer span continues the producer's trace and is current in the callback.
    assert process.name == f"process {name}"
    assert process.parent is not None and process.parent.span_id == producer.context.span_id
    assert process.context.trace_id == producer.context.trace_id
    assert current.get_span_context().span_id == process.context.span_id
    attributes = dict(process.attributes or {})
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.subscription.name"] == name
    assert attributes["messaging.message.id"] == "id-1"
    assert process.status.status_code is StatusCode.UNSET


def test_a_named_exchange_is_the_destination(spans, memory):
    exchange = kombu.Exchange(unique("trace-ex"), type="direct")
    name = unique("trace")
    memory.declare(kombu.Queue(name, exchange, routing_key="rk"))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    try:
        memory.publish(b"x", exchange=exchange, routing_key="rk")
        inbox.next()
    finally:
        consumer.cancel()
    (producer,) = finished(spans, SpanKind.PRODUCER)
    (process,) = finished(spans, SpanKind.CONSUMER)
    assert producer.name == f"publish {exchange.name}"
    assert producer.attributes["messaging.destination.name"] == exchange.name
    assert producer.attributes["messaging.rabbitmq.destination.routing_key"] == "rk"
    assert process.attributes["messaging.destination.name"] == exchange.name
    assert process.parent.span_id == producer.context.span_id


def test_a_publish_inside_a_span_is_its_child(spans, memory):
    tracer = trace.get_tracer("test", tracer_provider=TracerProvider())  # the caller's own tracing
    with tracer.start_as_current_span("request") as request:
        memory.publish(b"x", routing_key=unique("nobody"))
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert producer.parent is not None and producer.parent.span_id == request.get_span_context().span_id


def test_headers_that_already_carry_a_context_are_kept_whole(spans, memory):
    """As opentelemetry-instrumentation-celery leaves them: no second traceparent, nothing overwritten."""
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    given = {"traceparent": theirs, "task": "add"}
    tracer = trace.get_tracer("test", tracer_provider=TracerProvider())
    try:
        with tracer.start_as_current_span("caller") as caller:
            memory.publish(b"x", routing_key=name, headers=given)
        _, headers, _ = inbox.next()
    finally:
        consumer.cancel()
    (producer,) = finished(spans, SpanKind.PRODUCER)
    (process,) = finished(spans, SpanKind.CONSUMER)
    assert headers == {"traceparent": theirs, "task": "add"}
    assert given == {"traceparent": theirs, "task": "add"}  # the caller's mapping is not touched
    assert producer.parent.span_id == caller.get_span_context().span_id  # a child of the current context
    assert process.parent.span_id == 0xB7AD6B7169203331  # the context the message carries


def test_the_callers_headers_are_copied_not_changed(spans, memory):
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    given = {"x-app": "1"}
    try:
        memory.publish(b"x", routing_key=name, headers=given)
        _, headers, _ = inbox.next()
    finally:
        consumer.cancel()
    assert given == {"x-app": "1"}
    assert headers["x-app"] == "1" and "traceparent" in headers


def test_a_batch_is_one_span_per_message_each_carried_by_its_message(spans, memory):
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    try:
        memory.publish_many(iter([b"a", b"b", b"c"]), routing_key=name)  # a generator is fine
        received = [inbox.next() for _ in range(3)]
    finally:
        consumer.cancel()
    producers = finished(spans, SpanKind.PRODUCER, 3)
    processes = finished(spans, SpanKind.CONSUMER, 3)
    assert sorted(body for body, _, _ in received) == [b"a", b"b", b"c"]
    assert all(p.attributes["messaging.batch.message_count"] == 3 for p in producers)
    assert all(p.status.status_code is StatusCode.OK for p in producers)
    assert len({p.context.span_id for p in producers}) == 3
    # Each message carries its own producer span's context; its consumer span is that span's child.
    assert {headers["traceparent"] for _, headers, _ in received} == {traceparent_of(p) for p in producers}
    assert {p.parent.span_id for p in processes} == {p.context.span_id for p in producers}


def test_each_message_of_a_batch_ends_its_span_with_its_own_outcome(spans, fake):
    manager, peer = fake
    peer.set_confirms(None)  # answered one by one below
    worker = in_background(lambda: manager.publish_many([b"fine", b"refused", b"also fine"], routing_key="q",
                                                        timeout=5), "publish_many")
    peer.wait_for(lambda: len(peer.published) == 4)
    batch = peer.published[-3:]
    for message in batch:
        peer.confirm(message.channel, message.delivery_tag, nack=message.body == b"refused")
    with pytest.raises(Nacked, match="message 1 of 3"):
        worker.result(5)
    producers = [p for p in finished(spans, SpanKind.PRODUCER, 4) if p.attributes.get("messaging.batch.message_count")]
    status = {traceparent_of(p): p.status.status_code for p in producers}
    sent = {m.body: m.properties["application_headers"]["traceparent"] for m in batch}
    assert status[sent[b"fine"]] is StatusCode.OK and status[sent[b"also fine"]] is StatusCode.OK
    assert status[sent[b"refused"]] is StatusCode.ERROR


class _Custom(TextMapPropagator):
    """A propagator with its own header, to show that the configured one is used both ways."""

    def extract(self, carrier: CarrierT, context: Optional[Context] = None,
                getter: Getter[CarrierT] = default_getter) -> Context:
        values = getter.get(carrier, "x-custom-trace")
        if not values:
            return context or Context()
        trace_id, span_id = (int(part, 16) for part in values[0].split(":"))
        parent = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(1))
        return trace.set_span_in_context(trace.NonRecordingSpan(parent), context)

    def inject(self, carrier: CarrierT, context: Optional[Context] = None,
               setter: Setter[CarrierT] = default_setter) -> None:
        ctx = trace.get_current_span(context).get_span_context()
        setter.set(carrier, "x-custom-trace", f"{ctx.trace_id:x}:{ctx.span_id:x}")

    @property
    def fields(self) -> set[str]:
        return {"x-custom-trace"}


def test_the_configured_propagator_writes_and_reads_the_headers(spans, memory):
    before = propagate.get_global_textmap()
    propagate.set_global_textmap(_Custom())
    name = unique("trace")
    try:
        memory.declare(kombu.Queue(name))
        inbox = Inbox()
        consumer = memory.consume(name, inbox)
        try:
            memory.publish(b"x", routing_key=name)
            _, headers, _ = inbox.next()
        finally:
            consumer.cancel()
    finally:
        propagate.set_global_textmap(before)
    (producer,) = finished(spans, SpanKind.PRODUCER)
    (process,) = finished(spans, SpanKind.CONSUMER)
    assert "traceparent" not in headers
    assert headers["x-custom-trace"] == f"{producer.context.trace_id:x}:{producer.context.span_id:x}"
    assert process.parent.span_id == producer.context.span_id


def test_a_callback_that_raises_ends_its_span_in_error(spans, memory):
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    called = threading.Event()

    def broken(body: Any, message: Any) -> None:
        message.ack()
        called.set()
        raise LookupError("no such order")

    consumer = memory.consume(name, broken)
    try:
        memory.publish(b"x", routing_key=name)
        assert called.wait(5)
        (process,) = finished(spans, SpanKind.CONSUMER)
    finally:
        consumer.cancel()
    assert process.status.status_code is StatusCode.ERROR
    assert process.status.description == "LookupError: no such order"
    assert [e.attributes["exception.type"] for e in process.events if e.name == "exception"] == ["LookupError"]


def test_a_message_that_cannot_be_sent_ends_its_span_in_error(spans, memory):
    with pytest.raises(TypeError, match="headers must be a mapping"):
        memory.publish(b"x", routing_key="q", headers=["not", "a", "mapping"])
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert producer.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize("headers", [
    {"traceparent": 12345},
    {"traceparent": True},
    {"traceparent": 1.5},
    {"traceparent": b"00-not-a-context"},
    {"traceparent": "garbage"},
    {"baggage": 7},
    {"baggage": b"k=v"},
    {"tracestate": {"a": 1}},
    {"traceparent": None, "baggage": [1, 2]},
], ids=repr)
def test_a_delivery_whose_headers_carry_no_valid_context_is_delivered_under_a_root_span(spans, memory, headers):
    """Any producer may send any header: a context that does not parse never costs the delivery (red team 19.1)."""
    name = unique("trace")
    memory.declare(kombu.Queue(name))
    inbox = Inbox()
    consumer = memory.consume(name, inbox)
    try:
        memory.publish(b"x", routing_key=name, headers=headers)
        body, got, current = inbox.next()
        (process,) = finished(spans, SpanKind.CONSUMER)
    finally:
        consumer.cancel()
    assert body == b"x" and got == headers
    assert process.status.status_code is not StatusCode.ERROR
    assert current.get_span_context().span_id == process.context.span_id


def test_an_iterable_that_raises_is_a_failed_publish_span(spans, memory):
    def bodies() -> Iterator[bytes]:
        yield b"one"
        raise ValueError("the source failed")

    with pytest.raises(ValueError, match="the source failed"):
        memory.publish_many(bodies(), routing_key="q")
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert producer.status.status_code is StatusCode.ERROR
    assert producer.attributes["error.type"] == "ValueError"


@pytest.mark.parametrize("bodies", ["hello", b"hello", {"a": 1}])
def test_one_message_given_as_a_batch_is_refused_as_without_tracing(spans, memory, bodies):
    with pytest.raises(TypeError, match="bodies"):
        memory.publish_many(bodies, routing_key="q")
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert producer.attributes["error.type"] == "TypeError"


def test_a_stopped_manager_publish_is_a_disconnected_error_span(spans):
    manager = ConnectionManager("memory://")
    with pytest.raises(Disconnected):
        manager.publish(b"x", routing_key="q")
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert_failed(producer, Disconnected)


def assert_failed(span: ReadableSpan, error: type[BaseException]) -> None:
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description.startswith(f"{error.__name__}: ")
    assert span.attributes["error.type"] == error.__name__
    assert [e.attributes["exception.type"] for e in span.events if e.name == "exception"] == [
        f"carrot_kombu.exceptions.{error.__name__}"]


# -- the broker's answers, over the fake broker ---------------------------------------------------


@pytest.fixture
def fake() -> Iterator[tuple[ConnectionManager, Peer]]:
    with FakeBroker(heartbeat=0) as broker:
        manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0,
                                    backoff=Backoff(min=0.05, max=0.5), blocked_timeout=0.3)
        manager.start()
        try:
            peer = broker.accept()
            assert manager.wait_connected(5)
            manager.publish(b"first", routing_key="q", timeout=5)  # the confirm channel is open
            yield manager, peer
        finally:
            manager.stop(timeout=5)


def _nack(manager: ConnectionManager, peer: Peer) -> dict[str, Any]:
    peer.set_confirms("nack")
    return {}


def _reject(manager: ConnectionManager, peer: Peer) -> dict[str, Any]:
    def refuse(p: Peer, method: Any) -> None:
        p.close_channel(method.channel, 404, "NOT_FOUND - no exchange 'missing' in vhost '/'", 60, 40, wait=None)

    peer.set_confirms(None)
    peer.on("basic.publish", refuse)
    return {"exchange": "missing"}


def _return(manager: ConnectionManager, peer: Peer) -> dict[str, Any]:
    def no_route(p: Peer, method: Any) -> None:
        p.send_method(method.channel, "basic.return", 312, "NO_ROUTE", method["exchange"], method["routing_key"],
                      body=method.body, properties=method.properties, wait=None)
        p.confirm(method.channel, wait=None)

    peer.set_confirms(None)
    peer.on("basic.publish", no_route)
    return {"mandatory": True}


def _withhold(manager: ConnectionManager, peer: Peer) -> dict[str, Any]:
    peer.set_confirms(None)
    return {"timeout": 0.3}


def _block(manager: ConnectionManager, peer: Peer) -> dict[str, Any]:
    peer.block("low on memory")
    assert manager.wait_status(lambda status: status.blocked, 5)
    return {}


@pytest.mark.parametrize(("answer", "error"), [
    (_nack, Nacked), (_reject, Rejected), (_return, Unroutable), (_withhold, PublishTimeout), (_block, Blocked),
], ids=["nacked", "rejected", "unroutable", "timeout", "blocked"])
def test_every_refusal_is_an_error_span_with_the_exception(spans, fake, answer, error):
    manager, peer = fake
    spans.clear()
    options = {"timeout": 5.0, **answer(manager, peer)}
    with pytest.raises(error):
        manager.publish(b"x", routing_key="q", **options)
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert_failed(producer, error)


def test_a_confirmed_publish_over_the_wire_is_ok_and_carries_its_context(spans, fake):
    manager, peer = fake
    spans.clear()
    manager.publish(b"x", routing_key="q", timeout=5)
    (producer,) = finished(spans, SpanKind.PRODUCER)
    assert producer.status.status_code is StatusCode.OK
    sent = peer.published[-1].properties["application_headers"]
    assert sent["traceparent"] == traceparent_of(producer)


# -- on and off ----------------------------------------------------------------------------------


def test_a_wrong_tracer_provider_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match="tracer_provider"):
        tracing.instrument(tracer_provider=42)
    assert not tracing.instrumented()


def test_uninstrument_puts_the_library_code_back(memory):
    own = (ConnectionManager.__dict__["publish_many"], ConnectionManager.__dict__["consume"])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(tracer_provider=provider)
    tracing.instrument(tracer_provider=provider)  # twice: still one wrapper
    try:
        assert tracing.instrumented()
        assert ConnectionManager.__dict__["publish_many"].__wrapped__ is own[0]
        name = unique("trace")
        memory.declare(kombu.Queue(name))
        inbox = Inbox()
        consumer = memory.consume(name, inbox)  # wrapped while instrumented
        memory.publish(b"traced", routing_key=name)
        _, traced_headers, _ = inbox.next()
        assert len(finished(exporter, SpanKind.PRODUCER)) == 1
        finished(exporter, SpanKind.CONSUMER)
    finally:
        tracing.uninstrument()
    try:
        assert not tracing.instrumented()
        assert (ConnectionManager.__dict__["publish_many"], ConnectionManager.__dict__["consume"]) == own
        exporter.clear()
        memory.publish(b"plain", routing_key=name)
        _, plain_headers, current = inbox.next()
        assert "traceparent" in traced_headers and "traceparent" not in plain_headers
        assert not current.get_span_context().is_valid  # the older consumer's wrapper no longer traces
        assert exporter.get_finished_spans() == ()
    finally:
        consumer.cancel()
        provider.shutdown()
    tracing.uninstrument()  # again: no error


def test_without_instrument_nothing_of_opentelemetry_is_loaded_or_wrapped():
    code = ("import sys, carrot_kombu; from carrot_kombu import ConnectionManager; "
            "print(any(m.startswith('opentelemetry') for m in sys.modules), "
            "ConnectionManager.publish_many.__module__, hasattr(ConnectionManager.publish_many, '__wrapped__'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "carrot_kombu.manager", "False"]
