"""OpenTelemetry tracing for confirmed publishing and consumers, opt in.

:func:`instrument` wraps two public methods of
:class:`~carrot_kombu.ConnectionManager` at class level, the way
OpenTelemetry's instrumentations do, and :func:`uninstrument` puts the
originals back: a process that never calls :func:`instrument` runs the
library's own code and pays nothing.

* ``publish_many`` (and so ``publish``, which calls it): a ``PRODUCER`` span
  from the call until the broker's confirm, named ``publish <destination>``,
  with the messaging semantic conventions' attributes; status ``OK`` when
  confirmed, ``ERROR`` with the exception recorded otherwise (``Nacked``,
  ``Rejected``, ``Unroutable``, ``PublishTimeout``, ``Disconnected``,
  ``Blocked``, a ``TypeError`` for a message that cannot be sent...).  The
  span's context goes into the message headers through the configured
  propagator (``traceparent``, ``tracestate`` with the default one).
  A batch of several messages is one span per message, each carried by its
  message and ended at that message's own confirm with its own outcome.
* ``consume``: the callback is wrapped in a ``CONSUMER`` span named
  ``process <queue>``, child of the context extracted from
  ``message.headers`` (the producer's span), current while the callback runs.

Headers that already carry a field the propagator writes (a ``traceparent``
put there by the caller, or by another instrumentation such as
``opentelemetry-instrumentation-celery``) are kept as they are: nothing is
added or overwritten, and the producer span is a child of the current
context.  Celery's own publishes and deliveries on ``carrot+amqp://`` go
through kombu, not through these methods, so they are traced by the Celery
instrumentation alone.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional, Union

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "carrot_kombu.tracing needs OpenTelemetry: pip install 'carrot_kombu[opentelemetry]'"
    ) from exc

from ._version import __version__
from .manager import ConnectionManager

__all__ = ("instrument", "instrumented", "uninstrument")

# Attribute names of the OpenTelemetry messaging semantic conventions (written
# out: the semantic-conventions package keeps them in a module it may move).
_SYSTEM = "messaging.system"
_OPERATION_TYPE = "messaging.operation.type"
_OPERATION_NAME = "messaging.operation.name"
_DESTINATION = "messaging.destination.name"
_SUBSCRIPTION = "messaging.destination.subscription.name"
_ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
_DELIVERY_TAG = "messaging.rabbitmq.message.delivery_tag"
_MESSAGE_ID = "messaging.message.id"
_BATCH_COUNT = "messaging.batch.message_count"
_BODY_SIZE = "messaging.message.body.size"
_ERROR_TYPE = "error.type"

Callback = Callable[[Any, Any], Any]

logger = logging.getLogger("carrot_kombu")

_CONFIRMED = Status(StatusCode.OK)

#: Iterables ``publish_many`` refuses as a batch (one message, not a list of them).
_NOT_A_BATCH = (str, bytes, bytearray, memoryview, Mapping)


_lock = threading.Lock()
#: The methods as they were before :func:`instrument`; empty when not instrumented.
_originals: dict[str, Callable[..., Any]] = {}
#: The tracer, read once per call by the wrappers: ``None`` after :func:`uninstrument`
#: makes a wrapper still referenced somewhere (a consumer's callback) a pass-through.
_tracer: Optional[trace.Tracer] = None


def instrument(tracer_provider: Optional[trace.TracerProvider] = None) -> None:
    """Trace ``publish``/``publish_many`` and ``consume`` of every manager.

    Applies to every :class:`~carrot_kombu.ConnectionManager` of the process,
    present and future; consumers started before this call are not traced.
    Calling it again only switches the tracer provider.

    Args:
        tracer_provider: Where spans go; ``None``: OpenTelemetry's global one.
    """
    global _tracer
    if tracer_provider is not None and not callable(getattr(tracer_provider, "get_tracer", None)):
        raise TypeError(f"tracer_provider must be an OpenTelemetry TracerProvider, got {type(tracer_provider).__name__}")
    tracer = trace.get_tracer("carrot_kombu", __version__, tracer_provider)
    with _lock:
        _tracer = tracer
        if _originals:
            return
        for name, wrap in _WRAPPERS.items():
            original = ConnectionManager.__dict__[name]
            _originals[name] = original
            setattr(ConnectionManager, name, wrap(original))


def uninstrument() -> None:
    """Undo :func:`instrument`: the original methods are back, nothing is traced.

    Consumers started while instrumented keep their wrapped callback, which
    then calls the callback untraced.  No error if not instrumented.
    """
    global _tracer
    with _lock:
        _tracer = None
        for name, original in _originals.items():
            setattr(ConnectionManager, name, original)
        _originals.clear()


def instrumented() -> bool:
    """Whether :func:`instrument` is in force."""
    return _tracer is not None


# -- publishing ------------------------------------------------------------------------------


def _traced_publish_many(original: Callable[..., None]) -> Callable[..., None]:
    # The public signature's keyword defaults (serializer, mandatory, timeout...):
    # read from it, not written here again, for the per-message path below.
    defaults = {name: p.default for name, p in inspect.signature(original).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("exchange", "routing_key", "headers")}

    @functools.wraps(original)
    def publish_many(self: ConnectionManager, bodies: Any, *, exchange: Any = "", routing_key: str = "",
                     headers: Optional[Mapping[str, Any]] = None, **options: Any) -> None:
        tracer = _tracer
        if tracer is None:
            original(self, bodies, exchange=exchange, routing_key=routing_key, headers=headers, **options)
            return
        name = getattr(exchange, "name", exchange)
        destination = name if name else routing_key  # the default exchange routes by the key alone
        attributes: dict[str, Union[str, int]] = {
            _SYSTEM: "rabbitmq",
            _OPERATION_TYPE: "send",
            _OPERATION_NAME: "publish",
            _DESTINATION: destination if isinstance(destination, str) else str(destination),
            _ROUTING_KEY: routing_key if isinstance(routing_key, str) else str(routing_key),
        }
        message_id = options.get("message_id")
        if message_id is not None:
            attributes[_MESSAGE_ID] = str(message_id)
        name_of_span = _span_name("publish", attributes[_DESTINATION])
        if isinstance(bodies, Iterable) and not isinstance(bodies, (_NOT_A_BATCH, list, tuple)):
            # A generator is consumed here once (and handed on as a list); one
            # that raises is a failed publish too.
            try:
                bodies = list(bodies)
            except BaseException as exc:
                failed = tracer.start_span(name_of_span, kind=SpanKind.PRODUCER, attributes=attributes)
                _failed(failed, exc)
                failed.end()
                raise
        if isinstance(bodies, (list, tuple)) and len(bodies) > 1 and (headers is None or isinstance(headers, Mapping)):
            _publish_each(self, tracer, name_of_span, attributes, bodies, exchange, routing_key, headers,
                          {**defaults, **options})
            return
        if isinstance(bodies, (list, tuple)) and not bodies:
            attributes[_BATCH_COUNT] = 0
        span = tracer.start_span(name_of_span, kind=SpanKind.PRODUCER, attributes=attributes)
        # attach/detach rather than trace.use_span(): the same, without a generator per call.
        token = context.attach(trace.set_span_in_context(span))
        try:
            if headers is None or isinstance(headers, Mapping):
                headers = _with_context(headers)
            # else: the original names the bad field (or a batch that is one message); the span records it
            original(self, bodies, exchange=exchange, routing_key=routing_key, headers=headers, **options)
        except BaseException as exc:
            _failed(span, exc)
            raise
        else:
            span.set_status(_CONFIRMED)
        finally:
            context.detach(token)
            span.end()

    return publish_many


def _with_context(headers: Optional[Mapping[str, Any]], ctx: Optional[context.Context] = None) -> dict[str, Any]:
    """A copy of ``headers`` with ``ctx`` (default: the current context) injected, unless they already carry one."""
    carrier = dict(headers) if headers else {}
    propagator = propagate.get_global_textmap()
    if not (carrier and _fields_of(propagator).intersection(carrier)):
        # The caller's (or Celery's) propagation fields are kept whole: mixing
        # their traceparent with our tracestate would make a context nobody sent.
        propagator.inject(carrier, context=ctx)
    return carrier


def _publish_each(manager: ConnectionManager, tracer: trace.Tracer, name: str, attributes: dict[str, Union[str, int]],
                  bodies: Union[list[Any], tuple[Any, ...]], exchange: Any, routing_key: str,
                  headers: Optional[Mapping[str, Any]], options: dict[str, Any]) -> None:
    """A batch: one PRODUCER span per message, each ended at that message's own confirm with its own outcome.

    ``options``: the other keywords of ``publish_many``, its defaults filled in.

    The batch is still published as one (checked first, written together,
    confirms awaited together); each message carries its own span's context.
    """
    total = len(bodies)
    spans = [tracer.start_span(name, kind=SpanKind.PRODUCER, attributes={**attributes, _BATCH_COUNT: total})
             for _ in range(total)]
    reported: list[bool] = []

    def report(outcomes: list[tuple[Optional[BaseException], Optional[float]]]) -> None:
        # Monotonic settle times to the wall clock the spans use.
        offset = time.time_ns() - int(time.monotonic() * 1e9)
        for span, (error, settled_at) in zip(spans, outcomes):
            if error is None:
                span.set_status(_CONFIRMED)
            else:
                _failed(span, error)
            span.end(end_time=None if settled_at is None else offset + int(settled_at * 1e9))
        reported.append(True)

    try:
        each = [_with_context(None, trace.set_span_in_context(span)) for span in spans]
        manager._publish_many(
            bodies, exchange=exchange, routing_key=routing_key, headers=headers,
            serializer=options.pop("serializer"), mandatory=options.pop("mandatory"),
            timeout=options.pop("timeout"), republish=options.pop("republish"), properties=options,
            headers_each=None if headers and _fields_of(propagate.get_global_textmap()).intersection(headers)
            else each,
            report=report,
        )
    except BaseException as exc:
        if not reported:  # refused before anything was sent (a bad argument, the manager stopped...)
            for span in spans:
                _failed(span, exc)
                span.end()
        raise


_fields_cache: tuple[object, frozenset[str]] = (None, frozenset())


def _fields_of(propagator: TextMapPropagator) -> frozenset[str]:
    """``propagator.fields``, kept while the configured propagator stays the same (a composite builds it per call)."""
    global _fields_cache
    cached, fields = _fields_cache
    if cached is not propagator:
        fields = frozenset(propagator.fields)
        _fields_cache = (propagator, fields)
    return fields


# -- consuming -------------------------------------------------------------------------------


def _traced_consume(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def consume(self: ConnectionManager, queue: Any, callback: Callback, **options: Any) -> Any:
        if _tracer is None or not callable(callback):
            return original(self, queue, callback, **options)  # the original names a bad callback
        return original(self, queue, _traced_callback(queue, callback), **options)

    return consume


def _traced_callback(queue: Any, callback: Callback) -> Callback:
    queue_name = str(getattr(queue, "name", queue))

    @functools.wraps(callback)
    def traced(body: Any, message: Any) -> Any:
        tracer = _tracer
        if tracer is None:
            return callback(body, message)
        try:
            span = _consumer_span(tracer, queue_name, message)
        except Exception:  # noqa: BLE001 - tracing must never cost a delivery
            logger.debug("could not start the consumer span for a message of %r", queue_name, exc_info=True)
            return callback(body, message)
        token = context.attach(trace.set_span_in_context(span))
        try:
            return callback(body, message)
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            context.detach(token)
            span.end()

    return traced


def _consumer_span(tracer: trace.Tracer, queue_name: str, message: Any) -> trace.Span:
    """The CONSUMER span of one delivery, child of the context its headers carry (if they parse)."""
    parent = _extracted(getattr(message, "headers", None))
    info = getattr(message, "delivery_info", None) or {}
    exchange = info.get("exchange") or ""
    routing_key = info.get("routing_key") or ""
    attributes: dict[str, Union[str, int]] = {
        _SYSTEM: "rabbitmq",
        _OPERATION_TYPE: "process",
        _OPERATION_NAME: "process",
        _DESTINATION: exchange or routing_key,
        _ROUTING_KEY: routing_key,
        _SUBSCRIPTION: queue_name,
    }
    message_id = (getattr(message, "properties", None) or {}).get("message_id")
    if message_id is not None:
        attributes[_MESSAGE_ID] = str(message_id)
    tag = getattr(message, "delivery_tag", None)
    if isinstance(tag, int):
        attributes[_DELIVERY_TAG] = tag
    raw = getattr(message, "body", None)
    if isinstance(raw, (bytes, str)):
        attributes[_BODY_SIZE] = len(raw)
    return tracer.start_span(_span_name("process", queue_name), context=parent, kind=SpanKind.CONSUMER,
                             attributes=attributes)


def _extracted(headers: Any) -> Optional[context.Context]:
    """The context in a delivery's headers; None if there is none or it does not parse.

    Any producer may send any header: only text values are offered to the
    propagator (bytes decoded as UTF-8), and a propagator that fails on them
    gives a root span, never a lost delivery.
    """
    if not isinstance(headers, Mapping) or not headers:
        return None
    carrier: dict[str, str] = {}
    for key, value in headers.items():
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value).decode("utf-8", "replace")
        if isinstance(key, str) and isinstance(value, str):
            carrier[key] = value
    if not carrier:
        return None
    try:
        return propagate.extract(carrier)
    except Exception:  # noqa: BLE001 - a malformed context is no context
        logger.debug("ignored a trace context that does not parse", exc_info=True)
        return None


def _span_name(operation: str, destination: object) -> str:
    """``<operation> <destination>``, the operation alone when there is no destination name."""
    return f"{operation} {destination}" if destination else operation


def _traced_publish(original: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(original)
    def publish(self: ConnectionManager, body: Any, **options: Any) -> None:
        if _tracer is None:
            original(self, body, **options)
        else:
            # publish() is publish_many([body]) on a shorter path: traced as that.
            self.publish_many([body], **options)

    return publish


#: The public methods wrapped, and how.
_WRAPPERS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {
    "publish": _traced_publish,
    "publish_many": _traced_publish_many,
    "consume": _traced_consume,
}


def _failed(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute(_ERROR_TYPE, type(exc).__name__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
