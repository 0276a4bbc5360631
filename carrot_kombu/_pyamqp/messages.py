"""What a delivery carries: its message (:class:`SafeMessage`) and our consumer tags.

Split from ``channel.py``: the kombu message class a :class:`SupervisedChannel`
hands out, the consumer tags it chooses, and the small helpers that read a
queued delivery's consumer tag or raise an error in the drainer.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from typing import Any, Callable, Optional

from kombu.transport import pyamqp

from ..exceptions import ConsumerChannelRefused, Disconnected
from .chanstate import acting_for

__all__ = ("SafeMessage", "new_consumer_tag")

logger = logging.getLogger("carrot_kombu.amqp")


class SafeMessage(pyamqp.Message):  # type: ignore[misc]
    """A kombu message whose ack/reject of a lost connection's delivery is dropped.

    The delivery tag belongs to a dead channel: sending it anywhere would be
    wrong (on a new channel the broker answers 406 and closes it).  The broker
    redelivers the message on its own.
    """

    def _settle(self, how: str, fn: Callable[..., Any], *args: Any) -> None:
        # Whose settlement this is, for a channel shared by consumers (a 406 names no consumer).
        previous = acting_for((self.delivery_info or {}).get("consumer_tag"))
        try:
            fn(*args)
        except Disconnected:
            if getattr(self.channel, "settle_strictly", False):
                raise  # a kombu/Celery channel: py-amqp raises here, and Celery relies on it
            logger.debug("dropped %s of delivery %s: its connection is gone", how, self.delivery_tag)
        finally:
            acting_for(previous)

    def ack(self, multiple: bool = False) -> None:
        if multiple and getattr(self.channel, "shared_by_consumers", False):
            # The channel carries other consumers' deliveries too: a multiple
            # ack would settle theirs (and lose them if their callbacks fail).
            raise ConsumerChannelRefused("ack(multiple=True) is not allowed on a consume() delivery: its channel "
                                         "is shared with other consumers; ack each message")
        self._settle("ack", super().ack, multiple)

    def reject(self, requeue: bool = False) -> None:
        self._settle("reject", super().reject, requeue)

    def requeue(self) -> None:
        self._settle("requeue", super().requeue)


#: Our consumer tags: unique per process (a counter; no uuid per consumer:
#: ``os.urandom`` releases the GIL, which costs a scheduling slice per call
#: when thousands subscribe while deliveries flow).
_TAG_PREFIX = f"carrot-kombu.{uuid.uuid4().hex[:12]}."
_tag_numbers = itertools.count(1)


def new_consumer_tag() -> str:
    """A consumer tag of ours (unique in the process)."""
    return f"{_TAG_PREFIX}{next(_tag_numbers)}"


def _raise(exc: BaseException) -> None:
    raise exc


def _consumer_tag(args: tuple[Any, ...]) -> Optional[str]:
    info = getattr(args[0], "delivery_info", None) if args else None
    return info.get("consumer_tag") if isinstance(info, dict) else None
