"""A kombu py-amqp channel that is safe beside other threads' channels on one connection.

Every method is encoded (and checked) in the calling thread before the
connection sees it, written atomically with the channel's state (a channel
that is closing writes nothing but its close), and its reply awaited for at
most ``reply_timeout``.  What the broker sends is handled by
:meth:`SupervisedChannel.dispatch_method` on the reading thread: replies
are handed over, confirms settled, deliveries queued; user callbacks run in
``drain_events`` callers, never there.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import Any, Callable, NoReturn, Optional

from amqp import spec
from amqp.exceptions import (
    AMQPNotImplementedError,
    ChannelError,
    MessageNacked,
    error_for_code,
)

from .. import _nowait
from .._sync import raised_by_library
from ..exceptions import Disconnected, PublishTimeout
from .frames import (
    decode_args,
    encode_args,
    encode_content,
    encode_message,
    encode_method,
    encode_publish_args,
    method_name,
)
from .chanstate import ChanState, NotOutstanding
from . import wire as _wire
from .connstate import ConnState
from .consuming import ConsumingChannel
from .messages import SafeMessage, _raise
from .replies import Reply, copy_error

__all__ = ("SupervisedChannel",)

logger = logging.getLogger("carrot_kombu.amqp")

#: Requests the broker answers: on a blocked connection (the broker stops
#: reading) they wait for the unblock, bounded by ``blocked_timeout``.
_SYNC_REQUESTS = frozenset(
    {
        spec.Channel.Open, spec.Channel.Flow,
        spec.Exchange.Declare, spec.Exchange.Delete, spec.Exchange.Bind, spec.Exchange.Unbind,
        spec.Queue.Declare, spec.Queue.Bind, spec.Queue.Purge, spec.Queue.Delete, spec.Queue.Unbind,
        spec.Basic.Qos, spec.Basic.Consume, spec.Basic.Cancel, spec.Basic.Get, spec.Basic.Recover,
        spec.Confirm.Select, spec.Tx.Select, spec.Tx.Commit, spec.Tx.Rollback,
    }
)
#: Settling a delivery: on a channel that is closing these are dropped
#: (the broker requeues what was not settled), never an error.
_SETTLE = frozenset({spec.Basic.Ack, spec.Basic.Reject, (60, 120), spec.Basic.RecoverAsync})
_CLOSE_METHODS = (spec.Channel.Close, spec.Channel.CloseOk)
#: Methods that change what the next borrower of the channel would inherit
#: (transaction mode, prefetch, flow) or settle deliveries: see ChanState.borrower_changed.
_STATEFUL = frozenset({
    spec.Tx.Select, spec.Confirm.Select, spec.Basic.Qos, spec.Channel.Flow, spec.Basic.Recover, spec.Basic.RecoverAsync,
    spec.Basic.Ack, spec.Basic.Reject, (60, 120),
})


class SupervisedChannel(ConsumingChannel):
    """kombu's py-amqp channel, with its I/O and dispatch owned by :class:`ChanState`.

    Subscribing, cancelling and delivering: :class:`~carrot_kombu._pyamqp.consuming.ConsumingChannel`.
    """

    Message = SafeMessage

    #: Settling a delivery of a lost connection or a closed channel raises
    #: (``Disconnected``), as py-amqp does, instead of being dropped.  Set on
    #: the channels of the kombu transport, so that kombu and Celery hear of
    #: a failed ack as on py-amqp.  It does not keep Celery from running the
    #: task: Celery 5 logs "Couldn't ack" and runs it (the broker redelivers
    #: it, so it runs twice on either transport); what keeps a delivery of a
    #: lost connection from reaching Celery at all is that none is dispatched
    #: after the loss (``EventQueue.drain``, :meth:`basic_cancel`).  Consumers
    #: of ``manager.consume`` keep the drop (documented there).
    settle_strictly = False
    #: Carries several ``consume()`` consumers (issue 20): a delivery's
    #: ``ack(multiple=True)`` would settle its neighbours' deliveries too.
    shared_by_consumers = False

    def __init__(self, connection: Any, channel_id: Any = None, auto_decode: bool = True, on_open: Any = None) -> None:
        self.carrot = ChanState(self, connection.carrot)
        self._pending_get_no_ack = False
        super().__init__(connection, channel_id, auto_decode=auto_decode, on_open=on_open)

    def __repr__(self) -> str:
        state = self.carrot
        flags = [
            name for name, on in (
                ("open", getattr(self, "is_open", False)), (state.phase.value, state.closing),
                ("confirm", state.confirm_mode), ("unverified", state.unverified),
            ) if on
        ]
        if state.error is not None:
            flags.append(f"error={type(state.error).__name__}")
        if state.spoiled:
            flags.append("spoiled")
        return f"<SupervisedChannel {self.channel_id} {' '.join(flags)}>"

    # -- writing ----------------------------------------------------------------------------

    def open(self, deadline: Optional[float] = None) -> None:
        """py-amqp's channel.open; ``deadline`` (``time.monotonic()``) bounds the wait for open-ok."""
        if self.is_open:
            return
        self.send_method(spec.Channel.Open, "s", ("",), wait=spec.Channel.OpenOk, deadline=deadline)

    def open_begin(self) -> Reply:
        """Write channel.open without waiting (many channels opened in one round trip); see :meth:`open_end`.

        Raises:
            Exception: Nothing was written (the connection is lost...).
        """
        state: ChanState = self.carrot
        reply = state.expect([spec.Channel.OpenOk])
        try:
            frames = self._frames(spec.Channel.Open, encode_args(spec.Channel.Open, "s", ("",)), None)
            self._write(spec.Channel.Open, frames, False, True)
        except BaseException:
            state.forget(reply)
            raise
        return reply

    def open_end(self, reply: Reply, deadline: Optional[float] = None) -> None:
        """Wait for the open-ok of :meth:`open_begin` (bounded by ``reply_timeout``)."""
        state: ChanState = self.carrot
        try:
            state.conn.await_reply(reply, None, "Channel.Open", deadline)
        finally:
            state.forget(reply)

    def send_method(
        self,
        sig: Any,
        format: Any = None,
        args: Any = None,
        content: Any = None,
        wait: Any = None,
        callback: Any = None,
        returns_tuple: bool = False,
        deadline: Optional[float] = None,
    ) -> Any:
        """py-amqp's send_method; ``deadline`` (``time.monotonic()``) bounds a blocked wait and the reply's."""
        state: ChanState = self.carrot
        frames = self._frames(sig, encode_args(sig, format, args or ()), content)
        try:
            undo = state.borrower_changed(sig, args or ()) if sig in _STATEFUL else None
        except NotOutstanding as exc:
            logger.debug("dropped %s of delivery %s on a shared consumer channel: settled already",
                         method_name(sig), exc.tag)
            return None
        try:
            reply = state.expect(wait if isinstance(wait, list) else [wait]) if wait else None
        except BaseException:
            if undo is not None:
                undo()
            raise
        # A settlement inside _nowait.nowait() (an event loop's ack) waits
        # neither for room nor for the socket: deadline "now".
        room_deadline = monotonic() if sig in _SETTLE and _nowait.active() else None
        try:
            self._write(sig, frames, content is not None, reply is not None, request_deadline=deadline,
                        deadline=room_deadline)
            if callback:
                callback()
            if reply is None:
                return None
            result = state.conn.await_reply(reply, None, method_name(sig), deadline)
        except BaseException as exc:
            self._request_failed(sig, reply, undo, exc)
            raise
        finally:
            if reply is not None:
                state.forget(reply)
        values = result[1:]
        return values if returns_tuple else (values and values[0])

    def _request_failed(self, sig: Any, reply: Optional[Reply], undo: Optional[Callable[[], None]],
                        exc: BaseException) -> None:
        """:meth:`send_method` raised ``exc``: undo a settlement's booking, spoil the channel if a reply may come."""
        not_written = getattr(exc, "carrot_not_written", False)
        if undo is not None and not_written:
            undo()  # a settlement not written (it would have waited): still to be made
        # Spoiled unless the request is known not to have been queued
        # (_before_queueing marks what it raises): an exception raised into
        # this thread after _write queued the frames, but before it
        # returned, left a request whose reply may still come, and the
        # next request on this channel would take it as its own (the
        # red-team saw 1 in 800 interrupts do that).
        if reply is not None and not reply.ready() and not isinstance(exc, Disconnected) and not not_written:
            self.carrot.spoil(f"a {method_name(sig)} was abandoned ({type(exc).__name__})")

    def _frames(self, sig: Any, payload: bytes, content: Any) -> list[Any]:
        frames: list[Any] = [encode_method(self.channel_id or 0, sig, payload)]
        if content is not None:
            props, body = encode_message(content)
            frames += encode_content(self.channel_id or 0, sig[0], props, body, self.carrot.conn.conn.frame_max)
        return frames

    def _write(
        self,
        sig: Any,
        frames: list[Any],
        has_content: bool,
        expects_reply: bool,
        *,
        publishes: int = 0,
        confirm_reply: Optional[Reply] = None,
        on_queued: Optional[Callable[[int, bool], None]] = None,
        deadline: Optional[float] = None,
        request_deadline: Optional[float] = None,
        flush: bool = True,
    ) -> int:
        """Queue ``frames`` atomically with this channel's state; returns the first delivery tag.

        ``flush=False`` only queues them: the caller flushes soon (an event
        loop flushes once per iteration what all its tasks wrote).

        ``deadline`` (``time.monotonic()``) bounds the waits before the frames
        are queued (a blocked connection, a full buffer) and this thread's
        sending: past it, what is queued is sent by the next writer or the
        service thread.  ``request_deadline`` (a request's caller, e.g. a
        lease's timeout) bounds only the wait while the broker blocks us.

        Raises:
            Disconnected: The connection is lost (nothing was written).
            Blocked: The broker blocked the connection for ``blocked_timeout``.
            PublishTimeout: Blocked or back-pressured past ``deadline`` (nothing was written).
            ChannelError: The broker closed this channel (its error).
        """
        state: ChanState = self.carrot
        settles = sig in _SETTLE  # (the hot path, a publish, skips the calls below: measured)
        if settles and self._dropped(sig):
            if self.settle_strictly:
                raise Disconnected(f"channel {self.channel_id} is closed: the delivery cannot be settled "
                                   "(the broker requeues it)")
            logger.debug("dropped %s on channel %s: it is closing (the broker requeues)", method_name(sig), self.channel_id)
            return 0
        if not state.clear_to_write(_wire.HIGH_WATER):  # (else _before_queueing has nothing to do: skipped)
            self._before_queueing(sig, has_content, request_deadline if deadline is None else deadline, deadline)
        with state.lock:
            if settles and self._dropped(sig):
                if self.settle_strictly:
                    raise Disconnected(f"channel {self.channel_id} is closed: the delivery cannot be settled "
                                       "(the broker requeues it)")
                return 0
            failure = state.failure()
            if failure is not None:
                raise failure
            first, must_flush = self._queue(frames, expects_reply, publishes, confirm_reply, on_queued)
            if sig == spec.Confirm.Select:
                state.confirm_mode = True
            if not expects_reply:
                state.unverified = True
        if must_flush and flush and (expects_reply or not state.defer_flush):
            self._flush(expects_reply, deadline)
        return first

    def _dropped(self, sig: Any) -> bool:
        """A settlement on a channel that is closing: dropped (the broker requeues), not an error."""
        state: ChanState = self.carrot
        return sig in _SETTLE and state.writes_dropped() and state.conn.dead is None

    def _before_queueing(self, sig: Any, has_content: bool, unblock_deadline: Optional[float],
                         room_deadline: Optional[float]) -> None:
        """Fail early, wait out a block, wait for room; marks what it raises as not written."""
        state: ChanState = self.carrot
        conn: ConnState = state.conn
        wire = conn.wire
        assert wire is not None
        try:
            failure = state.failure()
            if failure is not None:
                raise failure
            if conn.blocked is not None and (has_content or sig in _SYNC_REQUESTS):
                conn.wait_unblocked(unblock_deadline)
            if not wire.wait_room(room_deadline):
                if sig in _SETTLE and _nowait.active():
                    raise _nowait.WouldWait(f"{method_name(sig)} would wait for room in the outgoing buffer")
                raise PublishTimeout(
                    "the outgoing buffer stayed full past the publish timeout; the message was not sent",
                    outcome="not_sent",
                )
        except BaseException as exc:
            exc.carrot_not_written = True  # type: ignore[attr-defined]  # read by SupervisedConnection.channel
            raise

    def _queue(self, frames: list[Any], expects_reply: bool, publishes: int, confirm_reply: Optional[Reply],
               on_queued: Optional[Callable[[int, bool], None]]) -> tuple[int, bool]:
        """Under ``state.lock``: book delivery tags, queue the frames; (first tag, must flush).

        Delivery tags are booked *before* the frames are queued and unbooked
        only if they were not: whatever interrupts this thread, tags always
        match what the broker receives.  Confirms are dispatched under the
        lock too, so none can precede the booking.
        """
        state: ChanState = self.carrot
        wire = state.conn.wire
        assert wire is not None
        first = state.next_tag
        numbered = state.confirm_mode and publishes > 0
        try:
            # Inside the try: an interrupt anywhere in the booking (the
            # publisher's on_queued is Python code) is undone below, or
            # every later confirm would settle the wrong message.
            if numbered:
                state.next_tag = first + publishes
                if confirm_reply is not None:
                    state.confirm_waiters[first + publishes - 1] = confirm_reply
                if on_queued is not None:
                    on_queued(first, True)
            return first, wire.enqueue(frames, wait_room=False)
        except BaseException as exc:
            if not wire.holds(frames):
                if numbered:
                    self._unbook(first, publishes, on_queued)
                self._raise_for(exc)
            # Queued, then interrupted: the next writer sends it.
            if expects_reply:
                state.spoil("a request was interrupted while being queued")
            if not isinstance(exc, OSError):
                raise
            return first, False

    def _unbook(self, first: int, publishes: int, on_queued: Optional[Callable[[int, bool], None]]) -> None:
        state: ChanState = self.carrot
        state.next_tag = first
        state.confirm_waiters.pop(first + publishes - 1, None)
        if on_queued is not None:
            on_queued(first, False)

    def _flush(self, expects_reply: bool, deadline: Optional[float]) -> None:
        state: ChanState = self.carrot
        wire = state.conn.wire
        assert wire is not None
        try:
            wire.flush(until=deadline)
        except OSError as exc:
            self._raise_for(exc)
        except BaseException:
            # Interrupted while sending: the rest goes out with the next
            # writer, and a reply to it would come to nobody.
            if expects_reply:
                state.spoil("a request was interrupted while being sent")
            raise

    def _raise_for(self, exc: BaseException) -> NoReturn:
        """Raise what the writer's caller gets for ``exc`` (being handled): ``Disconnected`` for the socket's failure."""
        failure = self.carrot.conn.wire_failure(exc) if isinstance(exc, OSError) else exc
        if failure is exc:
            raise exc
        raise failure from exc

    def _send_nowait(self, sig: Any, fmt: str = "", args: tuple[Any, ...] = ()) -> None:
        """A reply of the reading thread itself (flow-ok, reject): never waits.

        Queued under the channel's lock, atomically with its phase: a close
        by another thread is queued either after this frame or before it,
        and then a settlement is dropped (a method that reaches the broker
        after it finished our close gets 504 CHANNEL_ERROR, a connection
        error; the broker requeues the delivery with the close anyway).
        """
        state: ChanState = self.carrot
        wire = state.conn.wire
        if wire is None or state.conn.dead is not None:
            return
        frame = encode_method(self.channel_id or 0, sig, encode_args(sig, fmt, args))
        with state.lock:
            if sig in _SETTLE and state.writes_dropped():
                logger.debug("dropped %s on channel %s: it is closing", method_name(sig), self.channel_id)
                return
            try:
                wire.enqueue([frame], wait_room=False)
            except OSError:
                return  # the connection died; its owner hears about it from the wire
        try:
            wire.flush(block=False)  # what the socket does not take now, the next writer sends
        except OSError:
            pass

    def wait(self, method: Any, callback: Any = None, timeout: Optional[float] = None,
             returns_tuple: bool = False) -> Any:
        """py-amqp's wait, for code that writes and then waits: bounded, never reads out of turn.

        A reply that arrived before this call registered is not seen (our
        own requests register before writing, see :meth:`send_method`).
        """
        state: ChanState = self.carrot
        reply = state.expect(method if isinstance(method, list) else [method])
        try:
            result = state.conn.await_reply(reply, timeout, method_name(reply.methods[0]))
        except BaseException as exc:
            if not reply.ready() and not isinstance(exc, Disconnected):
                state.spoil(f"a wait for {method_name(reply.methods[0])} was abandoned ({type(exc).__name__})")
            raise
        finally:
            state.forget(reply)
        if callback is not None:
            callback(*result)
        values = result[1:]
        return values if returns_tuple else (values and values[0])

    def queue_declare(self, queue: str = "", passive: bool = False, durable: bool = False,
                      exclusive: bool = False, auto_delete: bool = True, nowait: bool = False,
                      arguments: Any = None, argsig: str = "BsbbbbbF") -> Any:
        """py-amqp's queue_declare, with its reply registered before the request is written."""
        from amqp.protocol import queue_declare_ok_t

        result = self.send_method(
            spec.Queue.Declare, argsig, (0, queue, passive, durable, exclusive, auto_delete, nowait, arguments),
            wait=None if nowait else spec.Queue.DeclareOk, returns_tuple=True,
        )
        return None if nowait else queue_declare_ok_t(*result)

    # -- publishing -----------------------------------------------------------------------------

    def encode_publish(self, msg: Any, exchange: Any = "", routing_key: Any = "", mandatory: bool = False,
                       immediate: bool = False) -> list[Any]:
        """The frames of one ``basic.publish``, checked (nothing is written).

        Raises:
            TypeError, ValueError: Naming the field that cannot be sent.
        """
        if not (hasattr(msg, "properties") and hasattr(msg, "body")):
            raise TypeError(f"basic_publish() msg must be a message (channel.prepare_message(body) or "
                            f"amqp.Message(body)), not {type(msg).__name__}; nothing was sent")
        props, body = encode_message(msg)
        args = encode_publish_args(exchange, routing_key, mandatory, immediate)
        channel_id = self.channel_id or 0
        frames = [encode_method(channel_id, spec.Basic.Publish, args)]
        frames += encode_content(channel_id, spec.Basic.CLASS_ID, props, body, self.carrot.conn.conn.frame_max)
        return frames

    def write_publishes(self, frames: list[Any], count: int,
                        on_queued: Optional[Callable[[int, bool], None]] = None,
                        deadline: Optional[float] = None, flush: bool = True) -> int:
        """Write ``count`` already encoded publishes at once; returns the first delivery tag.

        ``on_queued(first_tag, True)`` runs while the channel is locked, just
        before the frames are queued: the place to record which tag is whose;
        ``on_queued(first_tag, False)`` undoes it if they could not be queued.
        ``deadline``: see :meth:`_write`.
        """
        return self._write(spec.Basic.Publish, frames, True, False, publishes=count, on_queued=on_queued,
                           deadline=deadline, flush=flush)

    def _basic_publish(
        self,
        msg: Any,
        exchange: Any = "",
        routing_key: Any = "",
        mandatory: bool = False,
        immediate: bool = False,
        timeout: Optional[float] = None,
        confirm_timeout: Optional[float] = None,
        argsig: str = "Bssbb",
    ) -> None:
        """py-amqp's publish: checked before writing, atomic with the channel's state.

        ``timeout`` is ignored: a stuck write is the connection's to detect
        (the shared socket's timeout is never changed).
        """
        self.write_publishes(self.encode_publish(msg, exchange, routing_key, mandatory, immediate), 1)

    basic_publish = _basic_publish

    def basic_publish_confirm(self, *args: Any, **kwargs: Any) -> None:
        """Publish and wait for the broker's confirm of *this* message (by delivery tag).

        Raises:
            MessageNacked: The broker refused it.
        """
        confirm_timeout = kwargs.pop("confirm_timeout", None)
        timeout = confirm_timeout or kwargs.pop("timeout", None)
        kwargs.pop("argsig", None)
        if not self.carrot.confirm_mode:
            self.confirm_select()
        frames = self.encode_publish(*args, **kwargs)
        reply = Reply(["confirm"])
        state: ChanState = self.carrot
        try:
            self._write(spec.Basic.Publish, frames, True, False, publishes=1, confirm_reply=reply)
            result = state.conn.await_reply(reply, timeout, "the confirm of Basic.Publish")
        finally:
            with state.lock:
                for tag, waiter in list(state.confirm_waiters.items()):
                    if waiter is reply:
                        del state.confirm_waiters[tag]
        if result[0] == "nack":
            raise MessageNacked()

    # -- consuming -------------------------------------------------------------------------------

    def sync(self) -> None:
        """One round trip (``channel.flow(active=True)``): everything written before it was accepted.

        Raises:
            Exception: The channel was closed meanwhile (the broker's error), or no reply in time.
        """
        self.send_method(spec.Channel.Flow, "b", (True,), wait=spec.Channel.FlowOk)

    # -- closing ----------------------------------------------------------------------------------

    def close(
        self, reply_code: int = 0, reply_text: str = "", method_sig: Any = (0, 0), argsig: str = "BsBB"
    ) -> None:
        """Close the channel: nothing is written on it after the close (late acks are dropped)."""
        state: ChanState = self.carrot
        conn = state.conn
        reply = Reply([spec.Channel.CloseOk])
        must_flush = self._start_close((reply_code, reply_text, method_sig[0], method_sig[1]), argsig, reply)
        if must_flush is None:
            return
        try:
            if must_flush:
                conn.wire.flush()  # type: ignore[union-attr]
            conn.await_reply(reply, None, "Channel.Close")
        except BaseException as exc:
            if conn.dead is None:
                # No CloseOk in time: the id stays taken (a late CloseOk must
                # not close a newer channel with the same id).
                state.spoil(f"no CloseOk ({type(exc).__name__})")
                logger.debug("channel %s: %s", self.channel_id, exc)
            if not raised_by_library(exc):
                raise  # a signal handler's, for the caller
        finally:
            state.forget(reply)
            self.is_closing = False

    def close_nowait(self) -> None:
        """Start closing without waiting for the broker's answer (discarding a channel).

        Nothing is written on the channel after its close; its id is freed
        when the close-ok arrives.
        """
        if self._start_close((0, "", 0, 0), "BsBB", None):
            try:
                self.carrot.conn.wire.flush(block=False)  # type: ignore[union-attr]
            except OSError:
                pass

    def _start_close(self, args: tuple[Any, ...], argsig: str, reply: Optional[Reply]) -> Optional[bool]:
        """OPEN -> CLOSING and queue channel.close (``reply`` registered for its close-ok).

        Returns:
            Whether the caller must flush; None if nothing is left to do (a
            close had begun, or the channel is gone and was collected here).
        """
        state: ChanState = self.carrot
        conn = state.conn
        wire = conn.wire
        if wire is None:
            return None
        frame = encode_method(self.channel_id or 0, spec.Channel.Close, encode_args(spec.Channel.Close, argsig, args))
        must_flush = False
        with state.lock:
            if self.connection is None or not state.begin_close():
                return None
            self.is_closing = True
            gone = conn.dead is not None or state.error is not None
            if not gone:
                if reply is not None:
                    state.replies[spec.Channel.CloseOk] = reply
                try:
                    must_flush = wire.enqueue([frame], wait_room=False)
                    state.close_sent = True
                except OSError:
                    gone = True
        state.gone()
        if gone:
            self._collect_locally()
            return None
        return must_flush

    def _collect_locally(self) -> None:
        state: ChanState = self.carrot
        state.mark_closed()
        self.is_open = False
        with state.conn.id_lock:
            super().collect()

    def collect(self) -> None:
        state: ChanState = self.carrot
        state.mark_closed()
        with state.conn.id_lock:
            super().collect()
        state.gone()

    # -- the reading thread ---------------------------------------------------------------------

    def dispatch_method(self, method_sig: Any, payload: Any, content: Any) -> None:
        """Runs on the reading thread: internal handling only; user code is queued."""
        state: ChanState = self.carrot
        if state.closing and method_sig not in _CLOSE_METHODS:
            return  # after our close, only its answer counts (AMQP); deliveries are requeued
        amqp_method = self._METHODS.get(method_sig)
        if amqp_method is None:
            raise AMQPNotImplementedError(f"Unknown AMQP method {method_sig!r}")
        if content is not None and self.auto_decode and hasattr(content, "content_encoding"):
            try:
                content.body = content.body.decode(content.content_encoding)
            except Exception:
                pass
        args: list[Any] = decode_args(amqp_method.args, payload) if amqp_method.args else []
        if amqp_method.content:
            args.append(content)
        handler = _HANDLERS.get(method_sig)
        if handler is not None:
            handler(self, *args)
        elif not state.resolve(method_sig, tuple(args)):
            logger.debug("channel %s: %s arrived with nobody waiting", self.channel_id, method_name(method_sig))

    def _on_open_ok(self) -> None:
        self.is_open = True
        if not self.carrot.resolve(spec.Channel.OpenOk, ()) and self.carrot.abandoned_open:
            self.close_nowait()  # never blocks: written, flushed if the socket takes it at once
            return
        if self.on_open is not None:
            try:
                self.on_open(self)  # py-amqp's channel(callback=...): ours only via kombu
            except Exception:
                logger.exception("carrot_kombu: channel on_open callback failed")

    def _on_close_ok(self) -> None:
        state: ChanState = self.carrot
        if not state.close_sent:
            # No close of ours to answer (a broker bug or a hostile peer): the
            # channel cannot be trusted.  Its id stays taken (the broker may
            # still count it open); waiters and the internal owner learn it as
            # a close naming no method, the publisher's replacement backs off.
            error = ChannelError("the broker sent channel.close-ok for a close never sent", spec.Channel.CloseOk)
            with state.lock:
                state.error = state.error or error
                state.begin_close()
            state.fail_all(error)
            hook = state.on_closed
            if hook is not None:
                hook(error, (0, 0))
            return
        self.collect()
        state.resolve(spec.Channel.CloseOk, ())

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        """The broker closed this channel (404, 406...): answer, discard it, never revive it.

        The error goes to whoever waits on (or next uses) this channel, and to
        the internal owner's ``on_closed`` hook.
        """
        state: ChanState = self.carrot
        error = error_for_code(reply_code, reply_text, (class_id, method_id), ChannelError)
        # A kombu consumer's channel (the transport's): py-amqp raises the close
        # from the drain_events that reads it; here the next one does, in turn
        # with the deliveries before it.  Unraised, the consumer sat silent for
        # good (Celery's worker consumed nothing, logged nothing).
        tell_drainer = self.settle_strictly and bool(self.callbacks)
        frame = encode_method(self.channel_id or 0, spec.Channel.CloseOk, b"")
        wire = state.conn.wire
        must_flush = False
        with state.lock:
            state.error = error
            state.begin_close()
            crossed = state.close_sent  # our close is on its way: its close-ok frees the id
            if wire is not None and state.conn.dead is None:
                try:
                    # Queued before any later Channel.Open that may reuse the id.
                    must_flush = wire.enqueue([frame], wait_room=False)
                except OSError:
                    pass
        if must_flush and wire is not None:
            try:
                wire.flush(block=False)
            except OSError:
                pass
        if crossed:
            # The broker answers our close with close-ok too; freeing the id now
            # would let that close-ok land on a newer channel with the same id.
            state.fail_all(error, keep=(spec.Channel.CloseOk,))
        else:
            self.collect()
            state.fail_all(error)
        hook = state.on_closed
        if hook is not None:
            hook(error, (class_id, method_id))
        if tell_drainer:
            state.events.post(_raise, copy_error(error))
        logger.debug("channel %s closed by the broker: %s", self.channel_id, error)

    def _on_flow(self, active: bool) -> None:
        self.active = active
        self._send_nowait(spec.Channel.FlowOk, "b", (active,))

    def _on_basic_return(self, reply_code: int, reply_text: str, exchange: str, routing_key: str, message: Any) -> None:
        state: ChanState = self.carrot
        exc = error_for_code(reply_code, reply_text, spec.Basic.Return, ChannelError)
        if state.on_return is not None:
            state.on_return(exc, exchange, routing_key, message)
        for handler in list(self.events.get("basic_return", ())):
            state.events.post(handler, exc, exchange, routing_key, message)

    def _on_basic_ack(self, delivery_tag: int, multiple: bool) -> None:
        self.carrot.confirmed(delivery_tag, multiple, True)
        for handler in list(self.events.get("basic_ack", ())):
            self.carrot.events.post(handler, delivery_tag, multiple)

    def _on_basic_nack(self, delivery_tag: int, multiple: bool) -> None:
        self.carrot.confirmed(delivery_tag, multiple, False)
        for handler in list(self.events.get("basic_nack", ())):
            self.carrot.events.post(handler, delivery_tag, multiple)

    # -- release-time verification -----------------------------------------------------------------

    def begin_sync(self, on_done: Callable[[bool], None]) -> bool:
        """Write ``channel.flow(active=True)`` and return without waiting.

        ``on_done(True)`` runs on the reading thread when the broker answers,
        ``on_done(False)`` if the channel closes first (a late error of an
        earlier publish or ack).  False if the request could not be written.
        """
        state: ChanState = self.carrot
        conn = state.conn
        wire = conn.wire
        if wire is None or conn.dead is not None:
            return False

        def arrived(reply: Reply) -> None:
            state.forget(reply)
            if reply.error is None:
                state.unverified = False
            on_done(reply.error is None)

        frame = encode_method(self.channel_id or 0, spec.Channel.Flow, encode_args(spec.Channel.Flow, "b", (True,)))
        reply = Reply([spec.Channel.FlowOk], on_arrival=arrived)
        with state.lock:
            if state.failure() is not None or spec.Channel.FlowOk in state.replies:
                return False
            state.replies[spec.Channel.FlowOk] = reply
            try:
                must_flush = wire.enqueue([frame], wait_room=False)
            except OSError:
                del state.replies[spec.Channel.FlowOk]
                return False
        if must_flush:
            try:
                wire.flush(block=False)
            except OSError:
                return False
        return True



_HANDLERS: dict[Any, Callable[..., None]] = {
    spec.Channel.Close: SupervisedChannel._on_close,
    spec.Channel.CloseOk: SupervisedChannel._on_close_ok,
    spec.Channel.OpenOk: SupervisedChannel._on_open_ok,
    spec.Channel.Flow: SupervisedChannel._on_flow,
    spec.Basic.Deliver: SupervisedChannel._on_basic_deliver,
    spec.Basic.Return: SupervisedChannel._on_basic_return,
    spec.Basic.Ack: SupervisedChannel._on_basic_ack,
    spec.Basic.Nack: SupervisedChannel._on_basic_nack,
    spec.Basic.Cancel: SupervisedChannel._on_basic_cancel,
    spec.Basic.CancelOk: SupervisedChannel._on_basic_cancel_ok,
}
