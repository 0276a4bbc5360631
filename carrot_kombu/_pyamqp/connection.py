"""A py-amqp connection whose I/O, after the handshake, belongs to :class:`ConnState`.

py-amqp performs the handshake (blocking, bounded by the attempt's
``connect_timeout`` as a whole, TLS included); then the socket is handed to
a :class:`~carrot_kombu._pyamqp.wire.Wire` and py-amqp never reads or writes
it again.  The supervisor (``carrot_kombu._supervisor``) owns one of these
per successful attempt and drops it, without a handshake, when it dies.
"""

from __future__ import annotations

import logging
import socket
from time import monotonic
from typing import Any, Callable, Optional

from amqp import spec
from amqp.exceptions import (
    ConnectionError as AMQPConnectionError,
    RecoverableConnectionError,
    ResourceError,
    error_for_code,
)
from amqp.transport import SSLTransport, TCPTransport
from kombu.transport import pyamqp

from ..exceptions import ChannelLimitReached, Disconnected
from .channel import SupervisedChannel
from .frames import decode_args, encode_args, encode_method, tolerant_frame_handler
from .connstate import ConnState

#: What may arrive on a channel between its channel.open and its open-ok.
_BEFORE_OPEN_OK = frozenset({spec.Channel.OpenOk, spec.Channel.Close, spec.Channel.CloseOk})

__all__ = ("SupervisedConnection", "SupervisedTransport", "LinkOptions")

logger = logging.getLogger("carrot_kombu.amqp")


class LinkOptions:
    """What a supervised connection needs beyond py-amqp's own arguments."""

    def __init__(
        self,
        reply_timeout: float = 10.0,
        blocked_timeout: Optional[float] = 30.0,
        on_created: Optional[Callable[["SupervisedConnection"], None]] = None,
    ) -> None:
        self.reply_timeout = reply_timeout
        self.blocked_timeout = blocked_timeout
        #: Told about the connection before its handshake (to abort it on stop()).
        self.on_created = on_created


class SupervisedConnection(pyamqp.Connection):  # type: ignore[misc]
    """kombu's py-amqp connection, made safe to share between threads."""

    Channel = SupervisedChannel

    # py-amqp drops connection.blocked's ``reason`` argument; decode it.
    _METHODS = {
        **pyamqp.Connection._METHODS,
        spec.Connection.Blocked: spec.method(spec.Connection.Blocked, "s"),
    }

    def __init__(self, *args: Any, carrot_options: Optional[LinkOptions] = None, **kwargs: Any) -> None:
        options = carrot_options or LinkOptions()
        self.carrot = ConnState(self, reply_timeout=options.reply_timeout, blocked_timeout=options.blocked_timeout)
        # py-amqp replaces 0 by its own maximum and then takes the broker's
        # values over ours; the negotiation in _on_tune needs what we asked for.
        self.carrot.requested = (int(kwargs.get("channel_max") or 0), int(kwargs.get("frame_max") or 0))
        kwargs.setdefault("frame_handler", tolerant_frame_handler)
        super().__init__(*args, **kwargs)
        if options.on_created is not None:
            options.on_created(self)

    def abort_handshake(self) -> None:
        """From another thread: end a handshake in progress now (stop() during an attempt).

        The handshake then fails with an ``OSError``; a TCP connect not yet
        answered still ends only with its own timeout.
        """
        transport = self._transport
        sock = getattr(transport, "sock", None)
        if sock is not None and not self.carrot.running:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except (OSError, ValueError):
                pass

    # -- the handshake ---------------------------------------------------------------------

    def connect(self, callback: Any = None) -> Any:
        """One handshake, bounded as a whole by ``connect_timeout``; then the wire takes over.

        Raises:
            RecoverableConnectionError: On a second call (only the supervisor
                makes connections; py-amqp would reconnect implicitly).
        """
        state = self.carrot
        if state.connected_once:
            raise RecoverableConnectionError("connection lost; carrot_kombu reconnects it")
        state.connected_once = True
        state.handshake_deadline = monotonic() + float(self.connect_timeout or 60.0)
        result = super().connect(callback)
        transport = self._transport
        leftover = bytes(getattr(transport, "_read_buffer", b"") or b"")
        state.take_over(transport.sock, leftover, self.frame_max, self.heartbeat or 0)
        return result

    def Transport(  # noqa: N802 - py-amqp's factory name
        self, host: str, connect_timeout: Any, ssl: Any = False,
        read_timeout: Any = None, write_timeout: Any = None, **kwargs: Any,
    ) -> Any:
        cls = _SSL if ssl else _TCP
        extra = {"ssl": ssl} if ssl else {}
        return cls(host, connect_timeout=connect_timeout, read_timeout=read_timeout,
                   write_timeout=write_timeout, **extra, **kwargs)

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """During the handshake: py-amqp's read, within the attempt's deadline.

        Afterwards: wait for (and run) queued user callbacks, like
        :meth:`ConnState.events` ``drain``.
        """
        state = self.carrot
        if state.running:
            state.events.drain(timeout)
            return
        remaining = state.handshake_deadline - monotonic()
        if remaining <= 0:
            raise socket.timeout("the AMQP handshake did not complete within connect_timeout")
        super().drain_events(remaining if timeout is None else min(timeout, remaining))

    def _on_tune(self, channel_max: int, frame_max: int, server_heartbeat: int, argsig: str = "BlB") -> None:
        """Negotiate the smaller of ours and the broker's (AMQP), not the broker's alone."""
        want_channels, want_frame = self.carrot.requested
        super()._on_tune(_smaller(want_channels, channel_max), _smaller(want_frame, frame_max), server_heartbeat, argsig)

    # -- channels ------------------------------------------------------------------------------

    def channel(self, channel_id: Any = None, callback: Any = None, deadline: Optional[float] = None) -> Any:
        """Open a channel (its reply bounded by ``reply_timeout``).

        Args:
            channel_id: py-amqp's: an open channel with this id is returned as it is.
            callback: py-amqp's: called with the channel once open.
            deadline: The caller's own limit (``time.monotonic()``, a lease's
                timeout): bounds the wait for open-ok, and for the broker's
                unblock before channel.open is written.  None: bounded by
                ``reply_timeout`` (and ``blocked_timeout``) alone.

        Raises:
            Disconnected: The connection is lost.
            ChannelLimitReached: Every channel id the broker allows is taken.
        """
        state = self.carrot
        state.check_alive()
        if self.channels is None:
            raise state.disconnected()
        with state.id_lock:
            existing = self.channels.get(channel_id) if channel_id is not None else None
            if existing is not None:
                return existing
            try:
                chan = self.Channel(self, channel_id, on_open=callback)
            except ResourceError:
                raise ChannelLimitReached(
                    f"all {self.channel_max} channels the broker allows on this connection are open "
                    f"(negotiated channel_max {self.channel_max})"
                ) from None
        try:
            chan.open(deadline)
        except BaseException as exc:
            cstate = chan.carrot
            if state.dead is not None or getattr(exc, "carrot_not_written", False):
                chan.collect()  # channel.open never left: the id is free again
            elif cstate.spoiled is not None:
                # Written, and its open-ok may still come (a wait cut short by
                # the caller's deadline or an interrupt): close right behind
                # the open, so the close-ok frees the id.
                try:
                    chan.close_nowait()
                except Exception:  # noqa: BLE001 - best effort; the id is freed with the connection otherwise
                    logger.debug("ignored error while closing an abandoned channel", exc_info=True)
            else:
                # Interrupted where we cannot tell whether channel.open was
                # queued: the id is neither reused (a second channel.open on
                # it is a connection error) nor closed (a close before the
                # open is one too).  A late open-ok closes it.
                cstate.spoil("its channel.open was interrupted")
                cstate.abandoned_open = True
            raise
        return chan

    def open_channels(self, count: int) -> list[Any]:
        """Open up to ``count`` channels in one round trip (all opens written, then all awaited).

        Fewer when the ids run out or some open fails (those are closed
        behind their open, like an abandoned one in :meth:`channel`).

        Raises:
            Disconnected: The connection is lost.
        """
        state = self.carrot
        state.check_alive()
        if self.channels is None:
            raise state.disconnected()
        pending: list[tuple[Any, Any]] = []
        for _ in range(count):
            with state.id_lock:
                try:
                    chan = self.Channel(self, None)
                except ResourceError:
                    break  # channel_max: the caller does the rest another way
            try:
                pending.append((chan, chan.open_begin()))
            except BaseException:
                chan.collect()  # channel.open never left: the id is free again
                if state.dead is not None:
                    raise state.disconnected() from None
                break
        opened = []
        for index, (chan, reply) in enumerate(pending):
            try:
                chan.open_end(reply)
            except BaseException as exc:
                if state.dead is not None:
                    raise state.disconnected() from None
                logger.debug("a pipelined channel.open failed: %r", exc)
                for late, _ in pending[index:]:
                    late.carrot.spoil("a pipelined channel.open failed")
                    try:
                        late.close_nowait()  # its close-ok frees the id
                    except Exception:  # noqa: BLE001 - freed with the connection otherwise
                        logger.debug("ignored error while closing an abandoned channel", exc_info=True)
                if not isinstance(exc, Exception):
                    raise
                break
            opened.append(chan)
        return opened

    def on_inbound_method(self, channel_id: int, method_sig: Any, payload: Any, content: Any) -> Any:
        channels = self.channels
        if channels is None:
            return None
        chan = channels.get(channel_id)
        if chan is None:
            # A late frame for a channel we already closed (a delivery after close-ok...).
            logger.debug("ignored %r for closed channel %s", method_sig, channel_id)
            return None
        if channel_id and not chan.is_open and method_sig not in _BEFORE_OPEN_OK and not chan.carrot.closing:
            # Its id was just reused: the broker sent this on the channel that
            # had it before (RabbitMQ delivers after its own channel.close),
            # ahead of the new channel's open-ok.  Dispatched here, a delivery
            # was settled with a tag the new channel never had: 406 closed it
            # with every consumer on it.
            logger.debug("ignored %r for channel %s before its open-ok (the id's previous channel's)",
                         method_sig, channel_id)
            return None
        return chan.dispatch_method(method_sig, payload, content)

    # -- channel 0, on the reading thread ------------------------------------------------------

    def dispatch_method(self, method_sig: Any, payload: Any, content: Any) -> None:
        state = self.carrot
        if not state.running:
            super().dispatch_method(method_sig, payload, content)
            return
        amqp_method = self._METHODS.get(method_sig)
        args: list[Any] = decode_args(amqp_method.args, payload) if amqp_method is not None and amqp_method.args else []
        if method_sig == spec.Connection.Close:
            self._closed_by_broker(*args)
        elif method_sig == spec.Connection.CloseOk:
            state.conn_reply(method_sig)
        elif method_sig == spec.Connection.Blocked:
            state.on_blocked(str(args[0]) if args and args[0] else "connection blocked, see broker logs")
        elif method_sig == spec.Connection.Unblocked:
            state.on_unblocked()
        else:
            logger.debug("ignored %r on channel 0", method_sig)

    def _closed_by_broker(self, reply_code: int, reply_text: str, class_id: int, method_id: int) -> None:
        """connection.close from the broker: answer and mark dead, in that order."""
        state = self.carrot
        error = error_for_code(reply_code, reply_text, (class_id, method_id), AMQPConnectionError)
        wire = state.wire
        if wire is not None and state.dead is None:
            try:
                wire.send_nowait([encode_method(0, spec.Connection.CloseOk, b"")])
            except OSError:
                pass
        state.fail(error)

    # -- closing ----------------------------------------------------------------------------------

    def close(self, reply_code: int = 0, reply_text: str = "", method_sig: Any = (0, 0), argsig: str = "BsBB",
              timeout: Optional[float] = None) -> None:
        """Close politely within ``timeout`` (default ``reply_timeout``), then drop the socket."""
        state = self.carrot
        if not state.running:
            super().close(reply_code, reply_text, method_sig, argsig)
            return
        closed = Disconnected("connection closed")
        # Before connection.close is written: the broker's end of stream after
        # its close-ok may reach fail() (on the reading thread) before this
        # thread gets there, and must be reported as this close, not as a loss.
        state.begin_close(closed)
        if state.dead is None:
            reply = state.expect_conn_reply(spec.Connection.CloseOk)
            frame = encode_method(0, spec.Connection.Close, encode_args(
                spec.Connection.Close, argsig, (reply_code, reply_text, method_sig[0], method_sig[1])))
            try:
                # Never wait for room in the buffer: timeout bounds the whole close.
                state.wire.send_nowait([frame])  # type: ignore[union-attr]
                state.await_reply(reply, timeout, "Connection.Close")
            except Exception as exc:
                logger.debug("no close-ok from the broker: %r", exc)
        state.fail(closed)

    def collect(self) -> None:
        """Drop every channel without I/O (py-amqp's would shut the socket down through TLS)."""
        state = self.carrot
        transport = self._transport
        if not state.running and transport is not None and transport.sock is not None:
            # A failed handshake: nobody else will close this socket.
            try:
                socket.socket.close(transport.sock)
            except OSError:
                pass
        if state.dead is None:
            state.fail(Disconnected("connection collected"))
        with state.id_lock:
            channels = [ch for ch in (self.channels or {}).values() if ch is not self]
        for chan in channels:
            chan.carrot.mark_closed()
            chan.carrot.fail_all(state.disconnected())
        transport = self._transport
        if transport is not None:
            transport.connected = False

    @property
    def connected(self) -> bool:
        state = self.carrot
        return bool(state.running and state.dead is None)


def _smaller(ours: int, theirs: int) -> int:
    """AMQP tuning: 0 means "no limit"; otherwise the smaller value wins."""
    if not ours:
        return theirs
    if not theirs:
        return ours
    return min(ours, theirs)


class _Bounded:
    """The TLS handshake and the protocol header are bounded by ``connect_timeout`` too."""

    sock: Any
    connect_timeout: Any

    def _setup_transport(self) -> None:
        if self.sock is not None and self.connect_timeout:
            self.sock.settimeout(self.connect_timeout)
        super()._setup_transport()  # type: ignore[misc]
        if self.sock is not None and self.connect_timeout:
            self.sock.settimeout(self.connect_timeout)


class _TCP(_Bounded, TCPTransport):  # type: ignore[misc]
    pass


class _SSL(_Bounded, SSLTransport):  # type: ignore[misc]
    pass


class SupervisedTransport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport, with :class:`SupervisedConnection`."""

    Connection = SupervisedConnection
