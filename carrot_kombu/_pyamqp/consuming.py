"""The consuming half of :class:`~carrot_kombu._pyamqp.channel.SupervisedChannel`.

Subscribing (kombu's ``basic_consume``, carrot_kombu's own
``consume_internal``), cancelling, ``basic_get``, and what the reading
thread does with deliveries and cancels.  :class:`ConsumingChannel` is a
base of ``SupervisedChannel`` only: it relies on its ``carrot`` state
(:class:`~carrot_kombu._pyamqp.chanstate.ChanState`), ``send_method`` and
``_send_nowait``, and is never instantiated on its own.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Optional

from amqp import spec
from amqp.exceptions import ConsumerCancelled
from kombu.transport import pyamqp

from .callbacks import cannot_settle
from .chanstate import ChanState
from .messages import _consumer_tag, _raise, new_consumer_tag

__all__ = ("ConsumingChannel",)

logger = logging.getLogger("carrot_kombu.amqp")


class ConsumingChannel(pyamqp.Channel):  # type: ignore[misc]
    """Subscriptions and deliveries of a :class:`SupervisedChannel` (its base class; see the module)."""

    # -- requests ---------------------------------------------------------------------------------

    def basic_consume(
        self,
        queue: str = "",
        consumer_tag: str = "",
        no_local: bool = False,
        no_ack: bool = False,
        exclusive: bool = False,
        nowait: bool = False,
        callback: Any = None,
        arguments: Any = None,
        on_cancel: Any = None,
        argsig: str = "BssbbbbF",
    ) -> Any:
        """Subscribe with the callback registered *before* the broker can deliver.

        py-amqp registers it after ConsumeOk; deliveries arriving in between
        would be rejected (or, with ``no_ack``, lost).  So the tag is chosen
        here when none is given.
        """
        tag = consumer_tag or f"carrot-kombu.{uuid.uuid4().hex}"
        self.callbacks[tag] = callback
        if on_cancel:
            self.cancel_callbacks[tag] = on_cancel
        if no_ack:
            self.no_ack_consumers.add(tag)
        try:
            self.send_method(
                spec.Basic.Consume, argsig,
                (0, queue, tag, no_local, no_ack, exclusive, nowait, arguments),
                wait=None if nowait else spec.Basic.ConsumeOk,
            )
        except BaseException:
            self.callbacks.pop(tag, None)
            self.cancel_callbacks.pop(tag, None)
            self.no_ack_consumers.discard(tag)
            raise
        return tag

    def basic_cancel(self, consumer_tag: str, nowait: bool = False, argsig: str = "sb") -> Any:
        """Cancel a consumer; deliveries that reached it before the cancel run now, in this thread.

        py-amqp dispatches them to the callback while it waits for cancel-ok
        (kombu's own suite relies on it: ``with consumer: drain_events()``
        then expects every message already sent); here they were queued for
        ``drain_events``, so they are run here instead (the same deliveries,
        in the same order, in the caller).  How many there can be is bounded
        as with py-amqp: there by the socket's buffers (TCP back-pressure),
        here by the consumer's prefetch (the kombu transport gives one to a
        consumer that set none, see ``default_prefetch_count``).

        Once the connection is lost (or the channel closed) a delivery that
        needs an ack is not run but dropped: the broker requeues it, so
        running it here, with an ack that can no longer be written, ran it
        twice (Celery cancels its task consumer when it restarts after a
        loss, and runs the task although the ack failed; issue 17 F1).
        py-amqp never reads those deliveries from a dead socket.  A
        ``no_ack`` consumer's deliveries still run: the broker forgot them.
        """
        result = super().basic_cancel(consumer_tag, nowait, argsig)
        state: ChanState = self.carrot
        dropped = 0
        for fn, args in state.events.take(lambda fn, args: _consumer_tag(args) == consumer_tag):
            # Checked before each one: the connection may die while one runs.
            if cannot_settle(args):
                dropped += 1
                continue
            fn(*args)
        if dropped:
            logger.debug("dropped %d deliveries of cancelled consumer %s: their acks cannot reach the broker "
                         "(it requeues them)", dropped, consumer_tag)
        return result

    def consume_internal(
        self,
        queue: str,
        sink: Callable[[Any], None],
        on_cancel: Callable[[str], None],
        *,
        no_ack: bool = False,
        arguments: Any = None,
        nowait: bool = False,
        tag: Optional[str] = None,
    ) -> str:
        """Subscribe carrot_kombu's own consumer: deliveries go to ``sink`` on the reading thread.

        ``sink`` and ``on_cancel`` are our code (they only queue); never user
        code.  With ``nowait`` nothing is awaited: a refusal closes the channel.
        ``tag``: the consumer tag (:func:`new_consumer_tag`), known to the
        caller before the consume is written: deliveries may be handled
        before this call returns.
        """
        tag = tag or new_consumer_tag()
        state: ChanState = self.carrot
        state.sinks[tag] = sink
        state.cancel_sinks[tag] = on_cancel
        if state.on_closed is None:
            # The broker closing the channel (an ack with a bad tag: 406) ends
            # the subscription as surely as a basic.cancel does.
            state.on_closed = lambda error, method: on_cancel(tag)
        try:
            return self.basic_consume(queue, tag, no_ack=no_ack, callback=sink, arguments=arguments,  # type: ignore[no-any-return]
                                      nowait=nowait)
        except BaseException:
            state.sinks.pop(tag, None)
            state.cancel_sinks.pop(tag, None)
            raise

    def qos_nowait(self, prefetch_count: int) -> None:
        """``basic.qos(prefetch_count, global=False)`` without awaiting its qos-ok (pipelined subscribes).

        Its qos-ok arrives with nobody waiting (ignored); a later request
        awaited on another method (see :meth:`sync`) proves it was applied.
        """
        self.send_method(spec.Basic.Qos, "lBb", (0, prefetch_count, False))

    def basic_get(self, queue: str = "", no_ack: bool = False, argsig: str = "Bsb") -> Any:
        # Whether the message must be acked is known only here (the get-ok
        # does not say): remembered for _on_get_ok, on this thread.
        self._pending_get_no_ack = bool(no_ack)
        return super().basic_get(queue, no_ack, argsig)

    # -- the reading thread ---------------------------------------------------------------------

    def _on_get_ok(self, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str,
                   message_count: int, msg: Any) -> Any:
        if not self._pending_get_no_ack:
            self.carrot.delivered(delivery_tag)
        return super()._on_get_ok(delivery_tag, redelivered, exchange, routing_key, message_count, msg)

    def _on_basic_deliver(
        self, consumer_tag: str, delivery_tag: int, redelivered: bool, exchange: str, routing_key: str, msg: Any
    ) -> None:
        msg.channel = self
        msg.delivery_info = {
            "consumer_tag": consumer_tag,
            "delivery_tag": delivery_tag,
            "redelivered": redelivered,
            "exchange": exchange,
            "routing_key": routing_key,
        }
        state: ChanState = self.carrot
        sink = state.sinks.get(consumer_tag)
        callback = None if sink is not None else self.callbacks.get(consumer_tag)
        if sink is None and callback is None:
            if consumer_tag not in self.no_ack_consumers:
                # Never recorded as owed: nobody else (a cancel's give-back)
                # can settle it too, which on a shared channel would be a 406.
                logger.debug("rejected delivery %s for unknown consumer %s (requeued)", delivery_tag, consumer_tag)
                self._send_nowait(spec.Basic.Reject, "Lb", (delivery_tag, True))
            return
        if consumer_tag not in self.no_ack_consumers:
            state.delivered(delivery_tag, consumer_tag)
        if sink is not None:
            sink(msg)
        elif callback is not None:
            state.events.post(callback, msg)

    def _on_basic_cancel(self, consumer_tag: str) -> None:
        """The broker cancelled a consumer (its queue was deleted, its node went down)."""
        state: ChanState = self.carrot
        self.no_ack_consumers.discard(consumer_tag)
        self.callbacks.pop(consumer_tag, None)
        state.sinks.pop(consumer_tag, None)
        sink = state.cancel_sinks.pop(consumer_tag, None)
        user = self.cancel_callbacks.pop(consumer_tag, None)
        if sink is not None:
            sink(consumer_tag)
        elif user is not None:
            state.events.post(user, consumer_tag)
        else:
            # py-amqp raises this from drain_events; so do we, in the drainer.
            state.events.post(_raise, ConsumerCancelled(consumer_tag, spec.Basic.Cancel))

    def _on_basic_cancel_ok(self, consumer_tag: str) -> None:
        state: ChanState = self.carrot
        self.no_ack_consumers.discard(consumer_tag)
        self.callbacks.pop(consumer_tag, None)
        self.cancel_callbacks.pop(consumer_tag, None)
        state.sinks.pop(consumer_tag, None)
        state.cancel_sinks.pop(consumer_tag, None)
        state.resolve(spec.Basic.CancelOk, (consumer_tag,))
