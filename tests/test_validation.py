"""Bad arguments to the public calls: one TypeError/ValueError naming the parameter, nothing registered.

Issue 17.4: an entity that could never be declared, registered while
disconnected, used to fail every later connection attempt (the manager never
connected).  Issue 17.12: ``consume(123, cb)`` and ``declare("jobs")`` raised
``AttributeError``.  Managers run on ``memory://``; the fuzz tests throw
random junk at each call and then check that the manager still works.
"""

from __future__ import annotations

import datetime
import decimal
import queue as _queue
import threading
from typing import Any, Callable

import kombu
import pytest
from kombu.exceptions import EncodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carrot_kombu import CarrotKombuError, ConfigurationError, ConnectionManager

#: Hypothesis compares the global random state around each draw; the
#: supervisor threads of live managers (this test's, and any still ending from
#: earlier tests) use the random module for jitter meanwhile, which it would
#: take for random use inside a strategy (none of ours does).
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")


@pytest.fixture
def stopped_manager():
    manager = ConnectionManager("memory://", backoff={"min": 0.01, "max": 0.05, "jitter": False})
    yield manager
    manager.stop(timeout=5)


@pytest.fixture
def connected_manager(stopped_manager):
    stopped_manager.start(wait=5)
    return stopped_manager


def _entities(manager: ConnectionManager) -> list[Any]:
    return manager._core.topology.entities()


LONG = "q" * 256
BAD_ENTITIES = [
    ("jobs", TypeError, r"declare\(\) argument \d must be a kombu Queue or Exchange, got str \(use kombu.Queue\('jobs'\)\)"),
    (123, TypeError, r"argument \d must be a kombu Queue or Exchange, got int"),
    (None, TypeError, "got NoneType"),
    (kombu.Queue(LONG), ValueError, "name is 256 bytes long; AMQP allows at most 255"),
    (kombu.Exchange("e" * 300), ValueError, r"exchange 'eee.*name is 300 bytes long"),
    (kombu.Queue("q", kombu.Exchange("x"), routing_key="r" * 256), ValueError, "routing_key is 256 bytes"),
    (kombu.Queue("q", queue_arguments={"x-foo": object()}), TypeError, r"queue_arguments\['x-foo'\]: object"),
    (kombu.Queue("q", queue_arguments={"x-big": 2**64}), ValueError, r"queue_arguments\['x-big'\].*64-bit"),
    (kombu.Queue("q", queue_arguments={"x-nan": float("nan")}), ValueError, r"x-nan.*not a finite number"),
    (kombu.Queue("q", queue_arguments="x-max-length=1"), TypeError, "queue_arguments must be a mapping"),
    (kombu.Queue("q", binding_arguments={1: "x"}), TypeError, "binding_arguments: keys must be str"),
    (kombu.Queue("q", max_length=-1), ValueError, "max_length must be a finite number >= 0"),
    (kombu.Exchange("x", arguments={"alternate-exchange": {1, 2}}), TypeError, r"arguments\['alternate-exchange'\]: set"),
    (kombu.Queue("q", [kombu.binding(kombu.Exchange("x"), arguments={"k": decimal.Decimal("1e-300")})]),
     ValueError, r"bindings\[0\] arguments\['k'\].*scale"),
]


@pytest.mark.parametrize("entity, error, match", BAD_ENTITIES)
def test_declare_refuses_what_could_never_be_declared_while_disconnected(stopped_manager, entity, error, match):
    good = kombu.Queue("ck-good")
    with pytest.raises(error, match=match):
        stopped_manager.declare(good, entity)
    assert _entities(stopped_manager) == []  # neither one registered
    # ...so the manager connects: before the fix each attempt failed for ever.
    stopped_manager.start(wait=5)
    assert stopped_manager.status().degraded == ()


@pytest.mark.parametrize("entity, error, match", BAD_ENTITIES)
def test_declare_refuses_the_same_while_connected(connected_manager, entity, error, match):
    with pytest.raises(error, match=match):
        connected_manager.declare(entity)
    assert _entities(connected_manager) == []


def test_valid_entities_still_register_and_declare(connected_manager):
    queue = kombu.Queue(
        "ck-valid", kombu.Exchange("ck-valid-x", type="topic", arguments={"alternate-exchange": "ae"}),
        routing_key="a.#", queue_arguments={"x-dead-letter-exchange": "dlx", "x-when": datetime.datetime(2020, 1, 1)},
        message_ttl=1.5, max_length=10,
    )
    connected_manager.declare(queue, kombu.Exchange("ck-fanout", type="fanout"), kombu.Queue(""), kombu.Queue("u" * 255))
    assert len(_entities(connected_manager)) == 4


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.consume(123, lambda b, msg: None), TypeError, r"consume\(\) queue must be a str or a kombu Queue, got int"),
        (lambda m: m.consume(None, lambda b, msg: None), TypeError, "queue must be a str or a kombu Queue, got NoneType"),
        (lambda m: m.consume(LONG, lambda b, msg: None), ValueError, r"consume\(\) queue is 256 bytes long"),
        (lambda m: m.consume(kombu.Queue("q", queue_arguments={"x": object()}), lambda b, msg: None), TypeError,
         r"consume\(\) queue \(queue 'q'\) queue_arguments\['x'\]"),
        (lambda m: m.consume("q", None), TypeError, r"consume\(\) callback must be callable, got NoneType"),
        (lambda m: m.consume("q", "print"), TypeError, "callback must be callable, got str"),
        (lambda m: m.consume("q", print, prefetch_count=-1), ConfigurationError, "prefetch_count must be 0-65535, got -1"),
        (lambda m: m.consume("q", print, prefetch_count=70000), ValueError, "prefetch_count must be 0-65535"),
        (lambda m: m.consume("q", print, prefetch_count="3"), TypeError, "prefetch_count must be an int or None, got str"),
        (lambda m: m.consume("q", print, prefetch_count=1.0), TypeError, "prefetch_count must be an int or None, got float"),
        (lambda m: m.consume("q", print, prefetch_count=True), TypeError, "prefetch_count must be an int or None, got bool"),
        (lambda m: m.consume("q", print, no_ack="yes"), TypeError, "no_ack must be a bool, got str"),
        (lambda m: m.consume("q", print, declare=None), TypeError, "declare must be a bool, got NoneType"),
        (lambda m: m.consume("q", print, arguments=["x-priority", 1]), TypeError, "arguments must be a mapping, got list"),
        (lambda m: m.consume("q", print, arguments={"x-priority": object()}), TypeError, r"arguments\['x-priority'\]"),
        # 20b t23: RabbitMQ closes the (shared) channel for these: 406 invalid arg
        (lambda m: m.consume("q", print, arguments={"x-priority": "high"}), TypeError,
         r"consume\(\) arguments\['x-priority'\] must be an int, got str 'high'"),
        (lambda m: m.consume("q", print, arguments={"x-priority": True}), TypeError, r"\['x-priority'\] must be an int"),
        (lambda m: m.consume("q", print, arguments={"x-cancel-on-ha-failover": 1}), TypeError,
         r"arguments\['x-cancel-on-ha-failover'\] must be a bool, got int 1"),
        (lambda m: m.add_setup(None), TypeError, r"add_setup\(\) fn must be callable, got NoneType"),
        (lambda m: m.remove_setup("fn"), TypeError, r"remove_setup\(\) fn must be callable, got str"),
        (lambda m: m.on("connected", None), TypeError, r"on\(\) callback must be callable, got NoneType"),
        (lambda m: m.on(None, print), TypeError, "event must be a str"),
        (lambda m: m.on(["connected"], print), TypeError, "event must be a str"),
        (lambda m: m.off(3, print), TypeError, "event must be a str"),
        # 17 red-team: a str was sent as one message per character
        (lambda m: m.publish_many("hello", routing_key="q"), TypeError,
         r"publish_many\(\) bodies must be an iterable of message bodies \(a list...\), got str; to publish one message use publish\(\)"),
        (lambda m: m.publish_many(b"hello", routing_key="q"), TypeError, r"publish_many\(\) bodies .* got bytes"),
        (lambda m: m.publish_many({"a": 1}, routing_key="q"), TypeError, r"publish_many\(\) bodies .* got dict"),
        (lambda m: m.publish_many(5, routing_key="q"), TypeError, r"publish_many\(\) bodies .* got int$"),
    ],
)
@pytest.mark.parametrize("connected", [False, True])
def test_bad_arguments_name_the_parameter_and_register_nothing(stopped_manager, connected, call, error, match):
    if connected:
        stopped_manager.start(wait=5)
    with pytest.raises(error, match=match):
        call(stopped_manager)
    assert _entities(stopped_manager) == []
    assert stopped_manager._core.consumers.snapshot() == []
    assert stopped_manager._core.topology.setups() == []


# -- fuzz: random junk at every public call ------------------------------------------------------------

junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(),
    st.text(max_size=300), st.binary(max_size=20), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), st.one_of(st.integers(), st.just(object())),
                    max_size=3),
    st.just(object()), st.just(print), st.just(kombu.Exchange), st.just(float("inf")),
)
names = st.one_of(st.text(max_size=300), junk)
tables = st.one_of(
    st.none(), junk,
    st.dictionaries(st.text(max_size=5), st.one_of(junk, st.decimals(allow_nan=True), st.datetimes()), max_size=3),
)


# Strategies draw plain recipes; the kombu objects are built in the test body
# (user code inside a strategy trips Hypothesis when another thread of the
# suite uses the random module meanwhile).
exchange_recipes = st.tuples(
    st.just("exchange"), st.text(max_size=8), st.sampled_from(["direct", "fanout", "topic"]),
    st.sampled_from(["name", "type", "arguments"]), st.one_of(names, tables),
)
queue_recipes = st.tuples(
    st.just("queue"), st.text(max_size=8), st.one_of(st.none(), exchange_recipes),
    st.sampled_from(["name", "routing_key", "queue_arguments", "binding_arguments", "consumer_arguments",
                     "exchange", "expires", "max_length", "bindings"]),
    st.one_of(names, tables, exchange_recipes),
)


def build(value: Any) -> Any:
    """A recipe's kombu object, with one field set afterwards to junk (kombu keeps what is assigned later)."""
    if isinstance(value, list):
        return [build(v) for v in value]
    if not (isinstance(value, tuple) and value and value[0] in ("exchange", "queue")):
        return value
    if value[0] == "exchange":
        _, name, type_, field, junk_value = value
        entity = kombu.Exchange(name, type=type_)
    else:
        _, name, exchange, field, junk_value = value
        entity = kombu.Queue(name, build(exchange))
    setattr(entity, field, build(junk_value))
    return entity


entities = st.one_of(junk, names, exchange_recipes, queue_recipes)
#: What a bad argument may raise: one clear error (Unroutable etc. for a publish that was well-formed).
ALLOWED = (TypeError, ValueError, CarrotKombuError)


def _bounded(call: Callable[[], Any], seconds: float = 10.0) -> BaseException | None:
    """Run ``call`` on a thread; fail the test if it does not return within ``seconds`` (a hang)."""
    outcome: "_queue.SimpleQueue[Any]" = _queue.SimpleQueue()

    def run() -> None:
        try:
            call()
            outcome.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.put(exc)

    threading.Thread(target=run, daemon=True).start()
    try:
        return outcome.get(timeout=seconds)
    except _queue.Empty:
        pytest.fail(f"call did not return within {seconds}s")


def _still_works(manager: ConnectionManager, tag: str) -> None:
    """The manager publishes and consumes after the junk: nothing it holds was damaged."""
    got: "_queue.SimpleQueue[Any]" = _queue.SimpleQueue()
    queue = kombu.Queue(f"ck-fuzz-{tag}")
    consumer = manager.consume(queue, lambda body, message: (got.put(body), message.ack()))
    try:
        manager.publish({"still": tag}, routing_key=queue.name, timeout=5)
        assert got.get(timeout=5) == {"still": tag}
    finally:
        consumer.cancel()
    assert manager.connected and manager.status().degraded == ()


def _check(manager: ConnectionManager, call: Callable[[], Any], allowed: tuple[type, ...] = ALLOWED) -> None:
    core = manager._core
    before = (core.topology.entities(), core.topology.setups(), core.consumers.snapshot())
    error = _bounded(call)
    if error is None:
        return
    assert isinstance(error, allowed), f"{type(error).__name__}: {error}"
    assert not isinstance(error, AttributeError)
    assert str(error) or isinstance(error, TimeoutError)  # drain_events' socket.timeout has no text
    after = (core.topology.entities(), core.topology.setups(), core.consumers.snapshot())
    assert [list(map(id, x)) for x in after] == [list(map(id, x)) for x in before]  # nothing registered


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow],
                database=None)


def test_declare_fuzz(connected_manager):
    @FUZZ
    @given(st.lists(entities, min_size=1, max_size=3))
    def fuzz(args: list[Any]) -> None:
        args = build(args)
        if all(isinstance(a, (kombu.Queue, kombu.Exchange)) for a in args):
            args = [*args, "not an entity"]  # a junk-free call would register: keep the "nothing changed" check
        _check(connected_manager, lambda: connected_manager.declare(*args))

    fuzz()
    _still_works(connected_manager, "declare")


def test_consume_fuzz(connected_manager):
    @FUZZ
    @given(queue=st.one_of(names, queue_recipes), callback=st.one_of(junk, st.just(lambda b, m: None)),
           prefetch=st.one_of(st.none(), junk), no_ack=junk, arguments=tables, declare=junk)
    def fuzz(queue: Any, callback: Any, prefetch: Any, no_ack: Any, arguments: Any, declare: Any) -> None:
        manager = connected_manager
        queue = build(queue)

        def call() -> None:
            consumer = manager.consume(queue, callback, prefetch_count=prefetch, no_ack=no_ack,
                                       arguments=arguments, declare=declare)
            consumer.cancel()  # a valid combination: leave nothing behind

        _check(manager, call)

    fuzz()
    _still_works(connected_manager, "consume")


def test_publish_fuzz(connected_manager):
    connected_manager.declare(kombu.Queue("ck-fuzz-sink"))

    @FUZZ
    @given(body=junk, exchange=st.one_of(names, exchange_recipes, st.just("")), routing_key=st.one_of(names, st.just("ck-fuzz-sink")),
           headers=tables, mandatory=junk, timeout=st.one_of(junk, st.just(2.0)),
           props=st.dictionaries(st.sampled_from(["priority", "expiration", "delivery_mode", "message_id",
                                                  "content_type", "correlation_id", "bogus"]), junk, max_size=2))
    def fuzz(body: Any, exchange: Any, routing_key: Any, headers: Any, mandatory: Any, timeout: Any,
             props: dict[str, Any]) -> None:
        exchange = build(exchange)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 2:
            timeout = 2.0  # a well-formed publish to nowhere waits at most this long
        # A body the serializer cannot encode: kombu's EncodeError, as kombu's Producer.publish raises.
        _check(connected_manager, lambda: connected_manager.publish(
            body, exchange=exchange, routing_key=routing_key, headers=headers, mandatory=mandatory,
            timeout=timeout, **props), ALLOWED + (EncodeError,))

    fuzz()
    _still_works(connected_manager, "publish")


def test_setup_events_and_waits_fuzz(connected_manager):
    @FUZZ
    @given(which=st.sampled_from(["add_setup", "remove_setup", "on", "off", "wait_status", "open_channel",
                                  "wait_connected", "drain_events"]),
           first=st.one_of(junk, st.sampled_from(["connected", "degraded", "nope"])), second=junk)
    def fuzz(which: str, first: Any, second: Any) -> None:
        manager = connected_manager
        if which in ("add_setup", "remove_setup"):
            call: Callable[[], Any] = lambda: getattr(manager, which)(first)  # noqa: E731
        elif which in ("on", "off"):
            call = lambda: getattr(manager, which)(first, second)  # noqa: E731
        elif which == "wait_status":
            call = lambda: manager.wait_status(first, timeout=0.01)  # noqa: E731
        elif which == "open_channel":
            call = lambda: manager.open_channel(first).release()  # noqa: E731
        else:
            timeout = first
            if timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                   and timeout > 0.01):
                timeout = 0.01  # a valid wait for nothing (drain_events) lasts as long as asked
            call = lambda: getattr(manager, which)(timeout)  # noqa: E731
        if which in ("add_setup", "on") and callable(first if which == "add_setup" else second):
            return  # a valid registration is not junk
        # drain_events: "nothing arrived within timeout" is its documented answer.
        _check(manager, call, ALLOWED + ((TimeoutError,) if which == "drain_events" else ()))

    fuzz()
    _still_works(connected_manager, "misc")
