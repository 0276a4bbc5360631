"""py-amqp made safe to share between threads.

py-amqp lets any thread read the socket (``drain_events`` inside every RPC
wait and inside ``basic_publish``) and changes the *shared* socket timeout
around reads and writes, so two threads on one connection steal each other's
replies, or one thread's ``settimeout(0)`` breaks another's half-written
frame.  Here exactly one thread, the connection's reader, reads frames and
dispatches them; every other thread only writes (under one write lock, a
whole method with its content at a time) and then waits for its reply to be
handed over.  The socket timeout is never changed once the reader runs.

The supervisor (see ``_supervisor``) owns a :class:`SupervisedConnection`: it
connects it, starts its reader, calls :meth:`SupervisedConnection.tick` for
heartbeats and drops it without a close handshake when it is dead.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import uuid
from collections import deque
from contextlib import contextmanager
from time import monotonic
from typing import Any, Callable, Iterator, Optional

import amqp
from amqp import spec
from amqp.exceptions import (
    ChannelError,
    ConnectionForced,
    MessageNacked,
    RecoverableConnectionError,
    error_for_code,
)
from amqp.exceptions import ConnectionError as AMQPConnectionError
from amqp.method_framing import frame_writer as _frame_writer
from amqp.transport import SSLTransport, TCPTransport
from kombu.transport import pyamqp
from vine import ensure_promise, promise

from .exceptions import Blocked, Disconnected

__all__ = ("SupervisedConnection", "SupervisedChannel", "SupervisedTransport")

logger = logging.getLogger("carrot_kombu.amqp")

#: Replies a waiting thread may ask for after the reader already dispatched
#: them (py-amqp sends, *then* registers what it waits for).
_REPLIES = frozenset(
    {
        spec.Channel.OpenOk, spec.Channel.CloseOk, spec.Channel.FlowOk,
        spec.Exchange.DeclareOk, spec.Exchange.DeleteOk, spec.Exchange.BindOk,
        spec.Exchange.UnbindOk, spec.Queue.DeclareOk, spec.Queue.BindOk,
        spec.Queue.PurgeOk, spec.Queue.DeleteOk, spec.Queue.UnbindOk,
        spec.Basic.QosOk, spec.Basic.ConsumeOk, spec.Basic.CancelOk,
        spec.Basic.GetOk, spec.Basic.GetEmpty, spec.Basic.RecoverOk,
        spec.Confirm.SelectOk, spec.Tx.SelectOk, spec.Tx.CommitOk,
        spec.Tx.RollbackOk, spec.Connection.CloseOk,
    }
)
#: Requests the broker answers: on a blocked connection (the broker stops
#: reading) they would wait for the unblock, so they are bounded by
#: ``blocked_timeout`` like publishes.
_SYNC_REQUESTS = frozenset(
    {
        spec.Channel.Open, spec.Channel.Flow,
        spec.Exchange.Declare, spec.Exchange.Delete, spec.Exchange.Bind, spec.Exchange.Unbind,
        spec.Queue.Declare, spec.Queue.Bind, spec.Queue.Purge, spec.Queue.Delete, spec.Queue.Unbind,
        spec.Basic.Qos, spec.Basic.Consume, spec.Basic.Cancel, spec.Basic.Get, spec.Basic.Recover,
        spec.Confirm.Select, spec.Tx.Select, spec.Tx.Commit, spec.Tx.Rollback,
    }
)
#: Errors after which the connection cannot be used any more.
_FATAL = (AMQPConnectionError, OSError)


class _Reply:
    """One expected reply: registered before the request is written."""

    def __init__(self, chan: Any, methods: list[Any]) -> None:
        self.chan = chan
        self.conn: SupervisedConnection = getattr(chan, "_carrot_conn", None) or chan.connection
        self.methods = methods
        self.event = threading.Event()
        self.args: Optional[tuple[Any, ...]] = None
        self._prev: list[Any] = []

    def _arrived(self, *args: Any) -> None:
        self.args = args
        self.event.set()

    def register(self) -> None:
        inner = promise(self._arrived)
        with self.conn._carrot_reply_lock:
            stash = self.chan._carrot_replies
            for item in stash:
                if item[0] in self.methods:
                    stash.remove(item)
                    self._arrived(*item)
                    return
            pending = self.chan._pending
            for m in self.methods:
                self._prev.append(pending.get(m))
                pending[m] = inner
        self.conn._carrot_waiters.add(self.event)

    def unregister(self) -> None:
        self.conn._carrot_waiters.discard(self.event)
        pending = self.chan._pending
        with self.conn._carrot_reply_lock:
            for m, prev in zip(self.methods, self._prev):
                if prev is not None:
                    pending[m] = prev
                else:
                    pending.pop(m, None)

    def get(self, timeout: Optional[float]) -> tuple[Any, ...]:
        """Block until the reply, a channel/connection failure or ``timeout``."""
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            # Clear *before* checking: a wake-up after the checks stays set.
            self.event.clear()
            if self.args is not None:
                return self.args
            failure = self.chan._carrot_failure()
            if failure is not None:
                raise failure
            now = monotonic()
            blocked_until = self.conn._carrot_blocked_deadline()
            if blocked_until is not None and now >= blocked_until:
                raise self.conn._carrot_blocked_error("no reply")
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                raise socket.timeout()
            if blocked_until is not None:
                remaining = blocked_until - now if remaining is None else min(remaining, blocked_until - now)
            self.event.wait(remaining)


class _ThreadedWaitMixin:
    """``wait`` that never reads the socket when a reader thread owns it."""

    connection: Any
    is_closing: bool
    auto_decode: bool
    _pending: dict[Any, Any]
    _callbacks: dict[Any, Any]
    _carrot_replies: deque[tuple[Any, ...]]
    _METHODS: dict[Any, Any]
    _ALLOWED_METHODS_WHEN_CLOSING: tuple[Any, ...]

    def _carrot_failure(self) -> Optional[BaseException]:
        raise NotImplementedError

    def dispatch_method(self, method_sig: Any, payload: Any, content: Any) -> None:
        """Runs on the reader: hand replies over, keep early ones for their waiter."""
        if self.is_closing and method_sig not in self._ALLOWED_METHODS_WHEN_CLOSING:
            return
        listener = self._callbacks.get(method_sig)
        conn = self.connection
        if listener is None and method_sig not in _REPLIES:
            # Not a reply and nobody listens: py-amqp behaviour (pending only).
            super().dispatch_method(method_sig, payload, content)  # type: ignore[misc]
            return
        if content is not None and self.auto_decode and hasattr(content, "content_encoding"):
            try:
                content.body = content.body.decode(content.content_encoding)
            except Exception:
                pass
        amqp_method = self._METHODS[method_sig]
        args: list[Any] = []
        if amqp_method.args:
            args, _ = amqp.serialization.loads(amqp_method.args, payload, 4)
        if amqp_method.content:
            args.append(content)
        if listener is not None:
            # Before the waiter wakes: e.g. OpenOk marks the channel open.
            listener(*args)
        with conn._carrot_reply_lock:
            one_shot = self._pending.pop(method_sig, None)
            if one_shot is None:
                if method_sig in _REPLIES:
                    self._carrot_replies.append((method_sig, *args))
                return
        one_shot(method_sig, *args)

    @contextmanager
    def _carrot_expect(self, methods: list[Any]) -> Iterator[_Reply]:
        reply = _Reply(self, methods)
        reply.register()
        try:
            yield reply
        finally:
            reply.unregister()

    def wait(
        self,
        method: Any,
        callback: Any = None,
        timeout: Optional[float] = None,
        returns_tuple: bool = False,
    ) -> Any:
        conn = self.connection
        if conn is None:
            failure = self._carrot_failure()
            if failure is not None:
                raise failure
        if conn is None or not conn._carrot_threaded or conn._carrot_on_reader():
            return super().wait(method, callback, timeout, returns_tuple)  # type: ignore[misc]
        methods = method if isinstance(method, list) else [method]
        with self._carrot_expect(methods) as reply:
            args = reply.get(timeout)
        # The callback runs here, on the waiting thread, never on the reader.
        p = ensure_promise(callback)
        p(*args)
        if p.value:
            values, _ = p.value
            values = values[1:]  # drop the method signature, as py-amqp does
            return values if returns_tuple else (values and values[0])
        return None


class _SafeMessage(pyamqp.Message):  # type: ignore[misc]
    """A kombu message whose ack/reject of a lost connection's delivery is dropped.

    The delivery tag belongs to a dead channel: sending it anywhere would be
    wrong (on a new channel the broker answers 406 and closes it).  The broker
    redelivers the message on its own.
    """

    def _settle(self, how: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Disconnected:
            logger.debug("dropped %s of delivery %s: its connection is gone", how, self.delivery_tag)

    def ack(self, multiple: bool = False) -> None:
        self._settle("ack", super().ack, multiple)

    def reject(self, requeue: bool = False) -> None:
        self._settle("reject", super().reject, requeue)

    def requeue(self) -> None:
        self._settle("requeue", super().requeue)


class SupervisedChannel(_ThreadedWaitMixin, pyamqp.Channel):  # type: ignore[misc]
    """A kombu py-amqp channel that is safe beside other threads' channels."""

    Message = _SafeMessage

    _confirm_selected: bool

    def __init__(self, connection: Any, channel_id: Any = None, **kwargs: Any) -> None:
        self._carrot_replies: deque[tuple[Any, ...]] = deque(maxlen=64)
        self._carrot_error: Optional[BaseException] = None
        # py-amqp forgets the connection when a channel is collected; we need it
        # to tell "your connection died" (Disconnected) from "channel closed".
        self._carrot_conn: SupervisedConnection = connection
        super().__init__(connection, channel_id, **kwargs)

    def _carrot_failure(self) -> Optional[BaseException]:
        if self._carrot_error is not None:
            return self._carrot_error
        failure: Optional[BaseException] = self._carrot_conn._carrot_failure()
        if failure is None and self.connection is None:
            failure = RecoverableConnectionError("channel already closed")
        return failure

    def _basic_publish(
        self,
        msg: Any,
        exchange: str = "",
        routing_key: str = "",
        mandatory: bool = False,
        immediate: bool = False,
        timeout: Optional[float] = None,
        confirm_timeout: Optional[float] = None,
        argsig: str = "Bssbb",
    ) -> Any:
        """py-amqp's publish without its socket poll and socket-timeout switch.

        The reader already handles connection.blocked, and the shared
        socket's timeout is never changed (``timeout`` is ignored: a stuck
        write is the supervisor's to detect).
        """
        conn = self._carrot_conn
        if conn._carrot_dead is not None:
            raise conn._carrot_disconnected()
        if self.connection is None:
            raise RecoverableConnectionError("basic_publish: channel closed")
        return self.send_method(spec.Basic.Publish, argsig, (0, exchange, routing_key, mandatory, immediate), msg)

    basic_publish = _basic_publish

    def basic_publish_many(self, publishes: list[tuple[Any, str, str, bool]]) -> None:
        """Publish ``(message, exchange, routing_key, mandatory)`` tuples in one write.

        Same checks as :meth:`basic_publish` (dead connection, blocked broker).
        """
        conn = self._carrot_conn
        if conn._carrot_dead is not None:
            raise conn._carrot_disconnected()
        if self.connection is None:
            raise RecoverableConnectionError("basic_publish: channel closed")
        if self._carrot_error is not None:
            raise self._carrot_error
        if conn._carrot_blocked is not None:
            conn._carrot_wait_unblocked()
        write_many = conn._carrot_write_many
        assert write_many is not None
        methods = [
            (self.channel_id, spec.Basic.Publish, amqp.serialization.dumps("Bssbb", (0, ex, rk, mandatory, False)), msg)
            for msg, ex, rk, mandatory in publishes
        ]
        try:
            write_many(methods)
        except _FATAL as exc:
            if conn._carrot_dead is None:
                raise
            raise conn._carrot_disconnected() from exc

    def send_method(
        self,
        sig: Any,
        format: Any = None,
        args: Any = None,
        content: Any = None,
        wait: Any = None,
        callback: Any = None,
        returns_tuple: bool = False,
    ) -> Any:
        if self._carrot_error is not None and sig != spec.Channel.CloseOk:
            raise self._carrot_error
        conn = self._carrot_conn
        if conn._carrot_dead is not None:
            raise conn._carrot_disconnected()
        if conn._carrot_blocked is not None and (content is not None or sig in _SYNC_REQUESTS):
            conn._carrot_wait_unblocked()
        try:
            return super().send_method(sig, format, args, content, wait, callback, returns_tuple)
        except _FATAL as exc:
            if conn._carrot_dead is None:
                raise  # a wait that timed out, or a channel its user closed: connection fine
            raise conn._carrot_disconnected() from exc

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        """Broker closed this channel (404, 406...): discard it, never revive it.

        py-amqp would reopen the channel under the same id and raise on the
        reader thread; instead the error is kept and raised in whichever thread
        uses, or waits on, this channel.  The pool then discards it.
        """
        self._carrot_error = error_for_code(
            reply_code, reply_text, (class_id, method_id), ChannelError
        )
        conn = self.connection
        try:
            amqp.Channel.send_method(self, spec.Channel.CloseOk)
        finally:
            self.is_open = False
            if conn is not None:
                with conn._carrot_id_lock:  # free the channel id for reuse
                    self.collect()
                conn._carrot_wake_all()

    # -- user callbacks run on the reader: their errors stay theirs --------------------

    def _on_basic_deliver(self, *args: Any) -> None:
        _contained(super()._on_basic_deliver, args, "basic_consume callback")

    def _on_basic_return(self, *args: Any) -> None:
        _contained(super()._on_basic_return, args, "on_return callback")

    def _on_basic_ack(self, *args: Any) -> None:
        _contained(super()._on_basic_ack, args, "basic_ack listener")

    def _on_basic_nack(self, *args: Any) -> None:
        _contained(super()._on_basic_nack, args, "basic_nack listener")

    def _on_basic_cancel(self, *args: Any) -> None:
        _contained(super()._on_basic_cancel, args, "consumer cancel callback")

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

        py-amqp registers it after ConsumeOk; with a separate reader thread the
        first deliveries could arrive in between and be rejected (or, with
        ``no_ack``, close the channel).  So the tag is chosen here when none is
        given, and the callback is in place before the request is written.
        """
        conn = self.connection
        if conn is None or not conn._carrot_threaded:
            return super().basic_consume(
                queue, consumer_tag, no_local, no_ack, exclusive, nowait,
                callback, arguments, on_cancel, argsig,
            )
        tag = consumer_tag or f"carrot-kombu.{uuid.uuid4().hex}"
        self.callbacks[tag] = callback
        if on_cancel:
            self.cancel_callbacks[tag] = on_cancel
        if no_ack:
            self.no_ack_consumers.add(tag)
        try:
            return super().basic_consume(
                queue, tag, no_local, no_ack, exclusive, nowait,
                callback, arguments, on_cancel, argsig,
            )
        except BaseException:
            self.callbacks.pop(tag, None)
            self.cancel_callbacks.pop(tag, None)
            self.no_ack_consumers.discard(tag)
            raise

    def basic_publish_confirm(self, *args: Any, **kwargs: Any) -> Any:
        """Publish and wait for the broker's ack; the ack is expected *before* writing."""
        confirm_timeout = kwargs.pop("confirm_timeout", None)
        conn = self.connection
        if conn is None or not conn._carrot_threaded:
            kwargs["confirm_timeout"] = confirm_timeout
            return super().basic_publish_confirm(*args, **kwargs)
        if not self._confirm_selected:
            self._confirm_selected = True
            self.confirm_select()
        timeout = confirm_timeout or kwargs.get("timeout")
        with self._carrot_expect([spec.Basic.Ack, spec.Basic.Nack]) as reply:
            ret = self._basic_publish(*args, **kwargs)
            method_sig = reply.get(timeout)[0]
        if method_sig == spec.Basic.Nack:
            raise MessageNacked()
        return ret


def _contained(fn: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
    """Run a user callback on the reader; an exception in it is logged, not fatal."""
    try:
        fn(*args)
    except Exception:
        logger.exception("carrot_kombu: %s raised; the connection is kept", what)


class _SharedSocketMixin:
    """Once the reader runs, nobody may change the shared socket's timeout."""

    _carrot_shared = False

    @contextmanager
    def having_timeout(self, timeout: Optional[float]) -> Iterator[Any]:
        if self._carrot_shared or timeout is None:
            yield self.sock  # type: ignore[attr-defined]
            return
        with super().having_timeout(timeout) as sock:  # type: ignore[misc]
            yield sock


class _TCP(_SharedSocketMixin, TCPTransport):  # type: ignore[misc]
    pass


class _SSL(_SharedSocketMixin, SSLTransport):  # type: ignore[misc]
    """TLS with the reader and the writers taking turns on the SSL object.

    OpenSSL forbids SSL_read and SSL_write on one SSL object from two threads
    at once (it corrupts the TLS state).  The reader waits for data *outside*
    the lock (``select`` plus ``pending()`` for bytes already decrypted), then
    reads under it; every write holds it.
    """

    def _setup_transport(self) -> None:
        super()._setup_transport()
        self._carrot_tls_lock = threading.Lock()
        sock = self.sock
        raw_read = sock.read
        lock = self._carrot_tls_lock

        def read(n: int) -> bytes:
            if not self._carrot_shared:
                return raw_read(n)  # type: ignore[no-any-return]
            while not sock.pending():
                readable, _, _ = select.select([sock], [], [], 1.0)
                if readable:
                    break
            with lock:
                return raw_read(n)  # type: ignore[no-any-return]

        self._quick_recv = read

    def _write(self, s: Any) -> None:
        if not self._carrot_shared:
            super()._write(s)
            return
        with self._carrot_tls_lock:
            super()._write(s)


class _Collector:
    """A stand-in transport: py-amqp's frame writer appends its frames here."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: Any) -> None:
        self.chunks.append(bytes(data))


def _locked_frame_writer(connection: "SupervisedConnection", transport: Any) -> Callable[..., None]:
    inner = _frame_writer(connection, transport)
    lock = connection._carrot_write_lock
    connection._carrot_raw_writer = inner
    collector = _Collector()
    encoders: list[Callable[..., None]] = []  # made on first use: it holds a frame_max buffer

    def guarded(write: Callable[[], None]) -> None:
        with lock:
            connection._carrot_writing_since = monotonic()
            try:
                write()
            except BaseException as exc:
                # Part of a frame may be on the wire: the stream cannot be resumed.
                if connection._carrot_threaded:
                    connection._carrot_io_failed(exc)
                raise
            finally:
                connection._carrot_writing_since = None
        connection._carrot_last_tx = monotonic()

    def write_frame(type_: int, channel: int, method_sig: Any, args: Any, content: Any) -> None:
        guarded(lambda: inner(type_, channel, method_sig, args, content))

    def write_many(methods: list[tuple[int, Any, Any, Any]]) -> None:
        """Several methods (with content) in one socket write, none interleaved."""
        def write() -> None:
            if not encoders:
                encoders.append(_frame_writer(connection, collector))  # same framing, into memory
            encode = encoders[0]
            collector.chunks = []
            for channel, method_sig, args, content in methods:
                encode(1, channel, method_sig, args, content)
            transport.write(b"".join(collector.chunks))

        guarded(write)

    connection._carrot_write_many = write_many
    return write_frame


class SupervisedConnection(_ThreadedWaitMixin, pyamqp.Connection):  # type: ignore[misc]
    """A py-amqp connection whose frames are read by one reader thread."""

    Channel = SupervisedChannel

    # py-amqp drops connection.blocked's ``reason`` argument; decode it.
    _METHODS = {
        **pyamqp.Connection._METHODS,
        spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s"),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._carrot_threaded = False
        self._carrot_replies: deque[tuple[Any, ...]] = deque(maxlen=64)
        self._carrot_reader: Optional[threading.Thread] = None
        self._carrot_dead: Optional[BaseException] = None
        self._carrot_waiters: set[threading.Event] = set()
        self._carrot_reply_lock = threading.Lock()
        self._carrot_write_lock = threading.Lock()
        self._carrot_id_lock = threading.Lock()
        self._carrot_drained = threading.Condition()
        self._carrot_drain_waiting = 0
        self._carrot_raw_writer: Optional[Callable[..., None]] = None
        self._carrot_write_many: Optional[Callable[[list[tuple[int, Any, Any, Any]]], None]] = None
        self._carrot_on_lost: Optional[Callable[["SupervisedConnection", BaseException], None]] = None
        self._carrot_last_rx = self._carrot_last_tx = monotonic()
        self._carrot_connected_once = False
        self._carrot_blocked: Optional[str] = None
        self._carrot_blocked_at = 0.0
        self._carrot_unblocked = threading.Event()
        self._carrot_unblocked.set()
        self._carrot_blocked_timeout: Optional[float] = None
        self._carrot_writing_since: Optional[float] = None
        self._carrot_on_blocked: Optional[Callable[[str], None]] = None
        self._carrot_on_unblocked: Optional[Callable[[], None]] = None
        kwargs["frame_writer"] = _locked_frame_writer
        super().__init__(*args, **kwargs)

    # -- lifecycle, called by the supervisor ------------------------------------

    def connect(self, callback: Any = None) -> Any:
        if self._carrot_connected_once:
            # py-amqp reconnects implicitly when a dead connection's transport is
            # touched; only the supervisor may make connections.
            raise RecoverableConnectionError("connection lost; carrot_kombu reconnects it")
        self._carrot_connected_once = True
        return super().connect(callback)

    def Transport(  # noqa: N802 - py-amqp's factory name
        self, host: str, connect_timeout: Any, ssl: Any = False,
        read_timeout: Any = None, write_timeout: Any = None, **kwargs: Any,
    ) -> Any:
        if ssl:
            return _SSL(host, connect_timeout=connect_timeout, ssl=ssl,
                        read_timeout=read_timeout, write_timeout=write_timeout, **kwargs)
        return _TCP(host, connect_timeout=connect_timeout,
                    read_timeout=read_timeout, write_timeout=write_timeout, **kwargs)

    def start_reader(self, on_lost: Callable[["SupervisedConnection", BaseException], None]) -> None:
        """Hand the socket to a reader thread; from now on no other thread reads."""
        self._carrot_on_lost = on_lost
        transport = self._transport
        transport._carrot_shared = True
        # py-amqp leaves a TLS socket with connect_timeout as its timeout: a slow
        # write would then stop half-way.  Liveness is the supervisor's job.
        transport.sock.settimeout(None)
        self._carrot_last_rx = monotonic()
        self._carrot_reader = threading.Thread(
            target=self._carrot_read_loop, name=f"carrot-kombu-reader-{self.host}", daemon=True
        )
        self._carrot_threaded = True
        self._carrot_reader.start()

    def tick(self) -> None:
        """Send a heartbeat when due; raise when the broker has gone silent.

        Never blocks: a heartbeat is skipped while another thread is writing
        (its frame is traffic too).

        Raises:
            ConnectionForced: After two heartbeat intervals without a frame.
        """
        if self._carrot_dead is not None:
            raise self._carrot_dead
        now = monotonic()
        writing_since = self._carrot_writing_since
        limit = self._carrot_blocked_timeout
        if (
            self._carrot_blocked is not None
            and writing_since is not None
            and limit is not None
            and now - writing_since > limit
        ):
            # A frame half-written to a broker that stopped reading: the stream
            # cannot be resumed cleanly, the connection has to go.
            raise Blocked(
                f"a write stayed stuck for {now - writing_since:.1f}s on a connection blocked by "
                f"the broker ({self._carrot_blocked}); blocked_timeout is {limit}s"
            )
        hb = self.heartbeat
        if not hb:
            return
        # RabbitMQ sends no heartbeats to a connection it blocks (it reads
        # nothing from it either): silence is expected then, and a dead peer is
        # left to TCP keepalive until the broker unblocks us.
        if self._carrot_blocked is None and now - self._carrot_last_rx > 2 * hb:
            raise ConnectionForced(
                f"Too many heartbeats missed: no frame from the broker for {now - self._carrot_last_rx:.1f}s "
                f"(heartbeat {hb}s)"
            )
        if now - self._carrot_last_tx >= hb / 2 and self._carrot_raw_writer is not None:
            if self._carrot_write_lock.acquire(blocking=False):
                try:
                    self._carrot_raw_writer(8, 0, None, None, None)
                    self._carrot_last_tx = monotonic()
                finally:
                    self._carrot_write_lock.release()

    def kill(self, exc: BaseException) -> None:
        """Mark dead and tear the socket down at once: no handshake, no blocking.

        ``shutdown`` wakes the reader and any writer stuck in ``sendall``.
        """
        if self._carrot_dead is None:
            self._carrot_dead = exc
        self._carrot_unblocked.set()  # publishers held for an unblock: fail them now
        transport = self._transport
        sock = getattr(transport, "sock", None)
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass
        self._carrot_wake_all()
        try:
            self.collect()
        except Exception:  # a half-dead socket may fail in many ways; it is gone anyway
            logger.debug("ignored error while dropping a dead connection", exc_info=True)
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _on_close(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        """Broker closes the connection: mark it dead *before* py-amqp collects it.

        Threads waiting for replies then see Disconnected, not a bare
        "channel already closed".
        """
        if self._carrot_dead is None:
            self._carrot_dead = error_for_code(
                reply_code, reply_text, (class_id, method_id), AMQPConnectionError
            )
        try:
            super()._on_close(reply_code, reply_text, class_id, method_id)
        finally:
            self._carrot_wake_all()

    def _on_blocked(self, reason: str = "") -> None:
        """Runs on the reader: flag first, so publishers stop before the event is out."""
        reason = reason or "connection blocked, see broker logs"
        self._carrot_blocked_at = monotonic()
        self._carrot_blocked = reason
        self._carrot_unblocked.clear()
        self._carrot_wake_all()  # waiters for replies now have a deadline
        if self._carrot_on_blocked is not None:
            self._carrot_on_blocked(reason)
        if self.on_blocked:  # a user's transport_options callback, as py-amqp would
            self.on_blocked(reason)

    def _on_unblocked(self) -> None:
        self._carrot_blocked = None
        self._carrot_unblocked.set()
        if self._carrot_on_unblocked is not None:
            self._carrot_on_unblocked()
        if self.on_unblocked:
            self.on_unblocked()

    def _carrot_wait_unblocked(self) -> None:
        """Hold a publish while the broker blocks us, at most ``blocked_timeout``.

        Raises:
            Blocked: Still blocked after ``blocked_timeout`` seconds (nothing
                was written; the connection stays usable).
        """
        if self._carrot_on_reader():
            # Only the reader can see connection.unblocked: it must never wait.
            raise Blocked(
                f"the broker has blocked this connection ({self._carrot_blocked}); a callback "
                "running on the connection's reader thread cannot wait for it to unblock"
            )
        if self._carrot_unblocked.wait(self._carrot_blocked_timeout):
            if self._carrot_dead is not None:
                raise self._carrot_disconnected()
            return
        raise self._carrot_blocked_error("nothing was sent")

    def _carrot_blocked_deadline(self) -> Optional[float]:
        """When a wait for a reply must give up because the broker blocks us."""
        if self._carrot_blocked is None or self._carrot_blocked_timeout is None:
            return None
        if self._carrot_on_reader():
            return self._carrot_blocked_at
        return self._carrot_blocked_at + self._carrot_blocked_timeout

    def _carrot_blocked_error(self, outcome: str) -> Blocked:
        return Blocked(
            f"the broker has blocked this connection ({self._carrot_blocked}) for longer than "
            f"blocked_timeout={self._carrot_blocked_timeout}s; {outcome}"
        )

    def join_reader(self, timeout: float) -> None:
        reader = self._carrot_reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout)

    # -- used by channels and waiters ----------------------------------------------

    def _carrot_on_reader(self) -> bool:
        return threading.current_thread() is self._carrot_reader

    def _carrot_failure(self) -> Optional[BaseException]:
        if self._carrot_dead is not None:
            return self._carrot_disconnected()
        return None

    def _carrot_disconnected(self) -> Disconnected:
        dead = self._carrot_dead
        err = Disconnected(f"connection lost: {type(dead).__name__}: {dead}", dead)
        return err

    def _carrot_io_failed(self, exc: BaseException) -> None:
        """A writer hit a dead socket: tell the supervisor at once."""
        if self._carrot_dead is not None:
            return
        self._carrot_dead = exc
        self._carrot_wake_all()
        on_lost = self._carrot_on_lost
        if on_lost is not None:
            on_lost(self, exc)

    def _carrot_wake_all(self) -> None:
        for event in list(self._carrot_waiters):
            event.set()
        with self._carrot_drained:
            self._carrot_drained.notify_all()

    def _carrot_read_loop(self) -> None:
        transport = self._transport
        read_frame = transport.read_frame
        handle = self.on_inbound_frame
        drained = self._carrot_drained
        error: BaseException
        try:
            while True:
                frame = read_frame()
                self._carrot_last_rx = monotonic()
                try:
                    handle(frame)
                except _FATAL:
                    raise
                except Exception:
                    # A user callback (basic_consume, on_return...) failed: that
                    # is the callback's problem, not the connection's.
                    logger.exception("error while dispatching a frame; connection kept")
                if self._carrot_drain_waiting:
                    with drained:
                        drained.notify_all()
        except BaseException as exc:  # noqa: B902 - the reader must always report
            error = exc
        if self._carrot_dead is None:
            self._carrot_dead = error
        self._carrot_wake_all()
        on_lost = self._carrot_on_lost
        if on_lost is not None:
            on_lost(self, self._carrot_dead)  # the first cause, not the echo of the shutdown

    # -- py-amqp entry points that would read or race ---------------------------------

    def drain_events(self, timeout: Optional[float] = None) -> None:
        if not self._carrot_threaded:
            super().drain_events(timeout)
            return
        if self._carrot_on_reader():
            # A callback on the reader asked to read (basic_publish polls with
            # timeout=0).  The socket timeout is never changed any more, so a
            # poll would block: the reader reads right after the callback anyway.
            if timeout == 0:
                raise socket.timeout()
            super().drain_events(timeout)
            return
        # The reader reads; another thread can only wait for it to dispatch.
        if self._carrot_dead is not None:
            raise self._carrot_disconnected()
        if timeout == 0:
            raise socket.timeout()
        with self._carrot_drained:
            self._carrot_drain_waiting += 1
            try:
                if not self._carrot_drained.wait(timeout):
                    raise socket.timeout()
            finally:
                self._carrot_drain_waiting -= 1
        if self._carrot_dead is not None:
            raise self._carrot_disconnected()

    def channel(self, channel_id: Any = None, callback: Any = None) -> Any:
        if self.channels is None or self._carrot_dead is not None:
            raise self._carrot_disconnected() if self._carrot_dead else RecoverableConnectionError(
                "Connection already closed."
            )
        with self._carrot_id_lock:  # py-amqp allocates ids without a lock
            existing = self.channels.get(channel_id) if channel_id is not None else None
            if existing is not None:
                return existing
            chan = self.Channel(self, channel_id, on_open=callback)
        try:
            chan.open()
        except BaseException:
            try:
                chan.collect()
            except Exception:
                pass
            raise
        return chan


class SupervisedTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport, with :class:`SupervisedConnection`."""

    Connection = SupervisedConnection
