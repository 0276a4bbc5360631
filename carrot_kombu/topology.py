"""What the manager re-creates on every new connection: declared entities and setup functions.

Rules (``docs/guarantees.rst``):

* ``declare()`` while connected declares at once; an entity the broker
  refuses is *not* registered (it would fail every reconnect).
* ``declare()`` checks each entity first (:func:`check_entity`): a wrong
  type raises ``TypeError``, a name over 255 bytes or an argument AMQP cannot
  encode raises ``ValueError`` naming the field, and nothing is registered;
  connected or not.
* On a new connection every registered entity is declared again.  One that
  fails there no longer blocks the connection: the manager connects, serves
  everything else and reports the entity as *degraded* (``status()``, the
  ``degraded`` event) and retries it in the background (soon when the broker
  says it is unavailable, e.g. a classic queue whose node is down; every
  ``Backoff.max`` when it is refused, e.g. redeclared elsewhere with other
  arguments).  Setup functions are code: one that fails fails the attempt.
* A server-named queue (``Queue("")``) is declared exclusive, so it never
  outlives the connection that declared it; its new name is written back to
  the user's ``Queue`` object on every connection.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Optional

from amqp.exceptions import AMQPError

from .exceptions import CarrotKombuError, ReplyTimeout

if TYPE_CHECKING:
    from ._link import Link

__all__ = (
    "EntityRefused", "Topology", "check_consume_arguments", "check_entity", "check_shortstr", "check_table", "declare_all", "declare_entity", "describe",
    "is_server_named", "refused_declare",
)

SetupFn = Callable[[Any], Any]


def describe(entity: Any) -> str:
    """``"queue 'jobs'"``, ``"exchange 'events'"`` (for status and logs)."""
    kind = "queue" if hasattr(entity, "queue_arguments") else "exchange"
    return f"{kind} {_short(getattr(entity, 'name', ''))}"


def _short(value: Any) -> str:
    """A repr fit for one line of an error message (a 10 kB name is not)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:50] + "...(" + str(len(text)) + " chars)"


def check_shortstr(name: str, value: Any) -> None:
    """``value`` is a ``str`` of at most 255 UTF-8 bytes; else TypeError/ValueError naming ``name``."""
    from ._pyamqp.fields import check_shortstr as check

    check(name, value)


def check_table(name: str, table: Any) -> None:
    """``table`` is ``None`` or a mapping py-amqp can encode; else TypeError/ValueError naming ``name``."""
    from ._pyamqp.fields import check_table as check

    check(name, table)


#: Queue options kombu turns into ``x-`` arguments (seconds or counts, never negative).
_QUEUE_NUMBERS = ("expires", "message_ttl", "max_length", "max_length_bytes", "max_priority")


#: ``basic.consume`` arguments whose type RabbitMQ checks: a wrong one closes
#: the (shared) channel with 406 PRECONDITION_FAILED "invalid arg".
_CONSUME_ARGUMENT_TYPES = {"x-priority": int, "x-cancel-on-ha-failover": bool}


def check_consume_arguments(name: str, arguments: Any) -> None:
    """``arguments`` fit ``basic.consume`` (encodable, known keys typed); else TypeError naming the field."""
    check_table(name, arguments)
    for key, kind in _CONSUME_ARGUMENT_TYPES.items():
        if not arguments or key not in arguments:
            continue
        value = arguments[key]
        ok = isinstance(value, bool) if kind is bool else isinstance(value, int) and not isinstance(value, bool)
        if not ok:
            article = "a bool" if kind is bool else "an int"
            raise TypeError(f"{name}[{key!r}] must be {article}, got {type(value).__name__} {_short(value)}")


def check_entity(entity: Any, field: str = "entity") -> None:
    """Refuse, now, an entity that could never be declared (so it never reaches a reconnect).

    Only what the client can know: types, short-string lengths, and that
    every argument table goes through py-amqp's encoder.  What the broker
    decides (an unknown exchange type, arguments that clash with an existing
    queue) is left to the broker.

    Args:
        entity: A kombu ``Queue`` or ``Exchange``.
        field: How the caller's parameter is named in the error (``"queue"``,
            ``"declare() argument 2"``).

    Raises:
        TypeError: Not a kombu ``Queue``/``Exchange``, or a part of the wrong
            type; the message names the field.
        ValueError: A name over 255 bytes, a negative size or TTL, an argument
            AMQP cannot encode; the message names the field.
    """
    import kombu

    if isinstance(entity, kombu.Queue):
        _check_queue(entity, field)
    elif isinstance(entity, kombu.Exchange):
        _check_exchange(entity, f"{field} ({describe(entity)})")
    else:
        hint = f" (use kombu.Queue({_short(entity)}))" if isinstance(entity, str) else ""
        raise TypeError(f"{field} must be a kombu Queue or Exchange, got {type(entity).__name__}{hint}")


def _check_exchange(exchange: Any, label: str) -> None:
    check_shortstr(f"{label} name", exchange.name)
    check_shortstr(f"{label} type", exchange.type)
    check_table(f"{label} arguments", exchange.arguments)


def _check_queue(queue: Any, field: str) -> None:
    import math

    import kombu
    from kombu.transport.base import to_rabbitmq_queue_arguments

    label = f"{field} ({describe(queue)})"
    check_shortstr(f"{label} name", queue.name or "")
    if queue.exchange is not None:
        if not isinstance(queue.exchange, kombu.Exchange):
            raise TypeError(f"{label} exchange must be a kombu Exchange, got {type(queue.exchange).__name__}")
        _check_exchange(queue.exchange, f"{label} exchange")
    check_shortstr(f"{label} routing_key", queue.routing_key or "")
    for name in ("queue_arguments", "binding_arguments", "consumer_arguments"):
        check_table(f"{label} {name}", getattr(queue, name))
    for name in _QUEUE_NUMBERS:
        value = getattr(queue, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{label} {name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{label} {name} must be a finite number >= 0, got {value!r}")
    # What kombu will send (``expires=1.5`` becomes ``x-expires: 1500``): encodable too.
    numbers = {name: getattr(queue, name) for name in _QUEUE_NUMBERS}
    check_table(f"{label} queue_arguments", to_rabbitmq_queue_arguments(dict(queue.queue_arguments or {}), **numbers))
    for index, binding in enumerate(queue.bindings or ()):
        where = f"{label} bindings[{index}]"
        if not isinstance(binding, kombu.binding):
            raise TypeError(f"{where} must be a kombu binding, got {type(binding).__name__}")
        if binding.exchange is not None:
            if not isinstance(binding.exchange, kombu.Exchange):
                raise TypeError(f"{where} exchange must be a kombu Exchange, got {type(binding.exchange).__name__}")
            _check_exchange(binding.exchange, f"{where} exchange")
        check_shortstr(f"{where} routing_key", binding.routing_key or "")
        check_table(f"{where} arguments", binding.arguments)


class Topology:
    """Exchanges, queues (with their bindings) and setup functions, in order; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entities: list[Any] = []
        self._server_named: set[int] = set()
        self._setups: list[SetupFn] = []

    def after_fork(self) -> None:
        """In a forked child: a parent thread may have held the lock at fork time."""
        self._lock = threading.Lock()

    def add_entities(self, entities: tuple[Any, ...]) -> list[Any]:
        """Register; returns those that were not registered before."""
        added = []
        with self._lock:
            for entity in entities:
                if not any(e is entity for e in self._entities):
                    self._entities.append(entity)
                    added.append(entity)
                    if is_server_named(entity):
                        self._server_named.add(id(entity))
        return added

    def server_named(self, entity: Any) -> bool:
        with self._lock:
            return id(entity) in self._server_named

    def remove_entities(self, entities: list[Any]) -> None:
        with self._lock:
            self._entities = [e for e in self._entities if not any(e is x for x in entities)]
            self._server_named -= {id(e) for e in entities}

    def add_setup(self, fn: SetupFn) -> bool:
        with self._lock:
            if fn in self._setups:
                return False
            self._setups.append(fn)
            return True

    def remove_setup(self, fn: SetupFn) -> None:
        with self._lock:
            if fn in self._setups:
                self._setups.remove(fn)

    def declares(self, entity: Any) -> bool:
        with self._lock:
            return any(e is entity for e in self._entities)

    def entities(self) -> list[Any]:
        with self._lock:
            return list(self._entities)

    def setups(self) -> list[SetupFn]:
        with self._lock:
            return list(self._setups)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._entities or self._setups)


def is_server_named(entity: Any) -> bool:
    """A queue whose name the broker chooses (``Queue("")``)."""
    return hasattr(entity, "queue_arguments") and not getattr(entity, "name", None)


def declare_entity(channel: Any, entity: Any, server_named: bool = False, nowait: bool = False) -> None:
    """Declare one entity on ``channel`` (a queue brings its exchange and bindings).

    Args:
        server_named: Declare it anew with an empty name (the name the broker
            gave it last time died with that connection).
        nowait: Await no reply (a pipelined batch; not with ``server_named``):
            a refusal closes the channel later.

    Raises:
        Exception: What the broker answered (the channel is then closed).
    """
    if nowait and not server_named:
        # Thousands at a time (a pipelined restore): kombu's bind() copies
        # the entity (and its exchange) each time; its declare takes the channel.
        entity.declare(nowait=True, channel=channel)
        return
    bound = entity.bind(channel)  # kombu binds a copy
    if server_named:
        # Its name dies with the connection, and so must the queue: an
        # orphan amq.gen-* queue would collect messages nobody reads.
        bound.name = ""
        bound.exclusive = True
        bound.durable = False
        bound.auto_delete = True
    bound.declare()
    if server_named:
        entity.name = bound.name  # users read the broker-given name from their object


#: Fewer entities are declared one by one (a round trip each is fine).
PIPELINE_FROM = 16


def declare_for_caller(link: Optional["Link"], channel: Any, entities: "list[Any] | tuple[Any, ...]",
                       server_named: Callable[[Any], bool]) -> None:
    """``manager.declare(*entities)`` now: pipelined from :data:`PIPELINE_FROM` entities, else one by one.

    Pipelined, chunks of declares each await one round trip
    (:meth:`Link.declare_batch`); what a refused chunk held is declared again
    one by one on ``channel`` (the caller's lease), in the caller's order,
    which raises the broker's error for the entity it refused.

    Raises:
        Exception: The first refusal (as declaring one by one would).
    """
    rest = list(entities)
    plain = [e for e in rest if not server_named(e)]
    if link is not None and len(plain) >= PIPELINE_FROM:
        done = link.declare_batch([partial(declare_entity, entity=e, nowait=True) for e in plain])
        declared = {id(e) for e, ok in zip(plain, done) if ok}
        rest = [e for e in rest if id(e) not in declared]
    for entity in rest:
        declare_entity(channel, entity, server_named(entity))


def declare_all(
    link: "Link", entities: list[Any], server_named: Callable[[Any], bool], pipelined: bool = False,
) -> list[tuple[Any, BaseException]]:
    """Declare each entity; a refusal closes only its channel, the others go on.

    With ``pipelined`` (and many entities), they are first declared in
    chunks awaiting one round trip each (:meth:`Link.declare_batch`); a chunk
    the broker refused goes the one-by-one way, which names the entity.
    A connection-level refusal while pipelining cannot be blamed on one
    entity: the caller retries one by one (see ``Recovery``).

    An entity that can no longer be encoded (changed since it was
    registered: ``queue.queue_arguments["x"] = object()``) fails alone with
    its ``TypeError``/``ValueError``, before anything is sent for it.

    Returns:
        The entities that failed, with the broker's (or the check's) error.

    Raises:
        Exception: A connection-level failure (nothing more can be declared).
    """
    failed: list[tuple[Any, BaseException]] = []
    checked = []
    for entity in entities:
        try:
            check_entity(entity)
        except (TypeError, ValueError) as exc:
            failed.append((entity, exc))
        else:
            checked.append(entity)
    if pipelined:
        plain = [e for e in checked if not server_named(e)]
        if len(plain) >= PIPELINE_FROM:
            done = link.declare_batch([partial(declare_entity, entity=e, nowait=True) for e in plain])
            declared = {id(e) for e, ok in zip(plain, done) if ok}
            checked = [e for e in checked if id(e) not in declared]
    channel: Optional[Any] = None
    try:
        for entity in checked:
            if channel is None:
                channel = link.open_channel()
            try:
                declare_entity(channel, entity, server_named(entity))
            except Exception as exc:
                if not isinstance(exc, (AMQPError, ReplyTimeout, CarrotKombuError)):
                    raise
                if not _channel_level(exc):
                    blamed = refused_declare(exc)
                    if blamed is not None:
                        raise EntityRefused(entity, blamed) from exc
                    raise
                failed.append((entity, exc))
                link.close_channel(channel)
                channel = None
    finally:
        if channel is not None:
            link.close_channel(channel)
    return failed


class EntityRefused(Exception):
    """Declaring ``entity`` made the broker close the whole connection (it will every time)."""

    def __init__(self, entity: Any, error: BaseException) -> None:
        super().__init__(f"{describe(entity)}: {type(error).__name__}: {error}")
        self.entity = entity
        self.error = error


#: Connection-level replies that blame the method, not the connection: the
#: broker answers the same declare the same way on every new connection.
_REFUSING_CODES = {502, 503, 530, 540}


def refused_declare(exc: BaseException) -> Optional[BaseException]:
    """The broker's connection-level refusal of a declare or bind inside ``exc``'s chain, if any."""
    from amqp import spec
    from amqp.exceptions import ConnectionError as AMQPConnectionError

    sigs = {spec.Exchange.Declare, spec.Exchange.Bind, spec.Queue.Declare, spec.Queue.Bind}
    cause: Optional[BaseException] = exc
    for _ in range(6):
        if cause is None:
            return None
        if (isinstance(cause, AMQPConnectionError) and getattr(cause, "reply_code", None) in _REFUSING_CODES
                and getattr(cause, "method_sig", None) in sigs):
            found: BaseException = cause
            return found
        reason = getattr(cause, "reason", None)
        cause = reason if isinstance(reason, BaseException) else cause.__cause__
    return None


def _channel_level(exc: BaseException) -> bool:
    from amqp.exceptions import ChannelError

    return isinstance(exc, (ChannelError, ReplyTimeout))
