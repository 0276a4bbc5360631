"""``message.channel`` of a ``consume()`` delivery: one consumer's view of the channel it shares.

Up to ``CONSUMERS_PER_CHANNEL`` consumers share one py-amqp channel, and
whatever a callback does on a channel reaches every consumer on it: a
``close()`` unsubscribes them all, a request the broker refuses (a passive
declare of a missing exchange, a redeclare with other arguments, a publish
to a missing exchange) closes the channel under them, a ``basic_qos(global=
True)`` changes their prefetch.  So a callback never gets the shared channel:
its messages carry a :class:`ConsumerChannel`, which

* settles the consumer's *own* deliveries on the channel they came on
  (``basic_ack``/``basic_reject`` of one of its unsettled delivery tags; kombu's ``Message.ack/reject/requeue`` call these);
* ``close()`` (or ``basic_cancel`` of its own tag) cancels this consumer
  only, as ``Consumer.cancel()`` does;
* runs the requests a kombu user makes on any channel (declares, deletes,
  binds, purges, publishes) on a short-lived channel leased from the
  manager's pool: a refusal closes only that channel and raises to the
  caller (py-amqp's ``ChannelError`` subclass with the broker's reply text);
* refuses, with :class:`~carrot_kombu.ConsumerChannelRefused` naming the
  call, what only makes sense on the consumer's own channel and would
  reach the neighbours (``basic_qos``, ``basic_consume``, ``basic_get``,
  ``basic_recover``, another consumer's ``basic_cancel``, transactions,
  confirm mode, flow) and settling a delivery that is not this consumer's.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ContextManager, Optional, Protocol

from ..exceptions import ConsumerChannelRefused
from .chanstate import acting_for



class Member(Protocol):
    """What a :class:`ConsumerChannel` needs of its consumer's subscription (``link.AmqpSubscription``)."""

    finished: bool
    borrow: Optional[Callable[[], ContextManager[Any]]]

    @property
    def tag(self) -> Optional[str]: ...

    def holds(self, chan: Any) -> bool: ...

    def cancel_by_user(self) -> None: ...

__all__ = ("ConsumerChannel",)

logger = logging.getLogger("carrot_kombu")

_OWN_CHANNEL = "use manager.channel() for a channel of your own"


def _refused(call: str, why: str) -> Callable[..., Any]:
    def refuse(self: "ConsumerChannel", *args: Any, **kwargs: Any) -> Any:
        raise ConsumerChannelRefused(f"message.channel.{call}() is refused: {why}; nothing was sent")

    refuse.__name__ = refuse.__qualname__ = call
    refuse.__doc__ = f"Refused (:class:`~carrot_kombu.ConsumerChannelRefused`): {why}."
    return refuse


def _leased(call: str, sync: bool = False) -> Callable[..., Any]:
    def run(self: "ConsumerChannel", *args: Any, **kwargs: Any) -> Any:
        return self._on_leased_channel(call, args, kwargs, sync)

    run.__name__ = run.__qualname__ = call
    run.__doc__ = (f"``{call}`` on a channel leased from the manager's pool for this call"
                   f"{' (and one round trip: a refusal raises here)' if sync else ''}.")
    return run


class ConsumerChannel:
    """What a ``consume()`` callback's messages carry as ``message.channel`` (see the module doc).

    One per subscription, made at its first delivery, bound to the channel
    the subscription's deliveries come on (acks are per channel).
    """

    __slots__ = ("_chan", "_sub")

    #: Read by SafeMessage: a settlement on a lost connection is dropped (the broker redelivers).
    settle_strictly = False
    #: Read by SafeMessage: ``ack(multiple=True)`` is refused (it would settle the neighbours').
    shared_by_consumers = True

    def __init__(self, chan: Any, subscription: Member) -> None:
        self._chan = chan
        self._sub = subscription

    def bound_to(self, chan: Any) -> bool:
        """Settles deliveries of ``chan``."""
        return self._chan is chan

    def __repr__(self) -> str:
        return (f"<ConsumerChannel of consumer {self._sub.tag!r} on channel {self._chan.channel_id}"
                f"{'' if self.is_open else ' closed'}>")

    # -- what kombu reads ----------------------------------------------------------------------

    @property
    def channel_id(self) -> Any:
        """The shared channel's id (its deliveries' tags are numbered per channel)."""
        return self._chan.channel_id

    @property
    def consumer_tag(self) -> Any:
        """This consumer's tag on the channel."""
        return self._sub.tag

    @property
    def is_open(self) -> bool:
        """This consumer is still subscribed on the channel."""
        return self._sub.holds(self._chan) and not self._chan.carrot.writes_dropped()

    @property
    def no_ack_consumers(self) -> Any:
        """kombu's ``Message.ack`` asks whether the delivery's consumer is ``no_ack`` (then it sends nothing)."""
        return self._chan.no_ack_consumers

    @property
    def connection(self) -> Any:
        """The py-amqp connection (kombu code reads ``message.channel.connection.client``)."""
        return self._chan.connection

    def prepare_message(self, *args: Any, **kwargs: Any) -> Any:
        """kombu's message builder (no I/O): for ``basic_publish`` on this object."""
        return self._chan.prepare_message(*args, **kwargs)

    def prepare_queue_arguments(self, *args: Any, **kwargs: Any) -> Any:
        """kombu's ``Queue.declare()`` reads it (no I/O): ``kombu.Queue(...)(message.channel).declare()`` works."""
        return self._chan.prepare_queue_arguments(*args, **kwargs)

    # -- settling this consumer's deliveries -------------------------------------------------------

    def basic_ack(self, delivery_tag: int, multiple: bool = False, argsig: str = "Lb") -> None:
        """Acknowledge one of this consumer's deliveries (``multiple=True`` is refused: it would ack the neighbours')."""
        if multiple:
            raise ConsumerChannelRefused(
                "ack(multiple=True) is not allowed on a consume() delivery: its channel is shared with other "
                "consumers (basic_ack(multiple=True) would settle theirs); ack each message")
        self._settle("basic_ack", delivery_tag, lambda: self._chan.basic_ack(delivery_tag))

    def basic_reject(self, delivery_tag: int, requeue: bool = True, argsig: str = "Lb") -> None:
        """Reject one of this consumer's deliveries."""
        self._settle("basic_reject", delivery_tag, lambda: self._chan.basic_reject(delivery_tag, requeue))

    def settled(self, delivery_tag: int) -> bool:
        """Whether this consumer's delivery ``delivery_tag`` was settled through this channel already.

        False while it is unsettled, and when this channel can no longer say
        (closing, or its connection lost: the broker redelivers it anyway).
        """
        state = self._chan.carrot
        return not state.writes_dropped() and state.conn.dead is None and not state.owes(delivery_tag, self._sub.tag)

    def _settle(self, call: str, tag: int, send: Callable[[], None]) -> None:
        state = self._chan.carrot
        if not state.writes_dropped() and state.conn.dead is None and not state.owes(tag, self._sub.tag):
            if self._sub.finished:
                # Cancelled: what it had not settled went back to the queue with the cancel.
                logger.debug("dropped %s of delivery %s: its consumer was cancelled", call, tag)
                return
            raise ConsumerChannelRefused(
                f"message.channel.{call}(delivery_tag={tag}) is refused: not an unsettled delivery of this "
                "consumer (settled already, or another consumer's on this shared channel); nothing was sent")
        # Whose settlement this is, should the broker still refuse it (see acting_for).
        previous = acting_for(self._sub.tag)
        try:
            send()  # on a closing channel or a lost connection: dropped (the broker redelivers)
        finally:
            acting_for(previous)

    # -- this consumer's subscription --------------------------------------------------------------

    def close(self, *args: Any, **kwargs: Any) -> None:
        """Cancel this consumer (as ``Consumer.cancel()``); the others on the channel go on.

        Its deliveries not settled yet go back to the queue (as a closed
        channel's would); a later ack of one of them is dropped.
        """
        self._sub.cancel_by_user()

    def basic_cancel(self, consumer_tag: str, nowait: bool = False, argsig: str = "sb") -> Any:
        """``basic_cancel`` of this consumer's own tag: :meth:`close`; of another consumer's: refused."""
        if consumer_tag != self._sub.tag:
            raise ConsumerChannelRefused(
                f"message.channel.basic_cancel({consumer_tag!r}) is refused: not this consumer's tag "
                f"({self._sub.tag!r}); cancel a consumer with its Consumer.cancel(); nothing was sent")
        self.close()
        return consumer_tag

    # -- requests on a leased channel --------------------------------------------------------------

    def _on_leased_channel(self, call: str, args: tuple[Any, ...], kwargs: dict[str, Any], sync: bool) -> Any:
        borrow = self._sub.borrow
        if borrow is None:
            raise ConsumerChannelRefused(f"message.channel.{call}() is refused: no channel pool to run it on; "
                                         f"{_OWN_CHANNEL}")
        # A broker refusal closes only the leased channel (discarded on the way out) and raises here.
        # nowait: a refusal would come back after the lease is released, closing
        # it unseen; waited for here, it raises to the caller like any other.
        sync = sync or bool(kwargs.get("nowait"))
        with borrow() as lease:
            chan = lease.channel
            result = getattr(chan, call)(*args, **kwargs)
            if sync:
                chan.sync()  # a publish's refusal (404 no exchange) comes back asynchronously: wait for it
            return result

    exchange_declare = _leased("exchange_declare")
    exchange_delete = _leased("exchange_delete")
    exchange_bind = _leased("exchange_bind")
    exchange_unbind = _leased("exchange_unbind")
    queue_declare = _leased("queue_declare")
    queue_bind = _leased("queue_bind")
    queue_unbind = _leased("queue_unbind")
    queue_purge = _leased("queue_purge")
    queue_delete = _leased("queue_delete")
    basic_publish = _leased("basic_publish", sync=True)
    basic_publish_confirm = _leased("basic_publish_confirm")

    # -- refused: they would change the channel for the other consumers ----------------------------

    basic_qos = _refused("basic_qos", "the prefetch is per consumer, set with consume(prefetch_count=...); "
                                      "a qos here would change the other consumers' on this shared channel")
    basic_consume = _refused("basic_consume", f"this channel carries other consumers; use manager.consume() "
                                              f"or {_OWN_CHANNEL}")
    basic_get = _refused("basic_get", f"a delivery got here would be settled on a shared channel; {_OWN_CHANNEL}")
    basic_recover = _refused("basic_recover", "it would redeliver the other consumers' deliveries too")
    basic_recover_async = _refused("basic_recover_async", "it would redeliver the other consumers' deliveries too")
    confirm_select = _refused("confirm_select", f"the channel is shared with other consumers; {_OWN_CHANNEL}")
    tx_select = _refused("tx_select", f"the channel is shared with other consumers; {_OWN_CHANNEL}")
    tx_commit = _refused("tx_commit", f"the channel is shared with other consumers; {_OWN_CHANNEL}")
    tx_rollback = _refused("tx_rollback", f"the channel is shared with other consumers; {_OWN_CHANNEL}")
    flow = _refused("flow", "it would pause the other consumers on this shared channel")
    open = _refused("open", "the channel is open while the consumer is subscribed")
    send_method = _refused("send_method", f"raw methods would reach the other consumers; {_OWN_CHANNEL}")

    def __getattr__(self, name: str) -> Any:
        # Only for names not defined above: py-amqp's other internals stay out of reach.
        raise AttributeError(f"message.channel of a consume() delivery has no {name!r}: it is one consumer's view "
                             f"of a channel shared with other consumers; {_OWN_CHANNEL}")
