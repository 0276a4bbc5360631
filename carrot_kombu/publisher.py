"""Confirmed publishing that survives reconnects: ``manager.publish``.

One confirm-mode channel per connection carries every ``publish`` from every
thread, pipelined: a caller writes its message and waits for the broker's
``basic.ack`` for that delivery tag, while other callers keep writing.  Until
then the message stays in the pending table; after a reconnect every pending
message that was not confirmed is published again, in order (at-least-once:
the broker may have stored it before the connection died).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

import amqp
from kombu.serialization import dumps

from .exceptions import Blocked, CarrotKombuError, Disconnected

__all__ = ("Publisher", "PublishError", "Nacked", "Unroutable", "PublishTimeout")

logger = logging.getLogger("carrot_kombu")

#: Header that lets a returned mandatory message find its caller.
RETURN_HEADER = "x-carrot-kombu-publish-id"


#: publish_many writes this many messages (or bytes) per socket write.
_CHUNK_MESSAGES = 256
_CHUNK_BYTES = 1 << 20


class PublishError(CarrotKombuError):
    """A ``manager.publish`` did not end with the broker's confirm."""


class Nacked(PublishError):
    """The broker refused the message (``basic.nack``): it was not stored."""


class Unroutable(PublishError):
    """A ``mandatory`` message matched no queue; the broker returned it."""


class PublishTimeout(PublishError):
    """No confirm within the timeout.

    ``outcome`` tells what is known: ``"unknown"`` when the message was
    written and may have been stored (publish it again only if duplicates are
    acceptable), ``"not_sent"`` when it never left this process.
    """

    def __init__(self, message: str, reason: Optional[BaseException] = None, outcome: str = "unknown") -> None:
        super().__init__(message, reason)
        self.outcome = outcome

    def __reduce__(self) -> Any:
        return (type(self), (self.message, self.reason, self.outcome))


class _Pending:
    __slots__ = ("id", "body", "content_type", "content_encoding", "headers", "properties",
                 "exchange", "routing_key", "mandatory", "done", "outcome", "detail", "written")

    def __init__(self, pid: int, exchange: str, routing_key: str, mandatory: bool) -> None:
        self.id = pid
        self.body: Any = None
        self.content_type: Optional[str] = None
        self.content_encoding: Optional[str] = None
        self.headers: dict[str, Any] = {}
        self.properties: dict[str, Any] = {}
        self.exchange = exchange
        self.routing_key = routing_key
        self.mandatory = mandatory
        self.done = threading.Event()
        self.outcome: Optional[str] = None  # "ack", "nack", "returned"
        self.detail = ""
        self.written = False


class Publisher:
    """The pending table and the confirm channel of one manager."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()  # delivery tags follow write order
        self._pending: "OrderedDict[int, _Pending]" = OrderedDict()
        self._by_tag: dict[int, _Pending] = {}
        self._channel: Any = None
        self._next_tag = 1
        self._low = 1  # no delivery tag below this one is still waiting
        self._ids = itertools.count(1)
        self._generation: Optional[int] = None
        self._confirms = True
        self.used = False  # no confirm channel is opened until the first publish

    # -- supervisor side -------------------------------------------------------------

    def needs(self, generation: int) -> bool:
        """Whether a confirm channel must be attached for this connection."""
        with self._cond:
            return self.used and self._generation != generation

    def attach(self, channel: Any, generation: int) -> None:
        """Put ``channel`` in confirm mode and publish again what is unconfirmed."""
        # kombu's in-process transports have no confirms: a publish there is
        # stored when basic_publish returns, so it is settled right away.
        confirms = hasattr(channel, "confirm_select")
        if confirms:
            channel.events["basic_ack"].add(self._on_ack)
            channel.events["basic_nack"].add(self._on_nack)
            channel.events["basic_return"].add(self._on_return)
            channel.confirm_select()
        with self._write_lock:
            with self._cond:
                self._channel = channel
                self._confirms = confirms
                self._generation = generation
                self._next_tag = 1
                self._low = 1
                self._by_tag = {}
                again = [p for p in self._pending.values() if p.outcome is None]
            for index in range(0, len(again), _CHUNK_MESSAGES):
                self._write_chunk_locked(again[index:index + _CHUNK_MESSAGES])
        if again:
            logger.info("carrot_kombu published %d unconfirmed message(s) again after reconnecting", len(again))

    def abort(self, why: str) -> None:
        """End every waiting publish now (the manager stops): they raise PublishTimeout."""
        with self._cond:
            pending = list(self._pending.values())
            self._pending.clear()
            self._by_tag = {}
            for p in pending:
                if p.outcome is None:
                    p.outcome = "aborted"
                    p.detail = why
                p.done.set()
            self._cond.notify_all()

    def detach(self, generation: Optional[int] = None) -> None:
        with self._cond:
            if generation is not None and generation != self._generation:
                return
            self._channel = None
            self._generation = None
            self._by_tag = {}
            self._cond.notify_all()

    @property
    def active(self) -> bool:
        return self._channel is not None

    def pending_count(self) -> int:
        """Messages waiting for their confirm (or for a connection)."""
        with self._cond:
            return len(self._pending)

    # -- callers -------------------------------------------------------------------------

    def publish(
        self,
        body: Any,
        *,
        exchange: str,
        routing_key: str,
        headers: Optional[dict[str, Any]],
        serializer: Optional[str],
        mandatory: bool,
        timeout: Optional[float],
        properties: dict[str, Any],
    ) -> None:
        self.publish_many(
            [body], exchange=exchange, routing_key=routing_key, headers=headers, serializer=serializer,
            mandatory=mandatory, timeout=timeout, properties=properties,
        )

    def publish_many(
        self,
        bodies: Any,
        *,
        exchange: str,
        routing_key: str,
        headers: Optional[dict[str, Any]],
        serializer: Optional[str],
        mandatory: bool,
        timeout: Optional[float],
        properties: dict[str, Any],
    ) -> None:
        """Write every message, then wait for all their confirms: one round trip in all."""
        deadline = None if timeout is None else time.monotonic() + timeout
        batch: list[_Pending] = []
        try:
            chunk: list[_Pending] = []
            size = 0
            for body in bodies:
                pending = self._admit(body, exchange, routing_key, headers, serializer, mandatory, properties,
                                      deadline, timeout)
                batch.append(pending)
                chunk.append(pending)
                size += len(pending.body)
                # Written in chunks: one socket write each, memory stays bounded.
                if len(chunk) >= min(_CHUNK_MESSAGES, self.max_pending) or size >= _CHUNK_BYTES:
                    self._write_chunk(chunk)
                    chunk, size = [], 0
            if chunk:
                self._write_chunk(chunk)
            for index, pending in enumerate(batch):
                if not pending.done.wait(_left(deadline)):
                    raise PublishTimeout(
                        f"no confirm from the broker within {timeout}s"
                        + ("; the message was written and may have been stored" if pending.written
                           else "; the message was never sent (no connection)")
                        + (f" (message {index} of {len(batch)})" if len(batch) > 1 else ""),
                        outcome="unknown" if pending.written else "not_sent",
                    )
                _raise_for(pending, index, len(batch))
        finally:
            for pending in batch:
                if pending.outcome is None:
                    self._forget(pending)

    def _admit(
        self, body: Any, exchange: str, routing_key: str, headers: Optional[dict[str, Any]],
        serializer: Optional[str], mandatory: bool, properties: dict[str, Any],
        deadline: Optional[float], timeout: Optional[float],
    ) -> _Pending:
        """Serialize ``body`` and take a pending slot (waiting for one within the deadline)."""
        content_type, content_encoding, data = dumps(body, serializer=serializer)
        props = {"delivery_mode": 2, **properties}
        merged = dict(headers or {})
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._pending) < self.max_pending, _left(deadline)):
                raise PublishTimeout(
                    f"{self.max_pending} messages were already waiting for confirms for {timeout}s; "
                    "this one was not sent",
                    outcome="not_sent",
                )
            pending = _Pending(next(self._ids), exchange, routing_key, mandatory)
            if mandatory:
                merged[RETURN_HEADER] = pending.id
            pending.body = data
            pending.content_type = props.pop("content_type", content_type)
            pending.content_encoding = props.pop("content_encoding", content_encoding)
            pending.headers = merged
            pending.properties = props
            self._pending[pending.id] = pending
        return pending

    # -- writing ---------------------------------------------------------------------------

    def _write_chunk(self, chunk: list[_Pending]) -> None:
        with self._write_lock:
            self._write_chunk_locked(chunk)

    def _write_chunk_locked(self, chunk: list[_Pending]) -> None:
        """Give the chunk consecutive delivery tags and write it (one socket write if possible)."""
        with self._cond:
            channel = self._channel
            todo = [p for p in chunk if p.outcome is None]
            if channel is None or not todo:
                return  # written when the next connection is attached
            first = self._next_tag
            self._next_tag += len(todo)
            for offset, pending in enumerate(todo):
                self._by_tag[first + offset] = pending
        try:
            publishes = [(self._prepare(channel, p), p.exchange, p.routing_key, p.mandatory) for p in todo]
            if len(publishes) > 1 and hasattr(channel, "basic_publish_many"):
                channel.basic_publish_many(publishes)
                for pending in todo:
                    pending.written = True
            else:
                for offset, (message, exchange, routing_key, mandatory) in enumerate(publishes):
                    channel.basic_publish(message, exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                    todo[offset].written = True
                    if not self._confirms:
                        self._settle(first + offset, False, "ack")
        except Blocked:
            for pending in todo:
                self._forget(pending)
            raise
        except (Disconnected, OSError, amqp.exceptions.AMQPError) as exc:
            # The connection is going; the next one publishes them again.
            logger.debug("%d publish(es) wait for the next connection: %r", len(todo), exc)
            with self._cond:
                for offset in range(len(todo)):
                    self._by_tag.pop(first + offset, None)
            # A write that failed half-way may have reached the broker.
            half_written = exc.__cause__ is not None or isinstance(exc, OSError)
            for pending in todo:
                pending.written = pending.written or half_written

    @staticmethod
    def _prepare(channel: Any, pending: _Pending) -> Any:
        props = dict(pending.properties)
        return channel.prepare_message(
            pending.body, props.pop("priority", None), pending.content_type, pending.content_encoding,
            pending.headers or None, props,
        )

    def _forget(self, pending: _Pending) -> None:
        with self._cond:
            self._pending.pop(pending.id, None)
            for tag, p in list(self._by_tag.items()):
                if p is pending:
                    del self._by_tag[tag]
            self._cond.notify_all()

    # -- the reader thread's side -------------------------------------------------------

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "ack")

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._settle(delivery_tag, multiple, "nack")

    def _settle(self, delivery_tag: int, multiple: bool, outcome: str) -> None:
        with self._cond:
            # Tags are consecutive: a multiple ack settles [low, delivery_tag]
            # without scanning every pending message (that made batches O(n^2)).
            tags = range(self._low, delivery_tag + 1) if multiple else (delivery_tag,)
            if multiple or delivery_tag == self._low:
                self._low = delivery_tag + 1
            for tag in tags:
                pending = self._by_tag.pop(tag, None)
                if pending is None:
                    continue
                if pending.outcome is None:
                    pending.outcome = "returned" if pending.detail else outcome
                self._pending.pop(pending.id, None)
                pending.done.set()
            self._cond.notify_all()

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Any) -> None:
        headers = getattr(message, "headers", None) or message.properties.get("application_headers") or {}
        pid = headers.get(RETURN_HEADER)
        with self._cond:
            pending = self._pending.get(pid) if pid is not None else None
            if pending is not None:
                # The ack that follows settles it as "returned".
                pending.detail = f"{exc} (exchange {exchange!r}, routing key {routing_key!r})"


def _raise_for(pending: _Pending, index: int, total: int) -> None:
    which = f" (message {index} of {total})" if total > 1 else ""
    if pending.outcome == "aborted":
        raise PublishTimeout(
            f"{pending.detail} before the broker confirmed the message{which}"
            + ("; it was written and may have been stored" if pending.written else "; it was never sent"),
            outcome="unknown" if pending.written else "not_sent",
        )
    if pending.outcome == "nack":
        raise Nacked(f"the broker refused the message (basic.nack){which}")
    if pending.outcome == "returned":
        raise Unroutable(f"unroutable mandatory message{which}: {pending.detail}")


def _left(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())

