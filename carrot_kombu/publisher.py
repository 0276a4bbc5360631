"""Confirmed publishing that survives reconnects: ``manager.publish``.

One confirm-mode channel per connection carries every ``publish`` from every
thread, pipelined: a caller writes its message and waits for the broker's
``basic.ack`` for that delivery tag, while other callers keep writing.

What this module guarantees (``docs/guarantees.rst``):

* A message is encoded and checked *before* it is admitted: one that cannot
  be sent fails in its caller (``TypeError``/``ValueError`` naming the
  field), takes no delivery tag and is never published again later.
* Delivery tags are assigned atomically with the write, so confirms always
  settle the message they belong to.
* When the broker closes the confirm channel because of a message (404 no
  such exchange, 406 too large...), that message's caller gets
  :class:`~carrot_kombu.Rejected` with the broker's code and text; the
  channel is replaced at once and other callers' messages in flight are
  published again on the new one (at-least-once).
* Until confirmed, a message stays in the pending table; after a reconnect
  every pending message is published again, in order.
"""

from __future__ import annotations

import itertools
import logging
import re
from collections import OrderedDict
from typing import Any, Callable, Iterable, Optional

from amqp.exceptions import AMQPError
from kombu.serialization import dumps

from ._deadline import NEVER, Deadline
from ._link import ConfirmChannel, ConfirmHooks, Link, Outbound, Waiter
from ._metrics import Metrics, now
from ._sync import Monitor
from .exceptions import (
    Blocked,
    Disconnected,
    Nacked,
    PublishError,
    PublishTimeout,
    Rejected,
    Unroutable,
)

__all__ = ("Publisher", "PublishError", "Nacked", "Unroutable", "PublishTimeout", "Rejected")

logger = logging.getLogger("carrot_kombu")

#: Header that lets a returned mandatory message find its caller.
RETURN_HEADER = "x-carrot-kombu-publish-id"

#: publish_many writes this many messages (or bytes) per socket write.
_CHUNK_MESSAGES = 256
_CHUNK_BYTES = 1 << 20

# RabbitMQ quotes names without escaping them: the greedy match takes the
# last "' in vhost '", and a name it cannot pin down falls to the careful path.
_NO_EXCHANGE = re.compile(r"exchange '(.*)' in vhost '")
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size (\d+)")
_USER_ID = re.compile(r"user_id property set to '(.*)' but authenticated user")


class _Pending(Waiter):
    """One message between admission and its confirm; encoded once, framed per channel."""

    __slots__ = ("id", "message", "outcome", "detail", "error", "written", "tag", "settled_at")

    def __init__(self, pid: int, message: Outbound) -> None:
        super().__init__()
        self.id = pid
        self.message = message
        self.outcome: Optional[str] = None  # "ack", "nack", "returned", "rejected", "aborted", "failed"
        self.detail = ""
        self.error: Optional[BaseException] = None
        self.written = False
        self.tag = 0
        self.settled_at = 0.0  # when the broker's confirm was read (for the confirm latency)

    def ready(self) -> bool:
        return self.outcome is not None


class Publisher:
    """The pending table and the confirm channel of one manager.

    Args:
        max_pending: Most messages waiting for confirms at once (all threads).
        need_channel: ``need_channel(generation, backoff)``, called (from any
            thread, must not block) when the confirm channel was closed by the
            broker and must be replaced; ``backoff`` when the broker named no
            publish (replacing it at once could loop).
    """

    def __init__(self, max_pending: int, need_channel: Optional[Callable[[int, bool], None]] = None,
                 metrics: Optional[Metrics] = None) -> None:
        self.metrics = metrics or Metrics()
        self.max_pending = max_pending
        self._need_channel = need_channel
        self._cond = Monitor()
        self._pending: "OrderedDict[int, _Pending]" = OrderedDict()
        self._by_tag: dict[int, _Pending] = {}
        self._channel: Optional[ConfirmChannel] = None
        self._low = 1  # no delivery tag below this one is still waiting
        #: The highest delivery tag written on the current channel: nothing the
        #: broker acks costs more than what we have outstanding.
        self._booked_to = 0
        self._ids = itertools.count(1)
        self._generation: Optional[int] = None
        self._closed: Optional[str] = None
        #: Ids of messages in flight when the broker refused one it did not
        #: name: published again one at a time, waiting for each outcome.
        self._careful: set[int] = set()
        #: True while those go one at a time: nobody else writes meanwhile.
        self._one_at_a_time = False
        #: The broker refused the connection for a reason retrying will not
        #: fix: new publishes fail at once until a connection works again.
        self._refused: Optional[tuple[str, Optional[BaseException]]] = None
        self.used = False  # no confirm channel is opened until the first publish
        #: Whether the manager has a live connection (set by the owner of the
        #: live connection): only to say in a PublishTimeout what was missing.
        self.connected: Callable[[], bool] = lambda: self._generation is not None

    # -- supervisor side -------------------------------------------------------------

    def needs(self, generation: int) -> bool:
        """Whether a confirm channel must be attached for this connection.

        Read without the lock (on every publish): a stale answer only makes
        the caller ask the recovery, which decides under its own lock.
        """
        return self.used and self._closed is None and (self._generation != generation or self._channel is None)

    def attach(self, link: Link) -> None:
        """Open a confirm channel on ``link`` and publish again what is unconfirmed."""
        holder: list[ConfirmChannel] = []
        hooks = ConfirmHooks(
            on_confirm=self._on_confirm,
            on_return=self._on_return,
            on_closed=lambda error, about_publish: self._on_channel_closed(
                holder[0] if holder else None, error, about_publish),
        )
        channel = link.open_confirm_channel(hooks)
        holder.append(channel)
        with self._cond.lock:
            careful = [p for p in self._pending.values() if p.id in self._careful and p.outcome is None]
            self._careful.clear()
            self._generation = link.generation
            self._refused = None
            self._low = 1
            self._booked_to = 0
            self._by_tag = {}
        if careful:
            # New publishes wait unwritten meanwhile (no channel yet).
            self._one_by_one(channel, careful)
            if channel.failure() is not None:
                return  # closed again by the culprit: the replacement carries the rest
        with self._cond.lock:
            self._channel = channel
            again = [p for p in self._pending.values() if p.outcome is None]
            for p in self._pending.values():
                p.wake()  # waiters re-read which connection to wait on
        for index in range(0, len(again), _CHUNK_MESSAGES):
            try:
                self._write(again[index:index + _CHUNK_MESSAGES])
            except (Blocked, Disconnected, OSError, AMQPError):
                break  # this channel is going too; the next one publishes them
        if again:
            logger.info("carrot_kombu published %d unconfirmed message(s) again", len(again))

    def _one_by_one(self, channel: ConfirmChannel, careful: list[_Pending]) -> None:
        """Publish ``careful`` one at a time, each confirmed before the next.

        If the broker closes the channel again, the message alone in flight is
        the one it refused (``_culprits`` with one message); the others, not
        yet sent, go to the replacement channel.  Runs on the supervisor.
        """
        with self._cond.lock:
            self._one_at_a_time = True
        try:
            for index, pending in enumerate(careful):
                if pending.outcome is not None:
                    continue
                with self._cond.lock:
                    self._channel = channel  # so that _write and the confirm hooks accept it
                self._write([pending], alone=True)
                try:
                    # The confirm wakes ``pending``; so does the channel's close
                    # (_on_channel_closed wakes every pending message).
                    channel.wait(pending, Deadline.after(channel.reply_timeout).at,
                                 interrupt=lambda: channel.failure() is not None)
                except Disconnected:
                    pass
                with self._cond.lock:
                    if self._channel is channel:
                        self._channel = None
                if channel.failure() is not None:
                    with self._cond.lock:
                        self._careful.update(p.id for p in careful[index + 1:] if p.outcome is None)
                    return
        finally:
            with self._cond.lock:
                self._one_at_a_time = False

    def abort(self, why: str) -> None:
        """The manager stops: every waiting publish ends now, new ones fail at once."""
        self.fail_waiting(why, closed=True)

    def fail_waiting(self, why: str, reason: Optional[BaseException] = None, closed: bool = False) -> None:
        """End every waiting publish with ``why`` (stopped, failed, gave up)."""
        with self._cond.lock:
            if closed:
                self._closed = why
            else:
                self._refused = (why, reason)
            pending = list(self._pending.values())
            self._pending.clear()
            self._by_tag = {}
            for p in pending:
                if p.outcome is None:
                    p.outcome = "aborted"
                    p.detail = why
                    p.error = reason
                p.wake()
            self._cond.notify_all()

    def no_channel(self, error: Blocked) -> None:
        """The broker blocked the connection while a confirm channel was being opened.

        Messages not yet written cannot be (nothing was sent): their callers
        get ``error`` now, not a timeout after their whole ``timeout``.
        Written ones wait for a channel as usual (they may have been stored).
        """
        with self._cond.lock:
            if self._channel is not None:
                return
            for p in list(self._pending.values()):
                if p.outcome is None and not p.written:
                    p.outcome, p.error = "blocked", error
                    self._pending.pop(p.id, None)
                    p.wake()
            self._cond.notify_all()

    def reopen(self) -> None:
        """After ``start()`` again: publishing is allowed again."""
        with self._cond.lock:
            self._closed = None
            self._refused = None

    def detach(self, generation: Optional[int] = None) -> None:
        with self._cond.lock:
            if generation is not None and generation != self._generation:
                return
            self._channel = None
            self._generation = None
            self._by_tag = {}
            for p in self._pending.values():
                p.wake()
            self._cond.notify_all()

    @property
    def active(self) -> bool:
        return self._channel is not None

    def pending_count(self) -> int:
        """Messages waiting for their confirm (or for a connection)."""
        with self._cond.lock:
            return len(self._pending)

    # -- callers -------------------------------------------------------------------------

    def publish_many(
        self,
        bodies: Iterable[Any],
        *,
        exchange: str,
        routing_key: str,
        headers: Optional[dict[str, Any]],
        serializer: Optional[str],
        mandatory: bool,
        deadline: Deadline,
        properties: dict[str, Any],
    ) -> None:
        """Check and encode every message, write them, then wait for all their confirms."""
        started = now()
        encoded = [self._encode(body, exchange, routing_key, headers, serializer, mandatory, properties)
                   for body in bodies]
        batch: list[_Pending] = []
        try:
            chunk: list[_Pending] = []
            size = 0
            for pending in encoded:
                if not self._admit(pending, deadline, wait=not chunk):
                    # No slot: write what this batch holds first, so that every
                    # slot in use belongs to a written message (no deadlock).
                    self._write(chunk, deadline=deadline)
                    chunk, size = [], 0
                    self._admit(pending, deadline)
                batch.append(pending)
                chunk.append(pending)
                size += len(pending.message.body)
                if len(chunk) >= _CHUNK_MESSAGES or size >= _CHUNK_BYTES:
                    self._write(chunk, deadline=deadline)
                    chunk, size = [], 0
            self._write(chunk, deadline=deadline)
            # Every message settles (or the deadline passes) before the first
            # failure is raised: the caller knows the fate of the whole batch.
            for index, pending in enumerate(batch):
                self._wait(pending, deadline, index, len(batch))
            for index, pending in enumerate(batch):
                _raise_for(pending, index, len(batch))
        finally:
            for pending in batch:
                if pending.outcome is None:
                    self._forget(pending)
            self.metrics.publish_ended(encoded, started, deadline)

    def _encode(
        self, body: Any, exchange: str, routing_key: str, headers: Optional[dict[str, Any]],
        serializer: Optional[str], mandatory: bool, properties: dict[str, Any],
    ) -> _Pending:
        """Serialize and check one message; raises in the caller, nothing is admitted."""
        content_type, content_encoding, data = dumps(body, serializer=serializer)
        props = {"delivery_mode": 2, **properties}
        props.setdefault("content_type", content_type)
        props.setdefault("content_encoding", content_encoding)
        merged = dict(headers or {})
        pid = next(self._ids)
        if mandatory:
            merged[RETURN_HEADER] = pid
        if merged:
            props["application_headers"] = merged
        return _Pending(pid, Outbound(exchange, routing_key, props, data, mandatory))

    def _missing(self) -> str:
        """What kept a message unwritten, for a timeout's message: the connection, or only the confirm channel."""
        if self.connected():
            return "connected, but no confirm channel: the broker has not opened one (channel.open/confirm.select)"
        return "no connection"

    def _admit(self, pending: _Pending, deadline: Deadline, wait: bool = True) -> bool:
        """Take a pending slot; False if none is free and ``wait`` is False.

        Raises:
            PublishTimeout: No slot within the deadline (``not_sent``).
            Disconnected: The manager stopped.
        """
        with self._cond.lock:
            while True:
                if self._closed is not None:
                    raise Disconnected(f"{self._closed}; the message was not sent")
                if self._refused is not None:
                    raise Disconnected(f"{self._refused[0]}; the message was not sent", self._refused[1])
                if len(self._pending) < self.max_pending:
                    self._pending[pending.id] = pending
                    return True
                if not wait:
                    return False
                if deadline.expired():
                    raise PublishTimeout(
                        f"{self.max_pending} messages were already waiting for confirms for {deadline.timeout}s; "
                        "this one was not sent",
                        outcome="not_sent",
                    )
                self._cond.wait(deadline.remaining())

    def _wait(self, pending: _Pending, deadline: Deadline, index: int, total: int) -> None:
        """Wait for ``pending``'s outcome, reading the connection in this thread when nobody else does."""
        while not pending.ready():
            if deadline.expired():
                raise PublishTimeout(
                    f"no confirm from the broker within {deadline.timeout}s"
                    + ("; the message was written and may have been stored" if pending.written
                       else f"; the message was never sent ({self._missing()})")
                    + (f" (message {index} of {total})" if total > 1 else ""),
                    outcome="unknown" if pending.written else "not_sent",
                )
            channel = self._channel
            if channel is None:
                event = pending.event
                event.clear()
                # Checked again after clear(): a settle or an attach from now on stays visible.
                if pending.ready() or self._channel is not channel:
                    continue
                event.wait(deadline.remaining())
                continue
            try:
                channel.wait_confirm(pending, deadline.at, lambda: (
                    ("; the message was written and may have been stored" if pending.written
                     else "; the message was never sent")
                    + (f" (message {index} of {total})" if total > 1 else "")))
            except Disconnected:
                # Lost meanwhile: the next connection publishes it again.
                pending.event.wait(deadline.within(0.05))

    # -- writing ---------------------------------------------------------------------------

    def _write(self, chunk: list[_Pending], alone: bool = False, deadline: Deadline = NEVER) -> None:
        """Write ``chunk`` on the confirm channel with consecutive delivery tags (one socket write).

        Args:
            chunk: The messages.
            alone: The careful path's single message; other writers stay out
                until it settles (see :meth:`_one_by_one`).
            deadline: The caller's publish deadline.

        Raises:
            Blocked: The broker blocked the connection (nothing was sent).
            PublishTimeout: Blocked past ``deadline`` (nothing was sent).
        """
        with self._cond.lock:
            if self._one_at_a_time and not alone:
                return  # written when the channel is attached after the careful ones
            channel = self._channel
            todo = [p for p in chunk if p.outcome is None]
        if channel is None or not todo:
            return  # written when the next connection is attached

        def queued(first: int, ok: bool) -> None:
            # Runs under the channel's lock, before any confirm can be read;
            # ok=False undoes it (the frames could not be queued).
            with self._cond.lock:
                for offset, p in enumerate(todo):
                    tag = first + offset
                    if ok:
                        p.tag, p.written = tag, True
                        if self._channel is channel:
                            self._by_tag[tag] = p
                            self._booked_to = max(self._booked_to, tag)
                    else:
                        p.tag, p.written = 0, False
                        if self._by_tag.get(tag) is p:
                            del self._by_tag[tag]

        try:
            channel.write([p.message for p in todo], on_queued=queued, deadline=deadline.at)
        except (Blocked, PublishTimeout):
            for p in todo:
                self._forget(p)
            raise
        except (Disconnected, OSError, AMQPError) as exc:
            # The connection or the channel is going; the next channel publishes them again.
            logger.debug("%d publish(es) wait for the next confirm channel: %r", len(todo), exc)

    def _forget(self, pending: _Pending) -> None:
        """Its caller is gone (a timeout, an exception raised into it): not waited for, not published again.

        A message already written stays known by its delivery tag until the
        broker settles it: if the broker refuses it by closing the channel,
        the refusal must fall on it, not on another caller's message.
        """
        with self._cond.lock:
            self._pending.pop(pending.id, None)
            if pending.tag and not pending.written and self._by_tag.get(pending.tag) is pending:
                del self._by_tag[pending.tag]
            self._cond.notify_all()

    # -- the reading thread's side (our hooks: never block, never user code) ---------------------

    def _on_confirm(self, delivery_tag: int, multiple: bool, ack: bool) -> None:
        outcome = "ack" if ack else "nack"
        with self._cond.lock:
            # Tags are consecutive: a multiple ack settles [low, delivery_tag]
            # without scanning every pending message, and never past the last
            # tag written (a broker acking 2**64-1 costs what is outstanding).
            top = min(delivery_tag, self._booked_to)
            tags = range(self._low, top + 1) if multiple else (delivery_tag,)
            if multiple or delivery_tag == self._low:
                self._low = max(self._low, top + 1)
            at = now()  # one reading per confirm frame, however many messages it settles
            for tag in tags:
                pending = self._by_tag.pop(tag, None)
                if pending is not None:
                    self._settle_one(pending, "returned" if pending.detail else outcome, at)
            self._cond.notify_all()

    def _settle_one(self, pending: _Pending, outcome: str, at: float) -> None:
        if pending.outcome is None:
            pending.outcome = outcome
            pending.settled_at = at
        self._pending.pop(pending.id, None)
        pending.wake()

    def _on_return(self, exc: BaseException, exchange: str, routing_key: str, message: Any) -> None:
        headers = getattr(message, "properties", {}).get("application_headers") or {}
        pid = headers.get(RETURN_HEADER)
        with self._cond.lock:
            pending = self._pending.get(pid) if pid is not None else None
            if pending is not None:
                # The ack that follows settles it as "returned".
                pending.detail = f"{exc} (exchange {exchange!r}, routing key {routing_key!r})"

    def _on_channel_closed(self, channel: Optional[ConfirmChannel], error: BaseException,
                           about_publish: bool) -> None:
        """The broker closed the confirm channel: the culprit gets the error, the rest go again."""
        with self._cond.lock:
            if channel is None or channel is not self._channel:
                return
            generation = self._generation
            self._channel = None
            unsettled = sorted(self._by_tag.values(), key=lambda p: p.tag)
            self._by_tag = {}
            culprits = _culprits(error, unsettled) if about_publish else []
            for p in culprits:
                p.outcome = "rejected"
                p.error = error
                self._pending.pop(p.id, None)
                p.wake()
            if not culprits and about_publish:
                # Unattributed: publish these again one at a time.
                self._careful.update(p.id for p in unsettled)
            for p in self._pending.values():
                p.wake()
            self._cond.notify_all()
        if culprits:
            logger.warning("carrot_kombu: the broker refused a publish (%s); the confirm channel is replaced", error)
        if generation is not None and self._need_channel is not None and self._closed is None:
            # A close that names no publish could come again for every rewrite: backed off.
            self._need_channel(generation, not about_publish)


def _culprits(error: BaseException, unsettled: list[_Pending]) -> list[_Pending]:
    """Which in-flight messages the broker's channel error is about.

    The broker processes a channel's publishes in order and names what it
    refused: an exchange (404, 403), a size (406), a user_id (403).  When
    the text names nothing we recognise (or nothing in flight matches it),
    nobody is blamed here: the messages are published again one at a time
    (see :meth:`Publisher.attach`), so that the refusal, if it comes again,
    falls on exactly one.
    """
    if not unsettled:
        return []
    if len(unsettled) == 1:
        return unsettled  # alone on the channel: it is the one
    text = str(getattr(error, "reply_text", "") or error)
    found = _NO_EXCHANGE.search(text)
    if found:
        name = found.group(1)
        name = "" if name == "amq.default" else name  # how RabbitMQ names the default exchange
        return [p for p in unsettled if p.message.exchange == name]
    found = _TOO_LARGE.search(text)
    if found:
        limit = int(found.group(2))
        return [p for p in unsettled if len(p.message.body) > limit]
    found = _USER_ID.search(text)
    if found:
        return [p for p in unsettled if p.message.user_id == found.group(1)]
    return []


def _raise_for(pending: _Pending, index: int, total: int) -> None:
    which = f" (message {index} of {total})" if total > 1 else ""
    if pending.outcome == "aborted":
        written = "; it was written and may have been stored" if pending.written else "; it was never sent"
        raise Disconnected(f"{pending.detail} before the broker confirmed the message{which}{written}",
                           pending.error)
    if pending.outcome == "blocked":
        raise Blocked(f"{pending.error}; the message was never sent{which}")
    if pending.outcome == "nack":
        raise Nacked(f"the broker refused the message (basic.nack){which}")
    if pending.outcome == "returned":
        raise Unroutable(f"unroutable mandatory message{which}: {pending.detail}")
    if pending.outcome == "rejected":
        error = pending.error
        code = int(getattr(error, "reply_code", 0) or 0)
        text = str(getattr(error, "reply_text", "") or error)
        raise Rejected(f"the broker refused the message{which}: ({code}) {text}", error, code, text)
