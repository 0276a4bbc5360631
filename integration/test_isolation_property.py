"""Isolation invariants as a stateful property test, on the real broker.

A ``hypothesis`` state machine interleaves, from several threads at once:
good publishes, bad publishes of every kind a caller can make (a missing
exchange, a message the broker nacks, an unencodable header, a routing key
too long, an int expiration), ``publish_many``, lease calls (some after a
fire-and-forget publish the broker refuses), consumers started and
cancelled, and connection cuts through a fault proxy.  After every step it
checks what users rely on:

* every call that returned "confirmed" has its message stored (checked by
  reading the queue back at the end, with what consumers received);
* no call the broker nacked or refused returned "confirmed";
* a caller's own mistake fails only that caller, with its own error;
* nothing waited past its timeout (plus a small slack);
* the connection was never lost except by a cut.

The default run is small enough for CI; ``CARROT_KOMBU_PROPERTY_EXAMPLES``
(and ``CARROT_KOMBU_PROPERTY_STEPS``) make it longer.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any, Callable, Optional

import kombu
from amqp.exceptions import NotFound
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from carrot_kombu import Backoff, ConnectionManager, Disconnected, Nacked, PublishTimeout, Rejected

from .proxy import FaultProxy

EXAMPLES = int(os.environ.get("CARROT_KOMBU_PROPERTY_EXAMPLES", "8"))
STEPS = int(os.environ.get("CARROT_KOMBU_PROPERTY_STEPS", "20"))
TIMEOUT = 8.0
#: Time a call may take beyond its own timeout (scheduling on a loaded 2-core machine).
SLACK = 2.0

#: Errors a *good* call may get while a cut is in progress (it then says so honestly).
TRANSIENT = (Disconnected, PublishTimeout)


class Outcome:
    __slots__ = ("kind", "ids", "error", "seconds", "cut_during")

    def __init__(self, kind: str, ids: list[str], error: Optional[BaseException], seconds: float,
                 cut_during: bool) -> None:
        self.kind = kind
        self.ids = ids
        self.error = error
        self.seconds = seconds
        self.cut_during = cut_during


class Isolation(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.proxy = FaultProxy("127.0.0.1", 5672)
        self.queue = f"ck-prop-{uuid.uuid4().hex[:8]}"
        self.nack_queue = f"ck-prop-nack-{uuid.uuid4().hex[:8]}"
        self.manager = ConnectionManager(
            self.proxy.url(), backoff=Backoff(min=0.05, max=0.2), pool_limit=4, max_pending=50,
            reply_timeout=5, client_properties={"connection_name": self.queue},
        ).start(wait=10)
        self.disconnects = 0
        self.manager.on("disconnected", self._on_disconnected)
        self.cuts = 0
        self.cutting = threading.Event()
        self.lock = threading.Lock()
        self.confirmed: set[str] = set()
        self.refused: set[str] = set()
        self.consumed: set[str] = set()
        self.outcomes: list[Outcome] = []
        self.consumers: list[Any] = []
        self.seq = 0
        self.manager.declare(kombu.Queue(self.queue, durable=False, auto_delete=False))
        # Always full: every publish to it is nacked (reject-publish overflow).
        nack = kombu.Queue(self.nack_queue, durable=False, auto_delete=False,
                           queue_arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
        self.manager.declare(nack)
        self.manager.publish({"id": "filler"}, routing_key=self.nack_queue, timeout=TIMEOUT)

    def _on_disconnected(self, error: Any) -> None:
        with self.lock:
            self.disconnects += 1

    def _ids(self, n: int) -> list[str]:
        with self.lock:
            start = self.seq
            self.seq += n
        return [f"{self.queue}-{i}" for i in range(start, start + n)]

    # -- operations (each runs in its own thread within a step) ---------------------------------

    def _good_publish(self) -> Outcome:
        ids = self._ids(1)
        return self._timed("good", ids, lambda: self.manager.publish(
            {"id": ids[0]}, routing_key=self.queue, message_id=ids[0], timeout=TIMEOUT))

    def _publish_many(self, n: int) -> Outcome:
        ids = self._ids(n)
        return self._timed("many", ids, lambda: self.manager.publish_many(
            [{"id": i} for i in ids], routing_key=self.queue, timeout=TIMEOUT))

    def _bad_publish(self, kind: str) -> Outcome:
        ids = self._ids(1)
        body = {"id": ids[0]}
        calls: dict[str, Callable[[], None]] = {
            "missing_exchange": lambda: self.manager.publish(body, exchange=f"ck-missing-{uuid.uuid4().hex[:6]}",
                                                             routing_key="x", timeout=TIMEOUT),
            "nacked": lambda: self.manager.publish(body, routing_key=self.nack_queue, timeout=TIMEOUT),
            "huge_header": lambda: self.manager.publish(body, routing_key=self.queue, headers={"n": 2**64},
                                                        timeout=TIMEOUT),
            "set_header": lambda: self.manager.publish(body, routing_key=self.queue, headers={"s": {1, 2}},
                                                       timeout=TIMEOUT),
            "long_key": lambda: self.manager.publish(body, routing_key="k" * 300, timeout=TIMEOUT),
            "int_expiration": lambda: self.manager.publish(body, routing_key=self.queue, expiration=60000,
                                                           timeout=TIMEOUT),
        }
        return self._timed(f"bad:{kind}", ids, calls[kind])

    def _lease_call(self, refused_first: bool) -> Outcome:
        def call() -> None:
            with self.manager.channel(timeout=TIMEOUT) as lease:
                if refused_first:
                    lease.basic_publish(lease.prepare_message(b"x"), exchange=f"ck-missing-{uuid.uuid4().hex[:6]}")
            with self.manager.channel(timeout=TIMEOUT) as lease:
                name, _, _ = lease.queue_declare(self.queue, passive=True)
                assert name == self.queue, f"asked about {self.queue}, told about {name}"

        return self._timed("lease", [], call)

    def _timed(self, kind: str, ids: list[str], call: Callable[[], None]) -> Outcome:
        cut_before = self.cuts
        started = time.monotonic()
        error: Optional[BaseException] = None
        try:
            call()
        except BaseException as exc:  # recorded and judged by the invariants
            error = exc
        seconds = time.monotonic() - started
        outcome = Outcome(kind, ids, error, seconds, self.cutting.is_set() or self.cuts != cut_before)
        with self.lock:
            self.outcomes.append(outcome)
            if error is None and kind in ("good", "many"):
                self.confirmed.update(ids)
            if kind.startswith("bad:") and error is None:
                self.refused.update(ids)  # judged below: a bad call must never succeed
        return outcome

    def _concurrently(self, operations: list[Callable[[], Any]]) -> None:
        threads = [threading.Thread(target=op, daemon=True) for op in operations]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT + SLACK + 10)
        assert not any(t.is_alive() for t in threads), "an operation hung past every timeout"

    # -- rules ----------------------------------------------------------------------------------

    @rule(goods=st.integers(1, 3), bad=st.sampled_from(["missing_exchange", "nacked", "huge_header", "set_header",
                                                       "long_key", "int_expiration"]),
          batch=st.integers(0, 40), lease=st.booleans())
    def mixed_step(self, goods: int, bad: str, batch: int, lease: bool) -> None:
        ops: list[Callable[[], Any]] = [self._good_publish for _ in range(goods)]
        ops.append(lambda: self._bad_publish(bad))
        if batch:
            ops.append(lambda: self._publish_many(batch))
        ops.append(lambda: self._lease_call(refused_first=lease))
        self._concurrently(ops)

    @rule()
    def cut(self) -> None:
        self.cutting.set()
        try:
            self.cuts += 1
            self.proxy.cut()
            ops: list[Callable[[], Any]] = [self._good_publish, self._good_publish, lambda: self._publish_many(10)]
            self._concurrently(ops)
        finally:
            self.cutting.clear()

    @rule()
    def start_consumer(self) -> None:
        if len(self.consumers) >= 2:
            return

        def on_message(body: Any, message: Any) -> None:
            with self.lock:
                self.consumed.add(body.get("id"))
            message.ack()

        try:
            self.consumers.append(self.manager.consume(self.queue, on_message, prefetch_count=10, declare=False))
        except Disconnected:
            pass  # during a reconnect: fine, nothing registered

    @rule()
    def cancel_consumer(self) -> None:
        if self.consumers:
            self.consumers.pop(0).cancel()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def each_caller_gets_its_own_answer(self) -> None:
        with self.lock:
            outcomes = list(self.outcomes)
        for o in outcomes:
            assert o.seconds <= TIMEOUT + SLACK, f"{o.kind} waited {o.seconds:.1f}s (timeout {TIMEOUT}s)"
            if o.kind.startswith("bad:"):
                expected = {
                    "bad:missing_exchange": (Rejected,), "bad:nacked": (Nacked,),
                    "bad:huge_header": (ValueError,), "bad:set_header": (TypeError,),
                    "bad:long_key": (ValueError,), "bad:int_expiration": (TypeError,),
                }[o.kind]
                allowed = expected + (TRANSIENT if o.cut_during else ())
                assert isinstance(o.error, allowed), f"{o.kind} got {o.error!r}"
                if isinstance(o.error, Rejected):
                    assert o.error.reply_code == 404
            elif o.error is not None:
                assert o.cut_during and isinstance(o.error, TRANSIENT + (OSError,)), (
                    f"a good {o.kind} call failed without a cut: {o.error!r}")
        assert not self.refused, f"bad publishes returned confirmed: {sorted(self.refused)[:3]}"

    @invariant()
    def the_connection_is_lost_only_by_cuts(self) -> None:
        with self.lock:
            disconnects = self.disconnects
        assert disconnects <= self.cuts, f"{disconnects} disconnects for {self.cuts} cuts"

    def teardown(self) -> None:
        try:
            for consumer in self.consumers:
                consumer.cancel()
            stored = set(self.consumed)
            deadline = time.monotonic() + 20
            with kombu.Connection("amqp://guest:guest@127.0.0.1:5672//") as conn:
                channel = conn.channel()
                while time.monotonic() < deadline:
                    message = channel.basic_get(self.queue, no_ack=True)
                    if message is None:
                        if self.confirmed <= stored:
                            break
                        time.sleep(0.05)
                        continue
                    stored.add(kombu.serialization.loads(
                        message.body, message.properties.get("content_type"),
                        message.properties.get("content_encoding")).get("id"))
                for name in (self.queue, self.nack_queue):
                    try:
                        channel.queue_delete(name)
                    except NotFound:
                        pass
                channel.close()
            lost = self.confirmed - stored
            assert not lost, f"{len(lost)} confirmed message(s) not stored: {sorted(lost)[:5]}"
        finally:
            self.manager.stop(timeout=5)
            self.proxy.close()


Isolation.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
    suppress_health_check=list(HealthCheck),
)
TestIsolation = Isolation.TestCase
