"""A consume() callback attacking its neighbours through ``message.channel``, on the real broker.

Consumers share channels (``CONSUMERS_PER_CHANNEL``); a callback's
``message.channel`` is its own consumer's view of the shared channel
(:class:`carrot_kombu._pyamqp.consumer_channel.ConsumerChannel`).  From one
callback, each attack of the red team (issue 20, F2-F4 and the low ones):
``close()``, a passive declare of a missing exchange (404), a redeclare with
other arguments (406), a publish to a missing exchange (404), a cancel of a
neighbour's tag, a global qos.  Each time the neighbours on the same channel
get every message exactly once (never redelivered), their acks land (their
queues are empty once they are cancelled), the attacker gets one clear error
(its own cancel for ``close()``), its callback is not re-run in a loop, and
nothing waits past its timeout.

    .venv/bin/python -m pytest integration/test_consumer_isolation.py -q
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import amqp
import kombu
import pytest
from amqp.exceptions import NotFound, PreconditionFailed

from carrot_kombu import ConsumerChannelRefused

from tests.support import chain_loops

from .broker import rabbitmqctl, unique
from .figures import record
from .integrity_helpers import wait_until

NEIGHBOURS = 3
PER_ROUND = 20
#: Neighbours' prefetch (distinct from the attacker's: a global qos must change neither).
PREFETCH = 5
#: A callback re-run in a loop (the F3 hot loop ran ~500/s) shows within this window.
QUIET_WINDOW = 1.5


def _consumers_on_broker(queues: list[str]) -> dict[str, tuple[str, str, int]]:
    """queue -> (channel pid, consumer tag, prefetch) of each of ``queues`` that has a consumer."""
    out = rabbitmqctl("list_consumers", "-q", "--no-table-headers", "queue_name", "channel_pid", "consumer_tag",
                      "prefetch_count")
    found = {}
    for line in out.splitlines():
        fields = line.split("\t")
        if len(fields) >= 4 and fields[0] in queues:
            found[fields[0]] = (fields[1], fields[2], int(fields[3]))
    return found


def _attack(name: str, neighbour_queue: str, neighbour_tag: str) -> tuple[Callable[[Any], None], Any]:
    """What the attacker does with ``message.channel``, and what it must get: (exception class, text) or None."""
    missing = unique("ck-iso-missing-exchange")
    attacks: dict[str, tuple[Callable[[Any], None], Any]] = {
        "close": (lambda chan: chan.close(), None),
        "passive_declare_404": (lambda chan: chan.exchange_declare(missing, "direct", passive=True),
                                (NotFound, "NOT_FOUND")),
        "redeclare_406": (lambda chan: chan.queue_declare(neighbour_queue, durable=True, auto_delete=False,
                                                          arguments={"x-expires": 1000}),
                          (PreconditionFailed, "PRECONDITION_FAILED")),
        "publish_404": (lambda chan: chan.basic_publish(amqp.Message(b"x"), exchange=missing, routing_key="k"),
                        (NotFound, "NOT_FOUND")),
        "cancel_neighbour": (lambda chan: chan.basic_cancel(neighbour_tag),
                             (ConsumerChannelRefused, "basic_cancel")),
        "global_qos": (lambda chan: chan.basic_qos(0, 1, True), (ConsumerChannelRefused, "basic_qos")),
    }
    return attacks[name]


@pytest.mark.parametrize("attack", ["close", "passive_declare_404", "redeclare_406", "publish_404",
                                    "cancel_neighbour", "global_qos"])
def test_an_attack_through_message_channel_reaches_no_neighbour_on_its_shared_channel(rabbit, attack) -> None:
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    prefix = unique(f"ck-iso-{attack.replace('_', '-')}")
    attacker_queue = f"{prefix}-attacker"
    neighbour_queues = [f"{prefix}-n{i}" for i in range(NEIGHBOURS)]
    queues = neighbour_queues + [attacker_queue]
    with manager.channel(timeout=10) as lease:
        for q in queues:
            lease.queue_declare(q, durable=False, auto_delete=False, arguments={"x-expires": 120_000})

    lock = threading.Condition()
    got: dict[str, list[tuple[Any, bool]]] = {q: [] for q in neighbour_queues}
    calls: list[Any] = []
    errors: list[BaseException] = []
    took: list[float] = []
    attacked = threading.Event()
    plan: dict[str, Any] = {}

    def neighbour(queue: str) -> Callable[[Any, Any], None]:
        def on_message(body: Any, message: Any) -> None:
            message.ack()
            with lock:
                got[queue].append((body, bool(message.delivery_info.get("redelivered"))))
                lock.notify_all()
        return on_message

    def attacker(body: Any, message: Any) -> None:
        with lock:
            calls.append(body)
            lock.notify_all()
        if body != "attack":
            message.ack()
            return
        started = time.monotonic()
        try:
            plan["do"](message.channel)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        took.append(time.monotonic() - started)
        if attack != "close":
            message.ack()
        attacked.set()

    consumers = [manager.consume(q, neighbour(q), declare=False, prefetch_count=PREFETCH) for q in neighbour_queues]
    mine = manager.consume(attacker_queue, attacker, declare=False, prefetch_count=3)
    consumers.append(mine)
    try:
        assert wait_until(lambda: len(_consumers_on_broker(queues)) == len(queues), 10)
        before = _consumers_on_broker(queues)
        assert len({pid for pid, _, _ in before.values()}) == 1, f"not one shared channel: {before}"
        plan["do"], expected = _attack(attack, neighbour_queues[0], before[neighbour_queues[0]][1])

        def publish_round(n: int) -> None:
            for q in neighbour_queues:
                for i in range(PER_ROUND):
                    manager.publish(n * PER_ROUND + i, routing_key=q, timeout=10)

        def wait_rounds(rounds: int) -> None:
            want = [(i, False) for i in range(rounds * PER_ROUND)]
            with lock:
                ok = lock.wait_for(lambda: all(len(got[q]) >= len(want) for q in neighbour_queues), 20)
                wrong = {q: g for q, g in got.items() if g != want}
            assert ok and not wrong, f"neighbours lost, doubled or got redeliveries: {wrong}"

        publish_round(0)
        manager.publish("attack", routing_key=attacker_queue, timeout=10)
        publish_round(1)
        assert attacked.wait(15)
        wait_rounds(2)
        publish_round(2)
        if attack != "close":
            manager.publish("after", routing_key=attacker_queue, timeout=10)
        wait_rounds(3)
        with lock:
            assert lock.wait_for(lambda: attack == "close" or "after" in calls, 10), calls
        # No hot loop: the attacker's callback is not run again (nor anyone re-subscribed).
        seen = len(calls)
        deadline = time.monotonic() + QUIET_WINDOW
        with lock:
            lock.wait_for(lambda: len(calls) > seen, QUIET_WINDOW)
        assert time.monotonic() >= deadline - 0.05 or len(calls) > seen
        assert calls == (["attack"] if attack == "close" else ["attack", "after"]), calls
        wait_rounds(3)  # nothing more arrived for the neighbours either

        # One clear error (its own cancel for close), within its timeout.
        assert took and took[0] < 5.0, took
        if expected is None:
            assert errors == [] and not mine.active
        else:
            assert len(errors) == 1 and isinstance(errors[0], expected[0]), errors
            assert expected[1] in str(errors[0]), str(errors[0])
            assert mine.active
        after = _consumers_on_broker(queues)
        for q in neighbour_queues:  # still subscribed once, on the same channel, with their own prefetch
            assert after[q] == before[q], (q, before[q], after.get(q))
        if attack == "close":
            assert attacker_queue not in after
        else:
            assert after[attacker_queue] == before[attacker_queue]
        assert events.count("consumer_cancelled") == 0 and events.count("disconnected") == 0
        assert manager.status().degraded == ()
    finally:
        for consumer in consumers:
            consumer.cancel()
    # The acks landed: cancelled, the consumers gave back only what was unsettled.
    with manager.channel(timeout=10) as lease:
        left = {q: lease.queue_declare(q, passive=True).message_count for q in queues}
        for q in queues:
            lease.queue_delete(q)
    # close(): the attack message went back to its queue (as with a channel of its own), not lost.
    assert left == {**{q: 0 for q in neighbour_queues}, attacker_queue: 1 if attack == "close" else 0}, left
    record(f"consumer_isolation_{attack}", neighbours=NEIGHBOURS, per_neighbour=3 * PER_ROUND,
           attacker_calls=len(calls), attack_s=round(took[0], 3),
           error=None if not errors else f"{type(errors[0]).__name__}: {errors[0]}")


def test_kombu_code_on_message_channel_keeps_working(rabbit) -> None:
    """What kombu users do with ``message.channel``: an RPC reply with ``kombu.Producer(message.channel)``."""
    import kombu

    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue, reply = unique("ck-iso-rpc"), unique("ck-iso-rpc-reply")
    with manager.channel(timeout=10) as lease:
        for q in (queue, reply):
            lease.queue_declare(q, durable=False, auto_delete=False, arguments={"x-expires": 120_000})
    done = threading.Event()
    seen: dict[str, Any] = {}

    def on_request(body: Any, message: Any) -> None:
        try:
            producer = kombu.Producer(message.channel)
            producer.publish({"answer": body}, routing_key=reply, serializer="json")
            seen["client"] = message.channel.connection.client
        except Exception as exc:  # noqa: BLE001 - asserted below
            seen["error"] = exc
        message.ack()
        done.set()

    consumer = manager.consume(queue, on_request, declare=False)
    try:
        manager.publish("ping", routing_key=queue, timeout=10)
        assert done.wait(10)
        assert "error" not in seen, seen
        assert isinstance(seen["client"], kombu.Connection)
        with manager.channel(timeout=10) as lease:
            assert wait_until(lambda: lease.queue_declare(reply, passive=True).message_count == 1, 10)
            got = lease.basic_get(reply, no_ack=True)
        assert got is not None and b'"answer": "ping"' in (got.body if isinstance(got.body, bytes) else got.body.encode())
    finally:
        consumer.cancel()
        with manager.channel(timeout=10) as lease:
            lease.queue_delete(queue)
            lease.queue_delete(reply)
    assert events.count("consumer_cancelled") == 0


def test_the_first_deliveries_of_a_busy_queue_can_be_acked(rabbit) -> None:
    """Red team 20b F1: deliveries that follow consume-ok at once reached the callback before the
    subscription knew its consumer tag, and message.ack() was refused: with prefetch 1 the consumer
    stalled for good, and the library's reject of the "failed" callback lost redelivered messages."""
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    for trial in range(5):
        queue = unique(f"ck-first-ack-{trial}")
        manager.declare(kombu.Queue(queue, auto_delete=True))
        manager.publish_many([b"%d" % i for i in range(10)], routing_key=queue, timeout=10)
        acked: list[bytes] = []
        refused: list[BaseException] = []
        done = threading.Event()

        def on_message(body: Any, message: Any) -> None:
            try:
                message.ack()
            except Exception as exc:
                refused.append(exc)
                raise
            acked.append(body)
            if len(acked) == 10:
                done.set()

        consumer = manager.consume(queue, on_message, prefetch_count=1, declare=False)
        try:
            assert done.wait(10), f"trial {trial}: {len(acked)} of 10 acked; refused: {refused[:1]}"
            assert refused == []
        finally:
            consumer.cancel()


def test_message_channel_declares_like_a_kombu_channel_and_names_a_bad_publish(rabbit) -> None:
    """Red team 20b, low: ``kombu.Queue(...)(message.channel).declare()`` raised AttributeError, a
    ``nowait`` declare's refusal was lost with its lease, and ``basic_publish("str")`` failed deep inside."""
    manager, _, _ = rabbit()
    assert manager.wait_connected(10)
    queue = unique("ck-facade")
    manager.declare(kombu.Queue(queue, auto_delete=True))
    made = kombu.Queue(unique("ck-facade-made"), auto_delete=True)
    out: dict[str, Any] = {}
    done = threading.Event()

    def on_message(body: Any, message: Any) -> None:
        try:
            made(message.channel).declare()
            out["declare"] = "ok"
            for key, call in (
                ("nowait", lambda: message.channel.queue_declare(queue, durable=True, auto_delete=True,
                                                                 arguments={"x-max-length": 3}, nowait=True)),
                ("publish", lambda: message.channel.basic_publish("str", exchange="", routing_key=queue)),
            ):
                try:
                    call()
                    out[key] = None
                except Exception as exc:
                    out[key] = exc
            message.ack()
        finally:
            done.set()

    consumer = manager.consume(queue, on_message, declare=False)
    try:
        manager.publish(b"x", routing_key=queue, timeout=5)
        assert done.wait(10)
        assert out["declare"] == "ok"
        with manager.channel() as lease:
            lease.queue_declare(made.name, passive=True)  # it exists
        assert isinstance(out["nowait"], PreconditionFailed), out
        assert isinstance(out["publish"], TypeError) and "prepare_message" in str(out["publish"]), out
    finally:
        consumer.cancel()


@pytest.mark.parametrize("refusal", ["404", "406"])
def test_another_callers_refused_consume_never_makes_a_neighbours_message_run_twice(rabbit, refusal) -> None:
    """Red team 20b F4: a consume() refused 404 (declare=False, no such queue) or 406 (declare=True, other
    arguments) closed the channel it shared with a neighbour whose callback was running: that ack was
    dropped and the message ran again (3 refusals: 3 duplicates, 17 redeliveries)."""
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue, other = unique("ck-f4-neighbour"), unique("ck-f4-refused")
    total = 60
    seen: dict[int, int] = {}
    redelivered: list[int] = []
    lock = threading.Lock()

    def neighbour(body: Any, message: Any) -> None:
        time.sleep(0.02)  # a callback is running most of the time: its ack in flight when the refusal comes
        with lock:
            seen[body["i"]] = seen.get(body["i"], 0) + 1
            if message.delivery_info.get("redelivered"):
                redelivered.append(body["i"])
        message.ack()

    consumer = manager.consume(kombu.Queue(queue, auto_delete=True), neighbour, prefetch_count=10)
    try:
        if refusal == "406":
            manager.declare(kombu.Queue(other, auto_delete=True, queue_arguments={"x-max-length": 5}))
        manager.publish_many([{"i": i} for i in range(total)], routing_key=queue, timeout=10)
        errors: list[BaseException] = []
        for _ in range(3):
            assert wait_until(lambda: len(seen) < total, 1)  # still running its backlog
            try:
                if refusal == "404":
                    manager.consume(unique("ck-f4-missing"), lambda body, message: None, declare=False)
                else:
                    manager.consume(kombu.Queue(other, auto_delete=True, queue_arguments={"x-max-length": 6}),
                                    lambda body, message: None)
            except (NotFound, PreconditionFailed) as exc:
                errors.append(exc)
            time.sleep(0.1)
        assert len(errors) == 3 and all(("NOT_FOUND" if refusal == "404" else "PRECONDITION_FAILED") in str(e)
                                        for e in errors), errors
        assert wait_until(lambda: len(seen) == total, 30), f"{len(seen)} of {total}"
        time.sleep(QUIET_WINDOW)  # a redelivery would show by now
        assert [i for i, n in seen.items() if n > 1] == [] and redelivered == []
        assert events.count("consumer_cancelled") == 0 and manager.status().degraded == ()
        assert len(manager._core.consumers.snapshot()) == 1  # nothing of the refused consumes stays
    finally:
        consumer.cancel()
        with manager.channel() as lease:
            lease.channel.queue_delete(queue)
            lease.channel.queue_delete(other)


def test_a_consume_whose_declare_closes_the_connection_raises_and_the_manager_recovers(rabbit) -> None:
    """Red team 20b F2: consume() of a queue bound to an exchange of unknown type returned normally, and
    every reconnect then failed (503 COMMAND_INVALID) for as long as the consumer existed."""
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    queue, bad, exchange = unique("ck-f2-neighbour"), unique("ck-f2-bad"), unique("ck-f2-ex")
    got: list[int] = []
    consumer = manager.consume(kombu.Queue(queue, auto_delete=True), lambda body, message: (got.append(body),
                                                                                              message.ack()))
    try:
        with pytest.raises(amqp.exceptions.InvalidCommand, match="unknown exchange type") as info:
            manager.consume(kombu.Queue(bad, kombu.Exchange(exchange, "bogus-type"), "rk"), lambda body, message: None)
        assert chain_loops(info.value) == []  # red team 22: its chain looped back (Disconnected -> it)
        assert len(manager._core.consumers.snapshot()) == 1  # not registered
        assert events.wait_count("connected", 2, timeout=15), events.names()  # reconnected on its own
        for i in range(10):
            manager.publish(i, routing_key=queue, timeout=10)
        assert wait_until(lambda: len(got) == 10, 10), got
        assert events.count("connected") == 2 and events.count("consumer_cancelled") == 0
    finally:
        consumer.cancel()
        with manager.channel() as lease:
            lease.channel.queue_delete(queue)
            lease.channel.queue_delete(bad)
