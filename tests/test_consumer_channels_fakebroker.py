"""Consumers sharing channels, over the scripted fake broker: qos per consume, isolation, pipelined restore."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from carrot_kombu import Backoff, ConnectionManager
from carrot_kombu._pyamqp.link import CONSUMERS_PER_CHANNEL
from tests.fakebroker import FakeBroker, Peer
from tests.recorder import Recorder

N = CONSUMERS_PER_CHANNEL + 8  # two channels


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    with FakeBroker(heartbeat=0) as fake:
        yield fake


def connect(broker: FakeBroker) -> tuple[ConnectionManager, Peer, Recorder]:
    manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0,
                                backoff=Backoff(min=0.05, max=0.5))
    recorder = Recorder(manager)
    manager.start()
    peer = broker.accept()
    assert manager.wait_connected(5)
    return manager, peer, recorder


def _consumes(peer: Peer) -> dict[str, Any]:
    """The last basic.consume of each queue."""
    return {m["queue"]: m for m in peer.received("basic.consume")}


def test_consumers_share_channels_each_with_its_own_prefetch(broker) -> None:
    manager, peer, _ = connect(broker)
    try:
        for n in range(N):
            manager.consume(f"q{n}", lambda body, message: message.ack(), declare=False, prefetch_count=5 + n % 2)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == N and _consumes(peer))
        assert len({m.channel for m in consumes.values()}) == 2
        # On each channel, the qos in force at each consume is that consumer's prefetch.
        for channel in {m.channel for m in consumes.values()}:
            prefetch = None
            for m in peer.received(channel=channel):
                if m.name == "basic.qos":
                    prefetch = m["prefetch_count"]
                elif m.name == "basic.consume":
                    assert prefetch == 5 + int(m["queue"][1:]) % 2, m
    finally:
        manager.stop(timeout=5)


def test_a_multiple_ack_on_a_shared_channel_is_refused_and_settles_nothing_of_the_neighbours(broker) -> None:
    """ack(multiple=True) on a channel shared by consumers acked the neighbours' deliveries (red team 20, F1)."""
    manager, peer, _ = connect(broker)
    errors: list[BaseException] = []
    done = threading.Event()

    def greedy(body: Any, message: Any) -> None:
        try:
            message.ack(multiple=True)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
            message.ack()
        finally:
            done.set()

    try:
        manager.consume("neighbour", lambda body, message: None, declare=False, prefetch_count=5)
        manager.consume("greedy", greedy, declare=False)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == 2 and _consumes(peer))
        neighbour, mine = consumes["neighbour"], consumes["greedy"]
        assert neighbour.channel == mine.channel  # shared
        for _ in range(3):
            peer.deliver(neighbour.channel, neighbour["consumer_tag"], body=b"theirs")
        peer.deliver(mine.channel, mine["consumer_tag"], body=b"mine")
        assert done.wait(5)
        assert isinstance(errors[0], ValueError) and "multiple" in str(errors[0])
        acks = peer.wait_for(lambda: peer.received("basic.ack", channel=mine.channel))
        assert [(a["delivery_tag"], a["multiple"]) for a in acks] == [(4, False)]  # its own, alone
    finally:
        manager.stop(timeout=5)


def _subscribed(peer: Peer) -> dict[str, int]:
    """basic.consume count per queue."""
    counts: dict[str, int] = {}
    for m in peer.received("basic.consume"):
        counts[m["queue"]] = counts.get(m["queue"], 0) + 1
    return counts


def test_a_406_for_one_consumers_bad_ack_cancels_it_alone_with_the_brokers_text_and_moves_the_others(broker) -> None:
    manager, peer, events = connect(broker)
    acked = threading.Event()
    degraded: list[tuple[str, str]] = []
    seen = threading.Event()
    manager.on("degraded", lambda what, why: (degraded.append((what, why)), seen.set()))

    def bad_ack(body: Any, message: Any) -> None:
        message.ack()
        # Around the facade (it refuses unknown tags): the shared channel itself, as before the facade.
        message.channel._chan.basic_ack(999)
        acked.set()

    try:
        for n in range(N):
            manager.consume(f"q{n}", bad_ack if n == 3 else (lambda body, message: message.ack()), declare=False)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == N and _consumes(peer))
        culprit = consumes["q3"]
        neighbours = sorted(q for q, m in consumes.items() if m.channel == culprit.channel and q != "q3")
        others = sorted(q for q, m in consumes.items() if m.channel != culprit.channel)
        assert neighbours and others
        peer.deliver(culprit.channel, culprit["consumer_tag"], body=b"x")
        assert acked.wait(5)
        peer.wait_for(lambda: len(peer.received("basic.ack", channel=culprit.channel)) == 2)
        peer.close_channel(culprit.channel, 406, "PRECONDITION_FAILED - unknown delivery tag 999", 60, 80)
        # The neighbours come back at once on another channel, quietly; the culprit as before.
        peer.wait_for(lambda: all(_subscribed(peer)[q] == 2 for q in neighbours + ["q3"]), timeout=5)
        assert all(_subscribed(peer)[q] == 1 for q in others)  # untouched
        assert events.wait_count("consumer_cancelled", 1)
        assert events.args("consumer_cancelled") == [("q3",)]
        assert seen.wait(5)
        assert [what for what, *_ in degraded] == ["consumer of queue 'q3'"]
        # The broker's reply text, not a bare "cancelled by the broker".
        assert "PRECONDITION_FAILED - unknown delivery tag 999" in degraded[0][1], degraded
    finally:
        manager.stop(timeout=5)


def test_a_channel_the_broker_closes_with_no_known_culprit_moves_every_member_quietly(broker) -> None:
    manager, peer, events = connect(broker)
    try:
        for n in range(N):
            manager.consume(f"q{n}", lambda body, message: message.ack(), declare=False)
        consumes = peer.wait_for(lambda: len(_consumes(peer)) == N and _consumes(peer))
        channel = consumes["q0"].channel
        members = sorted(q for q, m in consumes.items() if m.channel == channel)
        peer.close_channel(channel, 406, "PRECONDITION_FAILED - somebody's", 60, 80)
        peer.wait_for(lambda: all(_subscribed(peer)[q] == 2 for q in members), timeout=5)
        assert manager.status().degraded == ()
        assert events.count("consumer_cancelled") == 0
    finally:
        manager.stop(timeout=5)


def test_a_consumer_whose_shared_channel_keeps_being_closed_backs_off_instead_of_looping(broker) -> None:
    """Quiet moves have no culprit to degrade: repeated ones must still wait with backoff (never a tight loop)."""
    manager, peer, _ = connect(broker)
    degraded: list[tuple[str, str]] = []
    recovered = threading.Event()
    manager.on("degraded", lambda what, why: degraded.append((what, why)))
    manager.on("recovered", lambda what: recovered.set())
    try:
        manager.consume("q0", lambda body, message: message.ack(), declare=False)
        for n in range(1, 5):  # the broker closes each channel it lands on, once it delivers there
            consume = peer.wait_for(lambda: _subscribed(peer).get("q0") == n and peer.received("basic.consume")[-1])
            acks = len(peer.received("basic.ack"))
            peer.deliver(consume.channel, consume["consumer_tag"], body=f"m{n}")
            peer.wait_for(lambda: len(peer.received("basic.ack")) > acks, timeout=5)
            assert degraded == []  # the first three moves are quiet and at once
            peer.close_channel(consume.channel, 406, "PRECONDITION_FAILED - nobody's", 60, 80)
        peer.wait_for(lambda: degraded, timeout=5)
        assert "closed by the broker 4 times" in degraded[0][1], degraded
        assert recovered.wait(5), "it never came back after its backoff"
        assert _subscribed(peer)["q0"] == 5
        assert manager.status().degraded == ()
    finally:
        manager.stop(timeout=5)


holding = threading.Event()  # the neighbour of _pair holds a delivery unsettled


def _pair(manager: ConnectionManager, peer: Peer, attack: Any) -> tuple[Any, Any, list[Any]]:
    """A neighbour that acks and an attacker sharing its channel; returns both consume methods and what the neighbour got."""
    got: list[Any] = []
    holding.clear()

    def neighbour(body: Any, message: Any) -> None:
        if body != "held":  # kept unsettled: a tag another consumer's callback may try to settle
            message.ack()
        got.append(body)
        if body == "held":
            holding.set()

    manager.consume("neighbour", neighbour, declare=False, prefetch_count=7)
    attacker = manager.consume("attacker", attack, declare=False, prefetch_count=3)
    consumes = peer.wait_for(lambda: len(_consumes(peer)) == 2 and _consumes(peer))
    assert consumes["neighbour"].channel == consumes["attacker"].channel  # shared
    return consumes["neighbour"], consumes["attacker"], [attacker, got]


def _neighbour_unharmed(peer: Peer, neighbour: Any, got: list[Any], n: int = 3) -> None:
    """The neighbour is still subscribed once, on its channel, and acks each delivery there."""
    before = len(peer.received("basic.ack", channel=neighbour.channel))
    for i in range(n):
        peer.deliver(neighbour.channel, neighbour["consumer_tag"], body=f"n{i}")
    peer.wait_for(lambda: len(peer.received("basic.ack", channel=neighbour.channel)) == before + n, timeout=5)
    assert _subscribed(peer)["neighbour"] == 1
    # Since its consume (a throwaway channel of the same id may have been closed before).
    since = peer.received(channel=neighbour.channel)
    since = since[next(i for i, m in enumerate(since) if m is neighbour):]
    assert not [m for m in since if m.name == "channel.close"]
    assert [m for m in peer.received("basic.cancel") if m["consumer_tag"] == neighbour["consumer_tag"]] == []


def test_message_channel_settles_only_its_consumers_own_deliveries_and_refuses_the_rest(broker) -> None:
    manager, peer, events = connect(broker)
    errors: dict[str, BaseException] = {}
    done = threading.Event()
    tags: dict[str, Any] = {}

    def attack(body: Any, message: Any) -> None:
        chan = message.channel
        for name, call in [
            ("neighbours", lambda: chan.basic_ack(tags["neighbour"])),
            ("multiple", lambda: message.ack(multiple=True)),
            ("qos", lambda: chan.basic_qos(0, 1, True)),
            ("cancel", lambda: chan.basic_cancel(tags["neighbour_consumer"])),
            ("get", lambda: chan.basic_get("neighbour")),
            ("recover", lambda: chan.basic_recover(True)),
            ("raw", lambda: chan.send_method((60, 80), "Lb", (1, False))),
        ]:
            try:
                call()
            except Exception as exc:  # noqa: BLE001 - asserted below
                errors[name] = exc
        message.ack()
        try:
            chan.basic_ack(message.delivery_tag)  # twice: refused, no 406
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors["twice"] = exc
        done.set()

    try:
        neighbour, mine, (_, got) = _pair(manager, peer, attack)
        tags["neighbour_consumer"] = neighbour["consumer_tag"]
        tags["neighbour"] = peer.deliver(neighbour.channel, neighbour["consumer_tag"], body=b"held")
        assert holding.wait(5)  # unsettled: the neighbour holds it
        own = peer.deliver(mine.channel, mine["consumer_tag"], body=b"mine")
        assert done.wait(5)
        from carrot_kombu import ConsumerChannelRefused

        assert set(errors) == {"neighbours", "multiple", "qos", "cancel", "get", "recover", "raw", "twice"}, errors
        for name, exc in errors.items():
            assert isinstance(exc, ConsumerChannelRefused), (name, exc)
            assert isinstance(exc, ValueError)
        assert "basic_qos" in str(errors["qos"]) and "prefetch_count" in str(errors["qos"])
        assert "basic_cancel" in str(errors["cancel"]) and neighbour["consumer_tag"] in str(errors["cancel"])
        assert "basic_ack(delivery_tag=" in str(errors["twice"])
        peer.wait_for(lambda: peer.received("basic.ack", channel=mine.channel))
        acks = [(a["delivery_tag"], a["multiple"]) for a in peer.received("basic.ack", channel=mine.channel)]
        assert acks == [(own, False)]  # the attacker's own, once; not the neighbour's
        qos = peer.received("basic.qos", channel=mine.channel)
        assert [q["prefetch_count"] for q in qos] == [7, 3]  # only the subscribes' own
        assert not peer.received("basic.get") and not peer.received("basic.recover")
        _neighbour_unharmed(peer, neighbour, got)
        assert events.count("consumer_cancelled") == 0
    finally:
        manager.stop(timeout=5)


def test_message_channel_close_cancels_only_its_consumer_and_requeues_what_it_held(broker) -> None:
    manager, peer, events = connect(broker)
    done = threading.Event()
    calls: list[Any] = []
    late: list[Any] = []

    def attack(body: Any, message: Any) -> None:
        calls.append(body)
        message.channel.close()  # no ack first: it goes back to the queue, as with a channel of its own
        try:
            message.ack()  # late: dropped, as an ack after cancel()
        except Exception as exc:  # noqa: BLE001 - asserted below
            late.append(exc)
        done.set()

    try:
        neighbour, mine, (attacker, got) = _pair(manager, peer, attack)
        own = peer.deliver(mine.channel, mine["consumer_tag"], body=b"mine")
        assert done.wait(5)
        assert late == []
        cancels = peer.wait_for(lambda: peer.received("basic.cancel", channel=mine.channel))
        assert [c["consumer_tag"] for c in cancels] == [mine["consumer_tag"]]
        rejects = peer.wait_for(lambda: peer.received("basic.reject", channel=mine.channel))
        assert [(r["delivery_tag"], r["requeue"]) for r in rejects] == [(own, True)]
        assert not peer.received("basic.ack", channel=mine.channel)
        assert not attacker.active and calls == ["mine"]
        _neighbour_unharmed(peer, neighbour, got)
        assert events.count("consumer_cancelled") == 0
    finally:
        manager.stop(timeout=5)


def _refuse(code: int, text: str, class_id: int, method_id: int, when: Any) -> Any:
    def handler(peer: Peer, m: Any) -> None:
        if when(m):
            peer.close_channel(m.channel, code, text, class_id, method_id, wait=None)
        elif m.name == "exchange.declare" and not m["nowait"]:
            peer.send_method(m.channel, "exchange.declare-ok", wait=None)
        elif m.name == "queue.declare" and not m["nowait"]:
            peer.send_method(m.channel, "queue.declare-ok", m["queue"], 0, 0, wait=None)

    return handler


@pytest.mark.parametrize("request_name", ["passive_declare", "redeclare", "publish"])
def test_a_request_the_broker_refuses_on_message_channel_closes_only_a_leased_channel(broker, request_name) -> None:
    import amqp

    manager, peer, events = connect(broker)
    calls: list[Any] = []
    errors: list[BaseException] = []

    if request_name == "passive_declare":
        peer.on("exchange.declare", _refuse(404, "NOT_FOUND - no exchange 'missing' in vhost '/'", 40, 10,
                                            lambda m: m["passive"]))
        expected = (amqp.exceptions.NotFound, "NOT_FOUND - no exchange 'missing'")

        def request(chan: Any) -> None:
            chan.exchange_declare("missing", "direct", passive=True)
    elif request_name == "redeclare":
        peer.on("queue.declare", _refuse(406, "PRECONDITION_FAILED - inequivalent arg 'x-max-length'", 50, 10,
                                         lambda m: m["queue"] == "neighbour" and not m["passive"]))
        expected = (amqp.exceptions.PreconditionFailed, "PRECONDITION_FAILED - inequivalent arg")

        def request(chan: Any) -> None:
            chan.queue_declare("neighbour", durable=True, auto_delete=False, arguments={"x-max-length": 1})
    else:
        peer.on("basic.publish", _refuse(404, "NOT_FOUND - no exchange 'missing' in vhost '/'", 60, 40,
                                         lambda m: m["exchange"] == "missing"))
        expected = (amqp.exceptions.NotFound, "NOT_FOUND - no exchange 'missing'")

        def request(chan: Any) -> None:
            chan.basic_publish(amqp.Message(b"x"), exchange="missing", routing_key="k")

    def attack(body: Any, message: Any) -> None:
        calls.append(body)
        try:
            request(message.channel)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)
        message.ack()

    try:
        neighbour, mine, (attacker, got) = _pair(manager, peer, attack)
        peer.deliver(mine.channel, mine["consumer_tag"], body=b"mine")
        peer.wait_for(lambda: peer.received("basic.ack", channel=mine.channel), timeout=5)
        assert len(errors) == 1 and isinstance(errors[0], expected[0]), errors
        assert expected[1] in str(errors[0])
        closes = [m.channel for m in peer.received("channel.close-ok")]
        assert closes and mine.channel not in closes  # the leased channel, never the shared one
        assert not peer.received("basic.publish", channel=mine.channel)
        assert not peer.received("exchange.declare", channel=mine.channel)
        assert calls == ["mine"] and attacker.active
        _neighbour_unharmed(peer, neighbour, got)
        assert _subscribed(peer)["attacker"] == 1  # no hot loop of re-subscribes and redeliveries
        assert events.count("consumer_cancelled") == 0 and manager.status().degraded == ()
    finally:
        manager.stop(timeout=5)


def test_a_reconnect_restores_every_consumer_pipelined(broker) -> None:
    manager, peer, _ = connect(broker)
    try:
        for n in range(N):
            manager.consume(f"q{n}", lambda body, message: message.ack(), declare=False)
        peer.wait_for(lambda: len(_consumes(peer)) == N)
        peer.close_connection()
        second = broker.accept()
        consumes = second.wait_for(lambda: len(_consumes(second)) == N and _consumes(second))
        assert all(m["nowait"] for m in consumes.values())  # written back to back, nothing awaited each
        assert len(second.received("channel.open")) <= 2 + 2  # two consumer channels (+ publisher, pool)
        channels = {m.channel for m in consumes.values()}
        assert len(channels) == 2
        # One round trip per channel proves the broker took them all.
        assert {m.channel for m in second.received("channel.flow")} >= channels
        assert manager.wait_connected(5)
    finally:
        manager.stop(timeout=5)


def test_a_settlement_not_written_gives_its_booking_back() -> None:
    """An event loop's ack that would wait is retried on an executor: it must still find its delivery owed."""
    from types import SimpleNamespace

    from amqp import spec

    from carrot_kombu._pyamqp.chanstate import ChanState

    state = ChanState(SimpleNamespace(), SimpleNamespace(events=None))  # type: ignore[arg-type]
    state.delivered(1, "mine")
    state.delivered(2, "theirs")
    undo = state.borrower_changed(spec.Basic.Ack, (1, False))
    assert not state.owes(1, "mine") and state.owes(2, "theirs")
    assert undo is not None
    undo()
    assert state.owes(1, "mine") and not state.owes(1, "theirs") and state.owed_to("mine") == [1]
    state.forget_delivery(1)
    assert state.owed_to("mine") == []


def test_a_second_settlement_of_one_delivery_on_a_shared_channel_is_never_written() -> None:
    """Red team 20b F3: a cancel's give-back racing a late ack (a worker thread's, an event loop's) wrote
    both; the broker closed the shared channel (406 unknown delivery tag) and every neighbour's unacked
    messages ran again.  Checked and booked under the channel's lock: the second is not written."""
    from types import SimpleNamespace

    from amqp import spec

    from carrot_kombu._pyamqp.chanstate import ChanState, NotOutstanding

    shared = ChanState(SimpleNamespace(shared_by_consumers=True), SimpleNamespace(events=None))  # type: ignore[arg-type]
    shared.delivered(1, "mine")
    shared.delivered(2, "mine")
    assert shared.borrower_changed(spec.Basic.Ack, (1, False)) is not None  # the first goes out
    with pytest.raises(NotOutstanding):
        shared.borrower_changed(spec.Basic.Reject, (1, True))  # the racing second: not written
    shared.borrower_changed(spec.Basic.Reject, (2, True))
    assert shared.owed_to("mine") == []
    # A tag never delivered here is still written: the broker's 406 then names its consumer (acting_for).
    assert shared.borrower_changed(spec.Basic.Ack, (99, False)) is not None
    # A channel of one borrower keeps py-amqp's behaviour: a double ack is written (its own 406).
    lease = ChanState(SimpleNamespace(shared_by_consumers=False), SimpleNamespace(events=None))  # type: ignore[arg-type]
    lease.delivered(1)
    lease.borrower_changed(spec.Basic.Ack, (1, False))
    assert lease.borrower_changed(spec.Basic.Ack, (1, False)) is not None


@pytest.mark.parametrize("refusal", ["404 declare=False", "406 declare=True"])
def test_a_refused_consume_closes_a_throwaway_channel_never_its_neighbours(broker, refusal) -> None:
    """Another caller's refused consume() closed the shared channel: a neighbour's in-flight ack was dropped (20b F4)."""
    import amqp
    import kombu

    manager, peer, events = connect(broker)
    got: list[Any] = []
    try:
        manager.consume("neighbour", lambda body, message: (got.append(body), message.ack()), declare=False)
        neighbour = peer.wait_for(lambda: _consumes(peer).get("neighbour"))
        if refusal.startswith("404"):
            # As RabbitMQ: no such queue, for a passive declare and for a consume alike.
            text = "NOT_FOUND - no queue 'missing' in vhost '/'"
            peer.on("queue.declare", _refuse(404, text, 50, 10, lambda m: m["queue"] == "missing"))
            peer.on("basic.consume", _refuse(404, text, 60, 20, lambda m: m["queue"] == "missing"))
            with pytest.raises(amqp.exceptions.NotFound, match="no queue 'missing'"):
                manager.consume("missing", lambda body, message: None, declare=False)
        else:
            text = "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'other'"
            peer.on("queue.declare", _refuse(406, text, 50, 10, lambda m: m["queue"] == "other" and not m["passive"]))
            with pytest.raises(amqp.exceptions.PreconditionFailed, match="inequivalent arg"):
                manager.consume(kombu.Queue("other", queue_arguments={"x-max-length": 6}), lambda body, message: None)
        refused = [m for m in peer.received("queue.declare") if m["queue"] in ("missing", "other")]
        assert refused and all(m.channel != neighbour.channel for m in refused)
        assert [q for q in _subscribed(peer) if q in ("missing", "other")] == []  # no consume was written
        assert neighbour.channel not in [m.channel for m in peer.received("channel.close-ok")]
        _neighbour_unharmed(peer, neighbour, got)
        assert events.count("consumer_cancelled") == 0 and manager.status().degraded == ()
    finally:
        manager.stop(timeout=5)


def _unknown_exchange_type(peer: Peer, m: Any) -> None:
    """As RabbitMQ: a declare of an exchange of unknown type closes the whole connection (503)."""
    if m["type"] == "bogus-type":
        peer.close_connection(503, "COMMAND_INVALID - unknown exchange type 'bogus-type'", 40, 10, wait=None)
    elif not m["nowait"]:
        peer.send_method(m.channel, "exchange.declare-ok", wait=None)


def _bogus_queue() -> Any:
    import kombu

    return kombu.Queue("bad", kombu.Exchange("bogus-ex", "bogus-type"), "rk")


def test_a_consume_whose_declare_closes_the_connection_raises_and_registers_nothing(broker) -> None:
    """consume() returned normally and every reconnect failed for as long as the consumer existed (20b F2)."""
    import amqp

    manager, peer, events = connect(broker)
    try:
        manager.consume("neighbour", lambda body, message: message.ack(), declare=False)
        peer.wait_for(lambda: _consumes(peer).get("neighbour"))
        peer.on("exchange.declare", _unknown_exchange_type)
        with pytest.raises(amqp.exceptions.InvalidCommand, match="unknown exchange type"):
            manager.consume(_bogus_queue(), lambda body, message: None)
        second = broker.accept()
        second.wait_for(lambda: _consumes(second).get("neighbour"))
        assert manager.wait_connected(5)
        assert not second.received("exchange.declare") and "bad" not in _subscribed(second)
        assert events.count("consumer_cancelled") == 0
    finally:
        manager.stop(timeout=5)


def test_a_registered_consumer_whose_declare_closes_the_connection_is_dropped_not_retried_for_ever(caplog) -> None:
    """Registered while disconnected, it made every reconnect fail (SetupFailed) and starved its neighbours (20b F2)."""
    with FakeBroker(heartbeat=0, manual={"connection.open"}) as broker:
        manager = ConnectionManager(f"amqp://guest:guest@127.0.0.1:{broker.port}/", heartbeat=0,
                                    backoff=Backoff(min=0.05, max=0.2))
        events = Recorder(manager)
        try:
            manager.consume("neighbour", lambda body, message: message.ack(), declare=False)
            bad = manager.consume(_bogus_queue(), lambda body, message: None)
            manager.start()
            attempts = 0
            for _ in range(5):
                attempts += 1
                peer = broker.accept()
                peer.on("exchange.declare", _unknown_exchange_type)  # before the client may declare
                peer.wait_for(lambda: peer.received("connection.open"))
                peer.send_method(0, "connection.open-ok", "")
                # Connected is reported once everything was restored.
                peer.wait_for(lambda: peer.closed or manager.wait_connected(0), timeout=5)
                if not peer.closed:
                    break
            # Pipelined, then one by one (which names it: dropped), then without it.
            assert attempts <= 3, "reconnect loop"
            assert "neighbour" in _subscribed(peer) and "bad" not in _subscribed(peer)
            assert not bad.active
            assert events.count("consumer_cancelled") == 1
            assert [r for r in caplog.records if r.levelname == "ERROR" and "'bad'" in r.getMessage()]
        finally:
            manager.stop(timeout=5)


def test_a_consumer_cancelled_by_the_broker_whose_declare_then_closes_the_connection_is_dropped(broker, caplog) -> None:
    """Subscribed again after a broker cancel, its declare is tried first; a 503 there drops it (no reconnect loop)."""
    import kombu

    manager, peer, events = connect(broker)
    try:
        manager.consume("neighbour", lambda body, message: message.ack(), declare=False)
        bad = manager.consume(kombu.Queue("bad", kombu.Exchange("bogus-ex", "direct"), "rk"), lambda body, m: None)
        consume = peer.wait_for(lambda: _consumes(peer).get("bad"))
        bad.queue.exchange.type = "bogus-type"  # say the broker lost the plugin for it meanwhile
        peer.on("exchange.declare", _unknown_exchange_type)
        peer.send_method(consume.channel, "basic.cancel", consume["consumer_tag"], True)
        second = broker.accept()
        second.on("exchange.declare", _unknown_exchange_type)
        second.wait_for(lambda: _consumes(second).get("neighbour"))
        assert manager.wait_connected(5)
        assert not bad.active and "bad" not in _subscribed(second)
        assert [r for r in caplog.records if r.levelname == "ERROR" and "'bad'" in r.getMessage()]
        assert events.count("consumer_cancelled") == 2  # the broker's cancel, then the drop
    finally:
        manager.stop(timeout=5)
