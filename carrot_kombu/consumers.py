"""Consumers that survive reconnects: ``manager.consume``.

The thread that reads the connection only queues deliveries, in the
consumer's own mailbox; callbacks run on a bounded set of dispatcher threads
(``consumer_threads``, a :class:`Dispatcher` per manager), so a slow callback
never stalls heartbeats, and thousands of consumers cost no thread each.

* One consumer's callbacks run in delivery order, never two at a time: a
  consumer is handed to at most one dispatcher at a time (it is *scheduled*
  while its mailbox holds deliveries).
* A slow or blocked callback holds one dispatcher; another consumer's
  deliveries go to any free dispatcher.  A dispatcher serves a few
  deliveries of one consumer, then moves it to the back of the line (fair).
* When every dispatcher is busy, deliveries wait in their consumer's mailbox.
  The mailbox never grows past the consumer's prefetch: the broker sends no
  more than ``prefetch_count`` unacknowledged deliveries (``DEFAULT_PREFETCH``
  when none is set), so back-pressure is the broker's prefetch window, never
  unbounded buffering (``prefetch_count=0`` or ``no_ack`` lift that bound).

* Consumers share channels (see :class:`carrot_kombu._pyamqp.link.ConsumerChannels`):
  a channel the broker closes because of one consumer moves the others to
  another channel at once (``moved``: no event); only the culprit is
  reported as cancelled.
* The queue is declared on every connection before subscribing (kombu's
  ``Consumer`` does the same), unless ``declare=False``.
* After a reconnect every live consumer subscribes again, with its QoS.
* A consumer the broker cancels (queue deleted, its node down) is reported
  once (``consumer_cancelled``), shown as degraded in ``status()`` and
  subscribed again by the supervisor, with backoff, until the queue is back.
* ``cancel()`` writes nothing on the channel after its close: an ack the
  callback sends late is dropped (the broker requeues that delivery), never
  a connection error.
* A callback that raises never leaves its delivery unacknowledged (with a
  prefetch of 1 that stalled the consumer for good, silently): unless the
  callback settled it itself, it is rejected with requeue the first time and
  without requeue (dead-lettered, if the queue has a dead-letter exchange)
  when it was already redelivered; logged, and reported as
  ``consumer_error(queue, error, outcome)``.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Deque, Optional

import kombu

from ._metrics import Metrics
from .topology import declare_entity, is_server_named, refused_declare

if TYPE_CHECKING:
    from ._link import BatchItem, Link, Pipelined, Subscription
    from .events import EventBus

__all__ = ("Consumer", "Consumers", "Dispatcher")

logger = logging.getLogger("carrot_kombu")

Callback = Callable[[Any, Any], Any]

#: Deliveries a consumer holds unacknowledged when the caller set no
#: ``prefetch_count``: the reading thread always reads (heartbeats), so
#: without a prefetch limit a backlog would be pulled into memory whole.
DEFAULT_PREFETCH = 100
#: Dispatcher threads when the option is not given.
DEFAULT_CONSUMER_THREADS = 8
#: Deliveries of one consumer a dispatcher runs before it serves the next
#: ready consumer (fairness between busy consumers).
_BATCH = 16

#: Threads inside ``cancel()`` waiting for another consumer's running
#: callback -> the dispatcher running it (see Consumer._wait_running_callback).
_WAITING_ON: dict[threading.Thread, threading.Thread] = {}
_WAITING_LOCK = threading.Lock()
#: Seconds a dispatcher thread with nothing to do waits before it ends (a
#: stopped or idle manager keeps no thread).
_IDLE = 2.0


class Dispatcher:
    """The threads that run consumers' callbacks: at most ``size``, started on demand.

    One lock guards the line of ready consumers and the thread counts;
    callbacks run outside it.  A thread idle for ``_IDLE`` seconds ends.

    Args:
        size: Most threads at once.
    """

    def __init__(self, size: int = DEFAULT_CONSUMER_THREADS) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ready: Deque["Consumer"] = collections.deque()
        self._threads = 0
        self._idle = 0  # threads waiting for work (each counts itself)
        self._closed = False
        #: No consumer is left: idle threads end now rather than after _IDLE.
        self._shrink = False
        self._names = itertools.count(1)

    def __repr__(self) -> str:
        with self._lock:
            return (f"<Dispatcher threads={self._threads}/{self.size} idle={self._idle} "
                    f"ready={len(self._ready)}{' closed' if self._closed else ''}>")

    @property
    def threads(self) -> int:
        """Dispatcher threads alive now."""
        return self._threads

    def schedule(self, consumer: "Consumer") -> None:
        """``consumer`` has deliveries (any thread, never blocks on a callback)."""
        with self._lock:
            if self._closed:
                return
            self._shrink = False
            self._ready.append(consumer)
            self._wake.notify()
            # A notified thread takes one; more ready than idle threads: one more thread.
            if len(self._ready) <= self._idle or self._threads >= self.size:
                return
            self._threads += 1
            name = f"carrot-kombu-consumer-dispatch-{next(self._names)}"
        try:
            threading.Thread(target=self._run, name=name, daemon=True).start()
        except BaseException:
            with self._lock:
                self._threads -= 1
            raise

    def shrink(self) -> None:
        """No consumer is left: idle threads end now (busy ones when done)."""
        with self._lock:
            self._shrink = True
            self._wake.notify_all()

    def close(self) -> None:
        """Every thread ends after the callback in hand (no I/O, never blocks)."""
        with self._lock:
            self._closed = True
            self._ready.clear()
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._ready:
                    if self._closed or self._shrink:
                        self._threads -= 1
                        return
                    self._idle += 1
                    woke = self._wake.wait(_IDLE)
                    self._idle -= 1
                    if not woke and not self._ready:
                        self._threads -= 1
                        return
                consumer = self._ready.popleft()
            if consumer._serve(_BATCH):
                self.schedule(consumer)  # more waiting: back of the line


class Consumer:
    """A subscription made with :meth:`ConnectionManager.consume`; :meth:`cancel` ends it."""

    def __init__(
        self,
        owner: "Consumers",
        queue: kombu.Queue,
        callback: Callback,
        prefetch_count: Optional[int],
        no_ack: bool,
        arguments: Optional[dict[str, Any]],
        declare: bool = True,
    ) -> None:
        self._owner = owner
        self.queue = queue
        self.callback = callback
        self.prefetch_count = prefetch_count
        self.no_ack = no_ack
        self.arguments = arguments
        self.declare = declare
        self.server_named = is_server_named(queue)
        self.active = True
        #: Why the consumer is not subscribed right now (``None`` while it is).
        self.degraded: Optional[str] = None
        self._lock = threading.Lock()  # state only: never held during I/O
        self._subscribing = threading.Lock()  # one subscribe at a time (I/O)
        self._subscription: Optional["Subscription"] = None
        self._generation: Optional[int] = None
        #: Try what the broker may refuse on a channel of its own first (see
        #: Link.preflight): until subscribed once, and after a failed restore.
        self._preflight = True
        #: The subscription a cancel() still has to end; kept until done, so a
        #: cancel() that was interrupted is finished by the next.
        self._cleanup: Optional[tuple[Optional["Subscription"]]] = None
        # -- the mailbox, under _lock: deliveries the reading thread queued --
        self._mailbox: Deque[tuple[Any, Any]] = collections.deque()
        #: In the dispatcher's line or being served (by one dispatcher at most).
        self._scheduled = False
        self._started = False
        #: The dispatcher thread running this consumer's callback, if any.
        self._running: Optional[threading.Thread] = None
        self._callbacks_done = 0
        self._served = threading.Condition(self._lock)
        #: Deliveries of a cancelled consumer, for cancel() to requeue once
        #: the broker stopped delivering (``_swept``: after that, at once).
        self._set_aside: list[tuple[Any, Any]] = []
        self._swept = False

    def start(self) -> None:
        """Let the dispatchers run callbacks (deliveries wait in the mailbox until then)."""
        with self._lock:
            self._started = True
            schedule = bool(self._mailbox) and not self._scheduled
            self._scheduled = self._scheduled or schedule
        if schedule:
            self._owner.dispatcher.schedule(self)

    def __repr__(self) -> str:
        state = "cancelled" if not self.active else ("degraded" if self.degraded else "active")
        return f"<Consumer queue={self.queue.name!r} {state} generation={self._generation}>"

    @property
    def name(self) -> str:
        return f"consumer of queue {self.queue.name!r}"

    # -- subscription (supervisor or caller thread) ------------------------------------------------

    def subscribe(self, link: "Link") -> None:
        """Declare the queue (unless told not to) and subscribe on ``link``; idempotent per link.

        Raises:
            Exception: What the broker answered (the consumer stays registered).
        """
        from ._link import Pipelined

        with self._subscribing:
            with self._lock:
                if not self.active or self._generation == link.generation:
                    return
            subscription: Optional["Subscription"] = None
            recorded = False
            try:
                pipelined = self._pipelined()
                if (self._preflight or self.degraded is not None) and self._checked(link):
                    # The declare was taken on a throwaway channel: only the
                    # qos and consume go to the shared one (a refusal there
                    # would close it under its neighbours' running callbacks,
                    # whose acks would be dropped: their messages run twice).
                    pipelined = Pipelined(None, self._prefetch())
                subscription = self._new_subscription(link)
                # Refused before (degraded): on a channel of its own, so that
                # its next refusal (404, 406) closes no neighbour's channel.
                subscription.start(self.queue, self._prepare, self.no_ack, self.arguments, pipelined,
                                   isolated=self.degraded is not None)
                recorded = self._record(link, subscription)
            except BaseException:
                # Until it is recorded, a subscription is this call's to undo:
                # nobody else could cancel it (its channel is closed with it).
                if not recorded and subscription is not None:
                    subscription.close()
                raise

    def _checked(self, link: "Link") -> bool:
        """:meth:`_check` on a throwaway channel (see Link.preflight); False if not done (no channel id to spare)."""
        from .exceptions import ChannelLimitReached

        try:
            return link.preflight(self._check)
        except ChannelLimitReached:
            return False  # at channel_max: declared on the shared channel, as before

    def _check(self, channel: Any) -> None:
        """On a throwaway channel: what the broker may refuse before the consume (its declare, or a passive one)."""
        if self.declare:
            declare_entity(channel, self.queue, self.server_named)  # writes a server-given name back
        elif not self.server_named:
            channel.queue_declare(queue=self.queue.name, passive=True)

    def _new_subscription(self, link: "Link") -> "Subscription":
        subscription: Optional["Subscription"] = None
        # Each delivery carries the subscription it came on (its ack goes there).
        # message.channel.close() cancels this consumer; its other requests run on a pool lease.
        subscription = link.subscription(lambda raw: self._offer(subscription, raw),
                                         lambda reason: self._broker_cancelled(subscription, reason),
                                         lambda: self._moved(subscription),
                                         on_close=self.cancel, borrow=self._owner.borrow)
        return subscription

    def _record(self, link: "Link", subscription: "Subscription") -> bool:
        """Keep a started subscription (closed instead if cancelled meanwhile); True if kept."""
        recorded = False
        with self._lock:
            if self._still_active() and self._generation != link.generation:
                # One statement, no call inside: recorded, or not at all,
                # whatever interrupts this thread (see _sync).
                self._subscription, self._generation, recorded = subscription, link.generation, True
                self.degraded, self._preflight = None, False
        if not recorded:
            subscription.close()  # cancelled meanwhile
        return recorded

    def _pipelined(self) -> Optional["Pipelined"]:
        """The declare (awaiting nothing) and qos of a one-round-trip subscribe; None for a server-named queue."""
        from ._link import Pipelined

        if self.server_named:
            return None  # its declare's answer is its name
        declare = (lambda channel: declare_entity(channel, self.queue, nowait=True)) if self.declare else None
        return Pipelined(declare, self._prefetch())

    def batch_item(self, link: "Link") -> Optional["BatchItem"]:
        """This consumer's part of a pipelined restore, or None (subscribed, cancelled, server-named)."""
        from ._link import BatchItem

        with self._lock:
            if not self.active or self._generation == link.generation or self.server_named:
                return None
        declare = (lambda channel: declare_entity(channel, self.queue, nowait=True)) if self.declare else None
        return BatchItem(self._new_subscription(link), self.queue, self._prepare, declare, self._prefetch(),
                         self.no_ack, self.arguments)

    def batch_done(self, link: "Link", item: "BatchItem", subscribed: bool) -> None:
        """After :meth:`Link.subscribe_batch`: keep the subscription, or drop it (subscribed one by one)."""
        if not subscribed:
            with self._lock:
                # Subscribed one by one next: its chunk was refused, maybe for it.
                self._preflight = True
            item.subscription.close()
            return
        with self._subscribing:
            self._record(link, item.subscription)

    def _prepare(self, channel: Any) -> None:
        """On the subscription's new channel, before subscribing: declare and set the prefetch."""
        if self.declare:
            declare_entity(channel, self.queue, self.server_named)
        # Always sent, 0 included: on a channel shared with other consumers
        # the last qos applies to the next consume (per consumer on RabbitMQ).
        channel.basic_qos(0, self._prefetch(), False)

    def _prefetch(self) -> int:
        return DEFAULT_PREFETCH if self.prefetch_count is None else self.prefetch_count

    def _still_active(self) -> bool:
        return self.active  # not cancelled while we were subscribing

    def forget(self, generation: int) -> None:
        with self._lock:
            if self._generation != generation:
                return
            subscription, self._subscription, self._generation = self._subscription, None, None
        if subscription is not None:
            subscription.close()

    def cancel(self) -> None:
        """Stop consuming.

        A callback of this consumer running on a dispatcher is waited for
        (its ack still reaches the broker), unless ``cancel()`` is called
        from that very callback, or from a callback that this one is itself
        waiting on in a ``cancel()`` (two callbacks cancelling each other's
        consumers never wait for each other; the settlements of the one not
        waited for are dropped and its messages redelivered).  Deliveries already received but not yet
        handed to the callback are dropped (the broker redelivers them),
        except with ``no_ack`` where the broker already considers them
        delivered.  A cancel that was interrupted (an exception raised into
        this thread) is finished by calling it again.
        """
        with self._lock:
            if self.active:
                # One statement with no call in it: deactivated with its
                # cleanup on record, or neither, whatever interrupts us.
                (self.active, self._cleanup, self._subscription, self._generation) = (
                    False, (self._subscription,), None, None)
            cleanup = self._cleanup
        if cleanup is None:
            return
        (subscription,) = cleanup
        self._owner.remove(self)
        if subscription is not None:
            subscription.stop()  # no delivery comes after this
        self._wait_running_callback()  # its ack still reaches the broker
        for held, raw in self._sweep():
            held.requeue(raw)  # never handed to the callback: back to the queue now
        if subscription is not None:
            subscription.cancel()  # nothing is written after it; unacked deliveries go back to the queue
        with self._lock:
            if self._cleanup is cleanup:
                self._cleanup = None  # done: a later cancel() returns at once

    # -- the reading thread's side (our code: only queues) -------------------------------------

    def _moved(self, subscription: Optional["Subscription"]) -> None:
        """The broker closed a channel this consumer shared, because of another consumer."""
        with self._lock:
            if subscription is None or subscription is not self._subscription:
                return
            self._subscription = self._generation = None
        self._owner.moved(self)

    def _broker_cancelled(self, subscription: Optional["Subscription"], reason: Optional[str] = None) -> None:
        with self._lock:
            if subscription is None or subscription is not self._subscription:
                return
            self._subscription = self._generation = None
            self.degraded = reason or "cancelled by the broker"
        self._owner.broker_cancelled(self, subscription)

    # -- the reading thread queues, a dispatcher serves -------------------------------------------

    def _offer(self, subscription: Optional["Subscription"], raw: Any) -> None:
        """On the reading thread: queue a delivery; schedule the consumer if it was idle."""
        with self._lock:
            self._mailbox.append((subscription, raw))
            if self._scheduled or not self._started:
                return
            self._scheduled = True
        self._owner.dispatcher.schedule(self)

    def _wait_running_callback(self) -> None:
        """Until the callback running now (if any) has returned; not from inside it, nor in a cycle.

        Callbacks that cancel each other's consumers (A's cancels B while
        B's cancels A, or a longer ring) would each wait for the other for
        ever: the one that would close the ring does not wait (the other
        callback's settlements after this cancel are dropped, and the broker
        redelivers those messages).
        """
        me = threading.current_thread()
        with self._lock:
            done = self._callbacks_done
            running = self._running
        if running is None or running is me:
            return
        with _WAITING_LOCK:
            follow: Optional[threading.Thread] = running
            for _ in range(len(_WAITING_ON) + 1):
                if follow is None:
                    break
                if follow is me:
                    logger.debug("carrot_kombu: cancel() of %s does not wait: its callback waits on this one", self)
                    return
                follow = _WAITING_ON.get(follow)
            _WAITING_ON[me] = running
        try:
            with self._lock:
                while self._running is not None and self._running is not me and self._callbacks_done == done:
                    self._served.wait()
        finally:
            with _WAITING_LOCK:
                _WAITING_ON.pop(me, None)

    def _serve(self, budget: int) -> bool:
        """On a dispatcher: run up to ``budget`` deliveries in order; True if more wait."""
        me = threading.current_thread()
        for _ in range(budget):
            with self._lock:
                if not self._mailbox:
                    self._scheduled = False
                    return False
                subscription, raw = self._mailbox.popleft()
                self._running = me
            try:
                self._handle(subscription, raw)
            finally:
                with self._lock:
                    self._running = None
                    self._callbacks_done += 1
                    self._served.notify_all()
        with self._lock:
            if self._mailbox:
                return True  # still scheduled: the dispatcher puts it back in line
            self._scheduled = False
            return False

    def _sweep(self) -> list[tuple[Any, Any]]:
        """After cancel's ``stop()``: what the callback will never see (to requeue); later ones requeue themselves."""
        with self._lock:
            self._swept = True
            left = self._set_aside + list(self._mailbox)
            self._set_aside = []
            self._mailbox.clear()
        return [] if self.no_ack else left

    def _handle(self, subscription: Any, raw: Any) -> None:
        if not self.no_ack and not self.active:
            with self._lock:
                if not self._swept:
                    self._set_aside.append((subscription, raw))  # cancel() requeues it
                    return
            subscription.requeue(raw)
            return
        if not self.no_ack and not subscription.alive(raw):
            return  # its ack could go nowhere: the broker delivers it again
        message = None
        try:
            message = subscription.message(raw)
            body = message.decode()
        except Exception:
            # As Celery does: rejected (not requeued), or it would hold a
            # prefetch slot for ever and stall the consumer.
            logger.exception("carrot_kombu could not decode a delivery from %r; rejected (not requeued)",
                             self.queue.name)
            if not self.no_ack:
                subscription.reject(message, raw)
            return
        self._owner.metrics.delivered += 1  # one statement: atomic enough (see _metrics)
        with subscription.acting():  # a bad ack written now is this consumer's (shared channels)
            try:
                self.callback(body, message)
            except BaseException as exc:  # noqa: BLE001 - also sys.exit() in handler code: the consumer goes on
                self._callback_failed(message, exc)

    def _callback_failed(self, message: Any, exc: BaseException) -> None:
        """Settle a delivery whose callback raised: retried once, then rejected (see the module doc)."""
        if self.no_ack:
            outcome = "no_ack"  # the broker counted it delivered already
        elif message.acknowledged or _settled_on_channel(message):
            outcome = "settled"  # the callback acked/rejected it before raising: its choice stands
        elif _redelivered(message):
            outcome = "rejected"
        else:
            outcome = "requeued"
        logger.error("carrot_kombu consumer callback for %r raised; delivery %s %s", self.queue.name,
                     getattr(message, "delivery_tag", None), _OUTCOMES[outcome], exc_info=exc)
        if outcome in ("requeued", "rejected"):
            try:
                message.reject(requeue=outcome == "requeued")  # a lost connection's: dropped, redelivered anyway
            except Exception:  # noqa: BLE001 - its channel is going: the broker redelivers it
                logger.debug("could not reject a delivery whose callback raised", exc_info=True)
        self._owner.callback_failed(self, exc, outcome)


def _settled_on_channel(message: Any) -> bool:
    """The callback settled ``message`` through ``message.channel.basic_ack/basic_reject`` (not ``message.ack()``).

    Only the AMQP link's per-consumer channel can tell (``settled``); on
    other transports kombu's ``message.acknowledged`` is all there is.
    """
    settled = getattr(message.channel, "settled", None)
    return callable(settled) and settled(message.delivery_tag) is True


#: How the log line tells each outcome of a callback that raised.
_OUTCOMES = {
    "requeued": "rejected with requeue (first failure; redelivered once)",
    "rejected": "rejected without requeue (it had been redelivered: dead-lettered if the queue has a DLX)",
    "settled": "left as the callback settled it",
    "no_ack": "already acknowledged (no_ack)",
}


def _redelivered(message: Any) -> bool:
    """The broker's redelivered flag of a delivery."""
    info = getattr(message, "delivery_info", None) or {}
    if "redelivered" in info:
        return bool(info["redelivered"])
    # kombu's virtual transports (memory://) keep the flag in the payload only.
    raw = getattr(message, "_raw", None)
    return isinstance(raw, dict) and bool(raw.get("redelivered"))


class Consumers:
    """The consumers of one manager.

    Args:
        bus: Where ``consumer_cancelled`` is posted.
        resubscribe: Asks the supervisor to subscribe a consumer again
            (``resubscribe(consumer, quiet=False)``; must not block); ``quiet``:
            at once, with no event (it was moved, not cancelled).
    """

    def __init__(self, bus: "EventBus", resubscribe: Optional[Callable[..., None]] = None,
                 metrics: Optional[Metrics] = None, threads: int = DEFAULT_CONSUMER_THREADS) -> None:
        self.metrics = metrics or Metrics()
        self.dispatcher = Dispatcher(threads)
        self._lock = threading.Lock()
        self._consumers: dict[Consumer, None] = {}  # ordered; O(1) removal with thousands
        self._bus = bus
        self._resubscribe = resubscribe
        #: Restore pipelined (False after a connection-level refusal there,
        #: which names no consumer: the next restore goes one by one, which does).
        self._pipeline = True
        #: A pool lease for ``message.channel``'s requests that must not
        #: reach a shared channel (``lease_channel()``); set by the manager.
        self.lease_channel: Optional[Callable[[], Any]] = None

    def borrow(self) -> Any:
        """A pool lease (a context manager) for a consumer's ``message.channel`` request.

        Raises:
            Disconnected: No manager runs these consumers now.
        """
        lease = self.lease_channel
        if lease is None:
            from .exceptions import Disconnected

            raise Disconnected("the manager is not running: no channel to lease")
        return lease()

    def add(self, consumer: Consumer) -> None:
        with self._lock:
            self._consumers[consumer] = None

    def remove(self, consumer: Consumer) -> None:
        with self._lock:
            self._consumers.pop(consumer, None)
            empty = not self._consumers
        if empty:
            self.dispatcher.shrink()

    def snapshot(self) -> list[Consumer]:
        with self._lock:
            return list(self._consumers)

    def shutdown(self) -> None:
        """End every dispatcher thread without any I/O (the manager was abandoned)."""
        for consumer in self.snapshot():
            consumer.active = False
        self.dispatcher.close()

    def degraded(self) -> dict[str, str]:
        return {c.name: c.degraded for c in self.snapshot() if c.degraded}

    def restore(self, link: "Link") -> list[tuple[Consumer, BaseException]]:
        """Subscribe every consumer on ``link``.

        A consumer whose declare makes the broker close the connection (503
        unknown exchange type...) would do so on every reconnect: it is
        dropped (cancelled, ``consumer_cancelled`` and an error log), as
        ``manager.declare()``'s entities are.

        Returns:
            The consumers that could not subscribe (a channel error: the queue
            is gone or its node is down); they are retried by the supervisor.

        Raises:
            Exception: A connection error (the attempt fails).
        """
        from amqp.exceptions import ChannelError

        from .exceptions import ReplyTimeout

        failed = []
        consumers = self.snapshot()
        # Pipelined first (no round trip per consumer); the rest one by one.
        items = [(c, item) for c in consumers for item in [c.batch_item(link)] if item is not None]
        if len(items) > 1 and self._pipeline:
            try:
                results = link.subscribe_batch([item for _, item in items])
            except BaseException as exc:
                if refused_declare(exc) is not None:
                    self._pipeline = False
                raise
            for (consumer, item), subscribed in zip(items, results):
                consumer.batch_done(link, item, subscribed)
        for consumer in consumers:
            try:
                consumer.subscribe(link)
            except (ChannelError, ReplyTimeout) as exc:
                consumer.degraded = f"{type(exc).__name__}: {exc}"
                failed.append((consumer, exc))
            except BaseException as exc:
                refused = refused_declare(exc)
                if refused is not None:
                    self.drop(consumer, refused)
                raise
        self._pipeline = True
        return failed

    def drop(self, consumer: Consumer, error: BaseException) -> None:
        """Cancel a consumer whose declare made the broker close the connection (it would on every reconnect)."""
        consumer.degraded = f"dropped: the broker closed the connection at its declare: {type(error).__name__}: {error}"
        logger.error(
            "carrot_kombu dropped the %s: the broker closed the connection when its queue was declared "
            "(%s: %s); it is no longer subscribed on reconnect (fix it and consume again)",
            consumer.name, type(error).__name__, error,
        )
        self._bus.post("consumer_cancelled", consumer.queue.name)
        consumer.cancel()

    def forget(self, link: "Link") -> None:
        for consumer in self.snapshot():
            consumer.forget(link.generation)

    def callback_failed(self, consumer: Consumer, error: BaseException, outcome: str) -> None:
        """On a dispatcher: report a callback that raised."""
        self._bus.post("consumer_error", consumer.queue.name, error, outcome)

    def moved(self, consumer: Consumer) -> None:
        """On the reading thread: the consumer's shared channel closed because of another; subscribe it again now."""
        if self._resubscribe is not None:
            self._resubscribe(consumer, True)

    def broker_cancelled(self, consumer: Consumer, subscription: "Subscription") -> None:
        """On the reading thread: report once, drop the channel, ask for a new subscription."""
        self._bus.post("consumer_cancelled", consumer.queue.name)
        subscription.close()
        if self._resubscribe is not None:
            self._resubscribe(consumer)
