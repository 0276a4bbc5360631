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
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

from amqp.exceptions import AMQPError
from kombu.serialization import dumps

from ._deadline import NEVER, Deadline, clock
from ._handoff import Handoff, Timer
from ._link import ConfirmChannel, ConfirmHooks, Link, Outbound
from ._pending import (
    Outcome,
    _culprits,
    _outcomes,
    _Pending,
    _raise_for,
    _timeout_error,
)
from ._submission import Submission
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

if TYPE_CHECKING:  # pragma: no cover
    import asyncio

__all__ = ("Publisher", "Submission", "PublishError", "Nacked", "Unroutable", "PublishTimeout", "Rejected")

logger = logging.getLogger("carrot_kombu")

#: Header that lets a returned mandatory message find its caller.
RETURN_HEADER = "x-carrot-kombu-publish-id"

#: publish_many writes this many messages (or bytes) per socket write.
_CHUNK_MESSAGES = 256
_CHUNK_BYTES = 1 << 20


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
        #: Changes on every block, unblock and detach: a blocked_timeout timer of an older block does nothing.
        self._block_epoch = 0
        self._block_timer: Optional[Timer] = None
        self.used = False  # no confirm channel is opened until the first publish
        #: Completes publish_async futures and expires them; runs no user code,
        #: so that no caller's done-callback delays another's result or timeout.
        self.completions = Handoff("carrot-kombu-futures")
        #: Runs publish_async done-callbacks (user code), in the order their futures completed.
        self.callbacks = Handoff("carrot-kombu-callbacks")
        #: Writes what a non-waiting caller (an event loop) could not write without waiting.
        self.waiting = Handoff("carrot-kombu-publish-wait")
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
            self._unknown_after_loss(list(self._pending.values()), "the connection was lost")
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
        """The manager stops: every waiting publish ends now, new ones fail at once; helper threads end."""
        self.fail_waiting(why, closed=True)
        self.blocked(None, None)
        self.completions.retire()  # after completing the futures just failed
        self.waiting.retire()
        self.callbacks.retire()

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

    def blocked(self, reason: Optional[str], timeout: Optional[float]) -> None:
        """The broker blocked (``reason``) or unblocked (None) the connection (from the supervisor).

        A waiting ``publish`` bounds its wait for a confirm by
        ``blocked_timeout`` itself; messages of callers that do not wait
        (``publish_async``, the asyncio API) have nobody to do that: if the
        block lasts ``timeout`` seconds, they settle with :class:`Blocked`.
        """
        with self._cond.lock:
            self._block_epoch += 1
            epoch = self._block_epoch
            timer, self._block_timer = self._block_timer, None
        if timer is not None:
            self.completions.cancel(timer)
        if reason is not None and timeout is not None:
            timer = self.completions.call_at(clock() + timeout, lambda: self._blocked_too_long(epoch, reason, timeout))
            with self._cond.lock:
                if self._block_epoch == epoch:
                    self._block_timer = timer
                    timer = None
            if timer is not None:
                self.completions.cancel(timer)  # unblocked meanwhile

    def _blocked_too_long(self, epoch: int, reason: str, timeout: float) -> None:
        with self._cond.lock:
            if epoch != self._block_epoch:
                return  # unblocked (or lost) meanwhile
            for p in list(self._pending.values()):
                if p.outcome is None and p.on_done is not None:
                    # A written one keeps its delivery tag (see _forget): a late refusal stays its own.
                    p.outcome = "blocked"
                    p.error = Blocked(f"the broker blocked the connection ({reason}) for {timeout}s "
                                      "(blocked_timeout) before the confirm")
                    self._pending.pop(p.id, None)
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
        self.completions.resume()
        self.waiting.resume()
        self.callbacks.resume()

    def detach(self, generation: Optional[int] = None) -> None:
        with self._cond.lock:
            if generation is not None and generation != self._generation:
                return
            self._channel = None
            self._generation = None
            self._by_tag = {}
            self._block_epoch += 1  # a block ends with its connection
            self._unknown_after_loss(list(self._pending.values()), "the connection was lost")
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

    def _unknown_after_loss(self, pendings: list[_Pending], why: str) -> None:
        """Under the lock: ``republish=False`` messages written on a channel now gone settle as "unknown".

        The broker may or may not have stored them; they are never written
        again (at most once), and their callers get
        :class:`~carrot_kombu.OutcomeUnknown`.
        """
        for p in pendings:
            if p.outcome is None and p.written and not p.republish:
                p.outcome, p.detail = "unknown", why
                self._pending.pop(p.id, None)
                if self._by_tag.get(p.tag) is p:
                    del self._by_tag[p.tag]
                p.wake()

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
        republish: bool = True,
        headers_each: Optional[Sequence[Mapping[str, Any]]] = None,
        report: Optional[Callable[[list[Outcome]], None]] = None,
    ) -> None:
        """Check and encode every message, write them, then wait for all their confirms.

        Args:
            headers_each: Headers of each message in turn, over ``headers``
                (tracing gives each message its own context).
            report: Told each message's :data:`Outcome` once the batch is
                settled (or its deadline passed), before anything is raised;
                not called when a message could not even be encoded.
        """
        started = now()
        if headers_each is None:
            encoded = [self._encode(body, exchange, routing_key, headers, serializer, mandatory, properties,
                                    republish) for body in bodies]
        else:
            encoded = [self._encode(body, exchange, routing_key, {**(headers or {}), **own}, serializer, mandatory,
                                    properties, republish) for body, own in zip(bodies, headers_each)]
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
            if report is not None:
                report(_outcomes(encoded, batch, deadline, self._missing()))
            for pending in batch:
                if pending.outcome is None:
                    self._forget(pending)
            self.metrics.publish_ended(encoded, started, deadline)

    def publish_one(
        self,
        body: Any,
        *,
        exchange: str,
        routing_key: str,
        headers: Optional[Mapping[str, Any]],
        serializer: Optional[str],
        mandatory: bool,
        deadline: Deadline,
        properties: dict[str, Any],
        republish: bool = True,
    ) -> None:
        """:meth:`publish_many` of one message (``publish()``): the same steps, outcome and errors.

        Kept apart because it is the hot path: a batch's lists, chunking and
        per-index loops cost a one-message call a tenth of its CPU.
        """
        started = now()
        pending = self._encode(body, exchange, routing_key, headers, serializer, mandatory, properties, republish)
        try:
            self._admit(pending, deadline)
            self._write([pending], deadline=deadline)
            self._wait(pending, deadline, 0, 1)
            _raise_for(pending, 0, 1)
        finally:
            if pending.outcome is None:
                # Also when not admitted (or interrupted as it was): no slot
                # is left behind, and this message is never written later.
                self._forget(pending)
            self.metrics.publish_ended((pending,), started, deadline)

    def _encode(
        self, body: Any, exchange: str, routing_key: str, headers: Optional[Mapping[str, Any]],
        serializer: Optional[str], mandatory: bool, properties: dict[str, Any], republish: bool = True,
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
        return _Pending(pid, Outbound(exchange, routing_key, props, data, mandatory), republish)

    def _missing(self) -> str:
        """What kept a message unwritten, for a timeout's message: the connection, or only the confirm channel."""
        if self.connected():
            return "connected, but no confirm channel: the broker has not opened one (channel.open/confirm.select)"
        return "no connection"

    def _admit(self, pending: _Pending, deadline: Deadline, wait: bool = True) -> bool:
        """Take a pending slot; False if none is free and ``wait`` is False, or the message was forgotten.

        Raises:
            PublishTimeout: No slot within the deadline (``not_sent``).
            Disconnected: The manager stopped.
        """
        with self._cond.lock:
            while True:
                if pending.forgotten:
                    return False  # its caller is gone (send_waiting skips it): no slot for it
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
                raise _timeout_error(pending, deadline, index, total, self._missing())
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

    # -- callers that do not wait (publish_async, carrot_kombu.aio) --------------------------

    def encode_many(
        self, bodies: Iterable[Any], *, exchange: str, routing_key: str, headers: Optional[dict[str, Any]],
        serializer: Optional[str], mandatory: bool, properties: dict[str, Any], republish: bool,
    ) -> list[_Pending]:
        """Check and encode every message (raises in the caller; nothing is admitted)."""
        return [self._encode(body, exchange, routing_key, headers, serializer, mandatory, properties, republish)
                for body in bodies]

    def submit(self, pendings: list[_Pending], deadline: Deadline, on_settled: Callable[["Submission"], None],
               flush: bool = True) -> tuple["Submission", list[_Pending]]:
        """Admit and write ``pendings`` without ever waiting; their outcome goes to ``on_settled``.

        ``flush=False`` only queues the frames: the caller calls :meth:`flush`
        soon (an event loop, once per iteration, for every task's messages).

        Returns:
            The submission, and the messages that could not go without
            waiting (no free slot, a blocked connection, a full outgoing
            buffer), in order: hand them to :meth:`send_waiting` on a thread
            that may wait.  Messages wait unwritten for a connection as
            ``publish_many``'s do (written when the next one is attached).

        Raises:
            Disconnected: At once, as :meth:`publish_many` (stopped, refused);
                nothing stays admitted.
        """
        submission = Submission(self, pendings, deadline, on_settled)
        admitted: list[_Pending] = []
        try:
            for pending in pendings:
                if not self._admit(pending, deadline, wait=False):
                    break
                admitted.append(pending)
        except BaseException:
            submission.cancel()
            raise
        rest = pendings[len(admitted):]
        for index in range(0, len(admitted), _CHUNK_MESSAGES):
            if not self._write(admitted[index:index + _CHUNK_MESSAGES], deadline=deadline, nowait=True,
                               flush=flush):
                rest = admitted[index:] + rest
                break
        submission.start()
        return submission, rest

    def send_waiting(self, submission: "Submission", pendings: list[_Pending]) -> None:
        """Admit and write what :meth:`submit` left, waiting as ``publish_many`` does (a helper thread).

        A failure (no slot in time, blocked too long, stopped) settles the
        messages not yet written with the error the blocking call raises.
        """
        deadline = submission.deadline
        try:
            chunk: list[_Pending] = []
            for pending in pendings:
                if submission.settled:
                    return  # expired or cancelled meanwhile: forgotten
                if pending.outcome is not None or pending.written:
                    continue
                with self._cond.lock:
                    admitted = pending.id in self._pending
                if not admitted and not self._admit(pending, deadline, wait=not chunk):
                    self._write(chunk, deadline=deadline)
                    chunk = []
                    if not self._admit(pending, deadline):
                        continue  # forgotten while it waited for a slot (cancelled, timed out)
                chunk.append(pending)
                if len(chunk) >= _CHUNK_MESSAGES:
                    self._write(chunk, deadline=deadline)
                    chunk = []
            self._write(chunk, deadline=deadline)
        except (Disconnected, Blocked, PublishTimeout) as exc:
            self._fail([p for p in pendings if not p.written], exc)

    def flush(self, loop: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Send what ``submit(flush=False)`` queued, never waiting.

        What the socket does not take now (a full send buffer) is sent by the
        helper thread that may wait, not left for the next writer.  ``loop``:
        the event loop flushing, on its thread (see ``ConfirmChannel.flush``).
        """
        channel = self._channel
        if channel is not None and not channel.flush(loop=loop):
            def rest() -> None:
                # Until sent, or the connection fails (its liveness checks end a stuck write).
                channel.flush(wait=True)

            self.waiting.call(rest)

    def _fail(self, pendings: list[_Pending], error: BaseException) -> None:
        """Settle unwritten messages with ``error`` (raised to their caller as it is)."""
        with self._cond.lock:
            for p in pendings:
                if p.outcome is None:
                    p.outcome, p.error = "failed", error
                    self._pending.pop(p.id, None)
                    p.wake()
            self._cond.notify_all()

    def forget_all(self, pendings: list[_Pending]) -> None:
        """Their caller is gone (cancelled, timed out): see :meth:`_forget`."""
        for pending in pendings:
            if pending.outcome is None:
                self._forget(pending)

    # -- writing ---------------------------------------------------------------------------

    def _write(self, chunk: list[_Pending], alone: bool = False, deadline: Deadline = NEVER,
               nowait: bool = False, flush: bool = True) -> bool:
        """Write ``chunk`` on the confirm channel with consecutive delivery tags (one socket write).

        Args:
            chunk: The messages.
            alone: The careful path's single message; other writers stay out
                until it settles (see :meth:`_one_by_one`).
            deadline: The caller's publish deadline.
            nowait: Never wait (an event loop's thread): when the broker
                blocks the connection or the outgoing buffer is full, nothing
                is written and False is returned (the messages stay admitted,
                for :meth:`send_waiting`).
            flush: False: only queue the frames; the caller calls :meth:`flush` soon.

        Returns:
            False only with ``nowait``, when nothing could be written without waiting.

        Raises:
            Blocked: The broker blocked the connection (nothing was sent).
            PublishTimeout: Blocked past ``deadline`` (nothing was sent).
        """
        with self._cond.lock:
            if self._one_at_a_time and not alone:
                return True  # written when the channel is attached after the careful ones
            channel = self._channel
            # Checked under the lock that _forget takes: a message whose caller
            # is gone (cancelled, timed out not_sent) is never written later.
            todo = [p for p in chunk if p.outcome is None and not p.forgotten]
        if channel is None or not todo:
            return True  # written when the next connection is attached

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
            channel.write([p.message for p in todo], on_queued=queued,
                          deadline=clock() if nowait else deadline.at, flush=flush)
        except (Blocked, PublishTimeout):
            if nowait and not any(p.written for p in todo):
                return False  # blocked or back-pressured: a thread that may wait writes them
            for p in todo:
                self._forget(p)
            raise
        except (Disconnected, OSError, AMQPError) as exc:
            # The connection or the channel is going; the next channel publishes them again.
            logger.debug("%d publish(es) wait for the next confirm channel: %r", len(todo), exc)
        return True

    def _forget(self, pending: _Pending) -> None:
        """Its caller is gone (a timeout, an exception raised into it): not waited for, not published again.

        A message already written stays known by its delivery tag until the
        broker settles it: if the broker refuses it by closing the channel,
        the refusal must fall on it, not on another caller's message.
        """
        with self._cond.lock:
            pending.forgotten = True
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
            self._unknown_after_loss(unsettled, f"the broker closed the confirm channel ({error})")
            if not culprits and about_publish:
                # Unattributed: publish these again one at a time.
                self._careful.update(p.id for p in unsettled if p.outcome is None)
            for p in self._pending.values():
                p.wake()
            self._cond.notify_all()
        if culprits:
            logger.warning("carrot_kombu: the broker refused a publish (%s); the confirm channel is replaced", error)
        if generation is not None and self._need_channel is not None and self._closed is None:
            # A close that names no publish could come again for every rewrite: backed off.
            self._need_channel(generation, not about_publish)
