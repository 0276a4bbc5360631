"""Consumers that survive reconnects: ``manager.consume``.

Each consumer has its own channel and its own worker thread.  The reader
thread only queues deliveries; the callback runs on the worker, so a slow
callback never stalls heartbeats or other channels.  After a reconnect every
live consumer subscribes again, with its QoS.  Acks for deliveries of a lost
connection are dropped (they cannot be sent anywhere valid).
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import uuid
from typing import TYPE_CHECKING, Any, Callable, Optional

import kombu
from amqp.exceptions import ChannelError

if TYPE_CHECKING:
    from ._link import Link
    from .events import EventBus
    from .topology import Topology

__all__ = ("Consumer", "Consumers")

logger = logging.getLogger("carrot_kombu")

Callback = Callable[[Any, Any], Any]
_STOP = object()


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
    ) -> None:
        self._owner = owner
        self.queue = queue
        self.callback = callback
        self.prefetch_count = prefetch_count
        self.no_ack = no_ack
        self.arguments = arguments
        self.active = True
        self._lock = threading.Lock()  # state only: never held during I/O
        self._subscribing = threading.Lock()  # one subscribe at a time (I/O)
        self._channel: Any = None
        self._tag: Optional[str] = None
        self._generation: Optional[int] = None
        self._deliveries: "_queue.SimpleQueue[Any]" = _queue.SimpleQueue()
        self._worker = threading.Thread(
            target=self._run, name=f"carrot-kombu-consumer-{queue.name or 'server-named'}", daemon=True
        )
        self._worker.start()

    def __repr__(self) -> str:
        state = "active" if self.active else "cancelled"
        return f"<Consumer queue={self.queue.name!r} {state} generation={self._generation}>"

    # -- subscription (supervisor or caller thread) ------------------------------------------------

    def subscribe(self, link: "Link") -> None:
        """Subscribe on ``link`` unless already subscribed there (idempotent).

        The state lock is not held during the requests: the reader thread may
        need it (a broker cancel) while our reply is on its way.
        """
        with self._subscribing:
            with self._lock:
                if not self.active or self._generation == link.generation:
                    return
            channel = link.open_channel()
            tag = f"carrot-kombu.{uuid.uuid4().hex}"
            with self._lock:
                self._tag = tag  # a cancel for this tag may arrive before ConsumeOk returns
            try:
                if self.prefetch_count is not None:
                    channel.basic_qos(0, self.prefetch_count, False)
                channel.basic_consume(
                    queue=self.queue.name, consumer_tag=tag, no_ack=self.no_ack,
                    callback=self._deliver, on_cancel=self._broker_cancelled, arguments=self.arguments,
                )
            except BaseException:
                _close(channel)
                raise
            with self._lock:
                if self._tag == tag:
                    self._channel, self._generation = channel, link.generation

    def forget(self, generation: int) -> None:
        with self._lock:
            if self._generation == generation:
                self._channel = self._tag = self._generation = None

    def cancel(self) -> None:
        """Stop consuming; deliveries already queued are still handed to the callback."""
        with self._lock:
            if not self.active:
                return
            self.active = False
            channel, tag = self._channel, self._tag
            self._channel = self._tag = self._generation = None
        self._owner._remove(self)
        if channel is not None:
            try:
                channel.basic_cancel(tag)
            except Exception:
                logger.debug("ignored error cancelling a consumer", exc_info=True)
            _close(channel)  # unacked deliveries go back to the queue
        self._deliveries.put(_STOP)

    # -- the reader thread's side --------------------------------------------------------------

    def _deliver(self, raw: Any) -> None:
        self._deliveries.put(raw)

    def _broker_cancelled(self, tag: str) -> None:
        """The broker cancelled us (queue deleted): resubscribe if we declare the queue."""
        with self._lock:
            if tag != self._tag:
                return
            channel = self._channel
            self._channel = self._tag = self._generation = None
        self._owner._broker_cancelled(self, channel)

    # -- the worker --------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            raw = self._deliveries.get()
            if raw is _STOP:
                return
            try:
                # py-amqp hands raw messages; kombu's virtual transports, kombu messages
                message = raw if hasattr(raw, "decode") else raw.channel.message_to_python(raw)
                body = message.decode()
            except Exception:
                logger.exception("carrot_kombu could not decode a delivery from %r", self.queue.name)
                continue
            try:
                self.callback(body, message)
            except Exception:
                logger.exception("carrot_kombu consumer callback for %r raised", self.queue.name)


class Consumers:
    """The consumers of one manager."""

    def __init__(self, bus: "EventBus", topology: "Topology") -> None:
        self._lock = threading.Lock()
        self._consumers: list[Consumer] = []
        self._bus = bus
        self._topology = topology
        self._current: Optional["Link"] = None

    def add(self, consumer: Consumer) -> None:
        with self._lock:
            self._consumers.append(consumer)

    def _remove(self, consumer: Consumer) -> None:
        with self._lock:
            if consumer in self._consumers:
                self._consumers.remove(consumer)

    def snapshot(self) -> list[Consumer]:
        with self._lock:
            return list(self._consumers)

    def restore(self, link: "Link") -> None:
        """Subscribe every consumer on ``link``.

        A consumer whose queue is gone (a channel error) is reported with
        ``consumer_cancelled`` and tried again on the next connection; it
        does not fail the connection.  Connection errors do.
        """
        with self._lock:
            self._current = link
        for consumer in self.snapshot():
            try:
                consumer.subscribe(link)
            except ChannelError as exc:
                logger.warning("carrot_kombu could not resubscribe to %r: %s", consumer.queue.name, exc)
                self._bus.post("consumer_cancelled", consumer.queue.name)

    def forget(self, link: "Link") -> None:
        with self._lock:
            if self._current is link:
                self._current = None
        for consumer in self.snapshot():
            consumer.forget(link.generation)

    def current(self) -> Optional["Link"]:
        with self._lock:
            return self._current

    def _broker_cancelled(self, consumer: Consumer, channel: Any) -> None:
        self._bus.post("consumer_cancelled", consumer.queue.name)
        # Off the reader thread: resubscribing needs replies only the reader reads.
        threading.Thread(
            target=self._resubscribe, args=(consumer, channel), name="carrot-kombu-resubscribe", daemon=True
        ).start()

    def _resubscribe(self, consumer: Consumer, channel: Any) -> None:
        _close(channel)
        link = self.current()
        if link is None or not consumer.active:
            return  # the next connection subscribes it
        if not self._topology.declares(consumer.queue):
            logger.warning("carrot_kombu consumer of %r cancelled by the broker; not declared by the "
                           "manager, so not resubscribed", consumer.queue.name)
            return
        try:
            setup = link.open_channel()
            try:
                self._topology.apply(setup, (consumer.queue,))
            finally:
                _close(setup)
            consumer.subscribe(link)
        except Exception:
            logger.warning("carrot_kombu could not resubscribe to %r", consumer.queue.name, exc_info=True)


def _close(channel: Any) -> None:
    if channel is None:
        return
    try:
        channel.close()
    except Exception:
        logger.debug("ignored error while closing a consumer channel", exc_info=True)
