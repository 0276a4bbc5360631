"""A scripted fake AMQP 0-9-1 broker (the server peer) for unit tests.

It speaks the wire protocol, so py-amqp's real code (frame reader, dispatch,
blocked and heartbeat handling, TLS) runs against it exactly as against
RabbitMQ, while the test decides what the broker says and when::

    with FakeBroker(frame_max=8192, heartbeat=10) as broker:
        conn = amqp.Connection(host=f"127.0.0.1:{broker.port}", heartbeat=5)
        conn.connect()
        peer = broker.accept()
        assert peer.tune_ok == (2047, 8192, 5)
        ch = conn.channel()
        ch.basic_publish(amqp.Message(b"hi"), routing_key="q")
        peer.wait_for(lambda: peer.published)
        peer.close_channel(ch.channel_id, 404, "NOT_FOUND - no queue 'q'", 50, 10)

Each accepted connection is a :class:`Peer`.  One thread per peer owns its
socket: it reads and parses frames, answers what the automatic mode answers,
sends heartbeats and writes everything the test queues.  Test-side calls only
queue bytes and wait (bounded) for them to reach the socket, so nothing here
can deadlock against a client that is not reading; every wait takes a timeout
and raises :class:`WaitTimeout` (a ``TimeoutError``) instead of hanging.

TLS goes through :class:`ssl.SSLObject` over memory BIOs, so the peer controls
the ciphertext: :meth:`Peer.send_partial_frame` can leave the client holding
half a TLS record.

Encoding and decoding use py-amqp's own pieces: ``amqp.spec`` for method ids,
``amqp.serialization.dumps``/``loads`` for arguments, and
``amqp.basic_message.Message`` for content-header properties.
"""

from __future__ import annotations

import heapq
import itertools
import os
import secrets
import select
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Union

from amqp import spec
from amqp.basic_message import Message
from amqp.serialization import dumps, loads

__all__ = (
    "FakeBroker",
    "FakeBrokerError",
    "Method",
    "MethodSpec",
    "PeerClosed",
    "Peer",
    "PeerOptions",
    "Published",
    "WaitTimeout",
    "encode_frames",
    "method_spec",
)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"
DEFAULT_TIMEOUT = 5.0
_TLS_RECORD_MAX = 16384
_TICK = 0.2  # longest sleep of a peer's loop when nothing is due

#: Handshake steps at which ``PeerOptions.silent_at`` makes the broker go quiet:
#: it never sends the named thing (nor anything after it) but keeps reading.
SILENT_STEPS = ("tls", "start", "tune", "open-ok")

DEFAULT_SERVER_PROPERTIES: Mapping[str, Any] = {
    "product": "RabbitMQ",
    "version": "3.10.8",
    "platform": "Erlang/OTP 25.0",
    "copyright": "Copyright (c) 2007-2022 VMware, Inc. or its affiliates.",
    "information": "carrot_kombu tests/fakebroker.py",
    "cluster_name": "rabbit@fakebroker",
    "capabilities": {
        "publisher_confirms": True,
        "exchange_exchange_bindings": True,
        "basic.nack": True,
        "consumer_cancel_notify": True,
        "connection.blocked": True,
        "consumer_priorities": True,
        "authentication_failure_close": True,
        "per_consumer_qos": True,
        "direct_reply_to": True,
    },
}


# -- errors ---------------------------------------------------------------------


class FakeBrokerError(Exception):
    """Root of the fake broker's errors (misuse, or a bug in the fake itself)."""


class WaitTimeout(FakeBrokerError, TimeoutError):
    """A wait on the broker or a peer ran out of time."""


class PeerClosed(FakeBrokerError, ConnectionError):
    """The peer's connection is closed: nothing more arrives or can be sent."""


# -- the method table -------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One AMQP method: its id, its name, its argument format and field names."""

    sig: tuple[int, int]
    name: str  # e.g. "basic.consume-ok"
    argsig: str  # py-amqp serialization format
    fields: tuple[str, ...]
    content: bool = False

    def encode_args(self, args: tuple[Any, ...], fields: Mapping[str, Any]) -> bytes:
        """Serialize positional then named arguments; missing trailing ones default to zero."""
        if len(args) > len(self.argsig):
            raise TypeError(f"{self.name} takes {len(self.argsig)} arguments, got {len(args)}")
        values = list(args) + [_ZERO[c] for c in self.argsig[len(args):]]
        for name, value in fields.items():
            try:
                values[self.fields.index(name)] = value
            except ValueError:
                raise TypeError(f"{self.name} has no field {name!r} (fields: {self.fields})") from None
        return struct.pack(">HH", *self.sig) + (dumps(self.argsig, values) if self.argsig else b"")


_ZERO: Mapping[str, Any] = {"b": False, "o": 0, "B": 0, "l": 0, "L": 0, "s": "", "S": "", "F": {}, "A": []}


def _m(sig: tuple[int, int], name: str, argsig: str = "", fields: str = "", content: bool = False) -> MethodSpec:
    names = tuple(fields.split())
    assert len(names) == len(argsig), name
    return MethodSpec(sig, name, argsig, names, content)


C, Ch, E, Q, B = spec.Connection, spec.Channel, spec.Exchange, spec.Queue, spec.Basic
METHODS: tuple[MethodSpec, ...] = (
    _m(C.Start, "connection.start", "ooFSS",
       "version_major version_minor server_properties mechanisms locales"),
    _m(C.StartOk, "connection.start-ok", "FsSs", "client_properties mechanism response locale"),
    _m(C.Secure, "connection.secure", "S", "challenge"),
    _m(C.SecureOk, "connection.secure-ok", "S", "response"),
    _m(C.Tune, "connection.tune", "BlB", "channel_max frame_max heartbeat"),
    _m(C.TuneOk, "connection.tune-ok", "BlB", "channel_max frame_max heartbeat"),
    _m(C.Open, "connection.open", "ssb", "virtual_host capabilities insist"),
    _m(C.OpenOk, "connection.open-ok", "s", "known_hosts"),
    _m(C.Close, "connection.close", "BsBB", "reply_code reply_text class_id method_id"),
    _m(C.CloseOk, "connection.close-ok"),
    _m(C.Blocked, "connection.blocked", "s", "reason"),
    _m(C.Unblocked, "connection.unblocked"),
    _m(Ch.Open, "channel.open", "s", "out_of_band"),
    _m(Ch.OpenOk, "channel.open-ok", "S", "channel_id"),
    _m(Ch.Flow, "channel.flow", "b", "active"),
    _m(Ch.FlowOk, "channel.flow-ok", "b", "active"),
    _m(Ch.Close, "channel.close", "BsBB", "reply_code reply_text class_id method_id"),
    _m(Ch.CloseOk, "channel.close-ok"),
    _m(E.Declare, "exchange.declare", "BssbbbbbF",
       "ticket exchange type passive durable auto_delete internal nowait arguments"),
    _m(E.DeclareOk, "exchange.declare-ok"),
    _m(E.Delete, "exchange.delete", "Bsbb", "ticket exchange if_unused nowait"),
    _m(E.DeleteOk, "exchange.delete-ok"),
    _m(E.Bind, "exchange.bind", "BsssbF", "ticket destination source routing_key nowait arguments"),
    _m(E.BindOk, "exchange.bind-ok"),
    _m(E.Unbind, "exchange.unbind", "BsssbF", "ticket destination source routing_key nowait arguments"),
    _m(E.UnbindOk, "exchange.unbind-ok"),
    _m(Q.Declare, "queue.declare", "BsbbbbbF",
       "ticket queue passive durable exclusive auto_delete nowait arguments"),
    _m(Q.DeclareOk, "queue.declare-ok", "sll", "queue message_count consumer_count"),
    _m(Q.Bind, "queue.bind", "BsssbF", "ticket queue exchange routing_key nowait arguments"),
    _m(Q.BindOk, "queue.bind-ok"),
    _m(Q.Purge, "queue.purge", "Bsb", "ticket queue nowait"),
    _m(Q.PurgeOk, "queue.purge-ok", "l", "message_count"),
    _m(Q.Delete, "queue.delete", "Bsbbb", "ticket queue if_unused if_empty nowait"),
    _m(Q.DeleteOk, "queue.delete-ok", "l", "message_count"),
    _m(Q.Unbind, "queue.unbind", "BsssF", "ticket queue exchange routing_key arguments"),
    _m(Q.UnbindOk, "queue.unbind-ok"),
    _m(B.Qos, "basic.qos", "lBb", "prefetch_size prefetch_count a_global"),
    _m(B.QosOk, "basic.qos-ok"),
    _m(B.Consume, "basic.consume", "BssbbbbF",
       "ticket queue consumer_tag no_local no_ack exclusive nowait arguments"),
    _m(B.ConsumeOk, "basic.consume-ok", "s", "consumer_tag"),
    _m(B.Cancel, "basic.cancel", "sb", "consumer_tag nowait"),
    _m(B.CancelOk, "basic.cancel-ok", "s", "consumer_tag"),
    _m(B.Publish, "basic.publish", "Bssbb", "ticket exchange routing_key mandatory immediate", content=True),
    _m(B.Return, "basic.return", "Bsss", "reply_code reply_text exchange routing_key", content=True),
    _m(B.Deliver, "basic.deliver", "sLbss",
       "consumer_tag delivery_tag redelivered exchange routing_key", content=True),
    _m(B.Get, "basic.get", "Bsb", "ticket queue no_ack"),
    _m(B.GetOk, "basic.get-ok", "Lbssl",
       "delivery_tag redelivered exchange routing_key message_count", content=True),
    _m(B.GetEmpty, "basic.get-empty", "s", "cluster_id"),
    _m(B.Ack, "basic.ack", "Lb", "delivery_tag multiple"),
    _m(B.Reject, "basic.reject", "Lb", "delivery_tag requeue"),
    _m(B.RecoverAsync, "basic.recover-async", "b", "requeue"),
    _m(B.Recover, "basic.recover", "b", "requeue"),
    _m(B.RecoverOk, "basic.recover-ok"),
    _m(B.Nack, "basic.nack", "Lbb", "delivery_tag multiple requeue"),
    _m(spec.Confirm.Select, "confirm.select", "b", "nowait"),
    _m(spec.Confirm.SelectOk, "confirm.select-ok"),
    _m(spec.Tx.Select, "tx.select"),
    _m(spec.Tx.SelectOk, "tx.select-ok"),
    _m(spec.Tx.Commit, "tx.commit"),
    _m(spec.Tx.CommitOk, "tx.commit-ok"),
    _m(spec.Tx.Rollback, "tx.rollback"),
    _m(spec.Tx.RollbackOk, "tx.rollback-ok"),
)
del C, Ch, E, Q, B


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


_BY_SIG: Mapping[tuple[int, int], MethodSpec] = {m.sig: m for m in METHODS}
_BY_KEY: Mapping[str, MethodSpec] = {_key(m.name): m for m in METHODS}

MethodRef = Union[str, tuple[int, int], MethodSpec]


def method_spec(method: MethodRef) -> MethodSpec:
    """Look a method up by ``(class_id, method_id)`` or by name.

    Names are forgiving: ``"basic.consume-ok"``, ``"basic.consume_ok"`` and
    ``"Basic.ConsumeOk"`` are the same method.
    """
    if isinstance(method, MethodSpec):
        return method
    try:
        if isinstance(method, tuple):
            return _BY_SIG[(int(method[0]), int(method[1]))]
        return _BY_KEY[_key(method)]
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"unknown AMQP method {method!r}") from None


def _frame(type_: int, channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", type_, channel, len(payload)) + payload + b"\xce"


def encode_frames(
    channel: int,
    method: MethodRef,
    *args: Any,
    body: Union[bytes, str, None] = None,
    properties: Optional[Mapping[str, Any]] = None,
    frame_limit: int = 131072,
    **fields: Any,
) -> bytes:
    """The wire bytes of one method, plus its content header and body frames.

    Content methods (publish, deliver, return, get-ok) always carry content;
    the body is split into frames of at most ``frame_limit`` bytes each
    (the negotiated frame_max).
    """
    mspec = method_spec(method)
    out = [_frame(FRAME_METHOD, channel, mspec.encode_args(args, fields))]
    if mspec.content or body is not None:
        data = body.encode("utf-8") if isinstance(body, str) else bytes(body or b"")
        props = Message(**dict(properties or {}))._serialize_properties()
        out.append(_frame(FRAME_HEADER, channel, struct.pack(">HHQ", mspec.sig[0], 0, len(data)) + props))
        chunk = frame_limit - 8 if frame_limit > 8 else max(len(data), 1)
        for i in range(0, len(data), chunk):
            out.append(_frame(FRAME_BODY, channel, data[i:i + chunk]))
    return b"".join(out)


# -- what the peer records ----------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A method the client sent, decoded.  ``m["routing_key"]`` or ``m.args[2]``."""

    channel: int
    spec: MethodSpec
    args: tuple[Any, ...]
    properties: Optional[dict[str, Any]] = None  # content methods only
    body: Optional[bytes] = None  # content methods only
    received_at: float = field(default_factory=time.monotonic)

    @property
    def sig(self) -> tuple[int, int]:
        return self.spec.sig

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def fields(self) -> dict[str, Any]:
        return dict(zip(self.spec.fields, self.args))

    @property
    def content(self) -> Optional[Message]:
        """The content as a py-amqp ``Message`` (body and properties); None without content."""
        if self.body is None:
            return None
        return Message(self.body, **(self.properties or {}))

    def __getitem__(self, key: Union[int, str]) -> Any:
        if isinstance(key, int):
            return self.args[key]
        return self.fields[key]

    def __repr__(self) -> str:
        content = "" if self.body is None else f" +{len(self.body)}B"
        return f"<Method ch={self.channel} {self.name} {self.fields!r}{content}>"


@dataclass(frozen=True)
class Published:
    """One basic.publish as the broker received it."""

    channel: int
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any]
    mandatory: bool = False
    immediate: bool = False
    delivery_tag: Optional[int] = None  # the confirm sequence number; None outside confirm mode
    received_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PeerOptions:
    """How a peer behaves; a value, so ``dataclasses.replace`` makes variants.

    Attributes:
        channel_max, frame_max, heartbeat: what connection.tune proposes.
        server_properties: merged over :data:`DEFAULT_SERVER_PROPERTIES`.
        mechanisms, locales: connection.start's lists.
        refuse_login: answer start-ok with connection.close 403 ACCESS_REFUSED.
        silent_at: one of :data:`SILENT_STEPS`; the broker goes silent instead
            of sending that step (and everything after it) but keeps reading.
        auto: answer channel-level methods automatically (connection-level
            methods are always answered unless named in ``manual``).
        manual: method names never answered automatically (the test answers).
        confirm: "ack", "nack", or None (withhold) for publishes on channels
            in confirm mode; ``confirm_delay`` seconds later; one ``multiple``
            ack per ``confirm_batch`` publishes.
        send_heartbeats: send heartbeat frames every ``heartbeat_interval``
            seconds (default: the interval the client chose in tune-ok).
        strict: answer protocol misuse (method on a channel that is not open,
            second channel.open, unknown method) with connection.close, the
            way RabbitMQ does.  Framing errors are always fatal.
    """

    channel_max: int = 2047
    frame_max: int = 131072
    heartbeat: int = 60
    server_properties: Mapping[str, Any] = field(default_factory=dict)
    mechanisms: str = "PLAIN AMQPLAIN"
    locales: str = "en_US"
    refuse_login: bool = False
    silent_at: Optional[str] = None
    auto: bool = True
    manual: frozenset[str] = frozenset()
    confirm: Optional[str] = "ack"
    confirm_delay: float = 0.0
    confirm_batch: int = 1
    send_heartbeats: bool = True
    heartbeat_interval: Optional[float] = None
    strict: bool = True

    def __post_init__(self) -> None:
        if self.silent_at is not None and self.silent_at not in SILENT_STEPS:
            raise ValueError(f"silent_at must be one of {SILENT_STEPS}, not {self.silent_at!r}")
        if self.confirm not in ("ack", "nack", None):
            raise ValueError(f"confirm must be 'ack', 'nack' or None, not {self.confirm!r}")
        if self.confirm_batch < 1 or self.confirm_delay < 0:
            raise ValueError("confirm_batch must be >= 1 and confirm_delay >= 0")
        manual: Any = self.manual  # any iterable of names is accepted
        if isinstance(manual, str):
            manual = (manual,)
        object.__setattr__(self, "manual", frozenset(method_spec(m).name for m in manual))

    def answers(self, mspec: MethodSpec) -> bool:
        """Whether the automatic mode answers this method."""
        if mspec.name in self.manual:
            return False
        return self.auto or mspec.sig[0] == spec.Connection.CLASS_ID


# -- the transport layers -------------------------------------------------------------


class _Plain:
    """No TLS: plaintext is the wire."""

    def receive(self, raw: bytes) -> tuple[bytes, bool]:
        return raw, False

    def encrypt(self, data: bytes) -> bytes:
        return data

    def encrypt_partial(self, data: bytes, keep: int) -> bytes:
        return data[:keep]

    def pending_output(self) -> bytes:
        return b""


class _TLS:
    """Server-side TLS over memory BIOs: the peer sees and controls the ciphertext."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.handshaken = False

    def receive(self, raw: bytes) -> tuple[bytes, bool]:
        """Feed ciphertext; return (plaintext, eof).  Raises ssl.SSLError on a failed handshake."""
        self._incoming.write(raw)
        if not self.handshaken:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b"", False
            self.handshaken = True
        chunks: list[bytes] = []
        while True:
            try:
                data = self._obj.read(65536)
            except ssl.SSLWantReadError:
                return b"".join(chunks), False
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b"".join(chunks), True
            if not data:
                return b"".join(chunks), True
            chunks.append(data)

    def pending_output(self) -> bytes:
        return self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        view = memoryview(data)
        while view:
            view = view[self._obj.write(view):]
        return self._outgoing.read()

    def encrypt_partial(self, data: bytes, keep: int) -> bytes:
        """All plaintext up to ``keep``, then the first half of the next TLS record."""
        head = self.encrypt(data[:keep])
        tail = self.encrypt(data[keep:keep + _TLS_RECORD_MAX])
        start = 0  # find the last record in ``tail`` (normally the only one)
        while True:
            length = int.from_bytes(tail[start + 3:start + 5], "big")
            if start + 5 + length >= len(tail):
                break
            start += 5 + length
        return head + tail[:start + (5 + length) // 2]


# -- one client connection -------------------------------------------------------------


class _Channel:
    __slots__ = ("id", "closing", "confirm", "seq", "pending", "scheduled", "consumers")

    def __init__(self, channel_id: int) -> None:
        self.id = channel_id
        self.closing: Optional[str] = None  # "client" or "server" once a close is under way
        self.confirm = False
        self.seq = 0  # confirm-mode publish counter
        self.pending: list[int] = []  # publishes not yet confirmed
        self.scheduled = 0  # highest tag already handed to a (delayed) confirm
        self.consumers: list[str] = []


class _Content:
    __slots__ = ("spec", "args", "properties", "size", "chunks", "received")

    def __init__(self, mspec: MethodSpec, args: tuple[Any, ...]) -> None:
        self.spec, self.args = mspec, args
        self.properties: dict[str, Any] = {}
        self.size: Optional[int] = None
        self.chunks: list[bytes] = []
        self.received = 0


class _ProtocolError(Exception):
    """The client broke the protocol; the peer closes the connection with this code."""

    def __init__(self, code: int, text: str, sig: tuple[int, int] = (0, 0)) -> None:
        super().__init__(code, text)
        self.code, self.text, self.sig = code, text, sig


Handler = Callable[["Peer", Method], None]


class Peer:
    """The broker's side of one client connection, driven by the test.

    Created by :class:`FakeBroker`; do not construct directly.  Attributes read
    by tests (``methods``, ``published``, ``tune_ok``...) are snapshots taken
    under the peer's lock.
    """

    def __init__(
        self,
        sock: socket.socket,
        options: PeerOptions,
        *,
        number: int,
        tls_context: Optional[ssl.SSLContext] = None,
        via: str = "tcp",
    ) -> None:
        self.number = number
        self.via = via
        self.tls = tls_context is not None
        self._options = options
        self._sock = sock
        sock.setblocking(False)
        try:
            # Answers go out at once, as RabbitMQ's do (it sets nodelay): without
            # it Nagle holds a small answer until the client's delayed ACK (40 ms).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # an AF_UNIX socketpair
        try:
            name = sock.getpeername()
        except OSError:
            name = None
        self.address = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else via
        self._layer: Union[_Plain, _TLS] = _TLS(tls_context) if tls_context else _Plain()
        self._cond = threading.Condition(threading.RLock())
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"fakebroker-peer-{number}", daemon=True)

        # connection state (under _cond)
        self._state = "handshake"  # -> open -> closing -> closed
        self._closed = False
        self._close_reason: Optional[str] = None
        self._close_after_flush: Optional[str] = None  # close reason once the outbox drains
        self._drop_request: Optional[bool] = None  # rst?
        self._stop_request = False
        self._silenced = options.silent_at == "tls"
        self._reading = True
        self._cut = False  # a partial frame went out: the stream cannot continue
        self._handlers: dict[tuple[int, int], Optional[Handler]] = {}
        self._auto: dict[tuple[int, int], bool] = {}
        self._channels: dict[int, _Channel] = {}
        self._delivery_tags: dict[int, int] = {}
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._next_heartbeat: Optional[float] = None
        self._heartbeats_on = options.send_heartbeats

        # output (under _cond): ciphertext chunks waiting for the socket
        self._outbox: deque[memoryview] = deque()
        self._queued = 0
        self._flushed = 0

        # input (reader thread only)
        self._inbuf = bytearray()
        self._header_seen = False
        self._content: dict[int, _Content] = {}
        self._discard_input = False

        # records (under _cond)
        self._methods: list[Method] = []
        self._unclaimed: deque[Method] = deque()
        self._published: list[Published] = []
        self._heartbeats: list[float] = []
        self._heartbeats_sent: list[float] = []
        self._protocol_errors: list[tuple[int, str]] = []
        self.start_ok: Optional[tuple[Any, ...]] = None  # (client_properties, mechanism, response, locale)
        self.login: Optional[tuple[str, str, str]] = None  # (mechanism, username, password)
        self.tune_ok: Optional[tuple[int, int, int]] = None  # the client's (channel_max, frame_max, heartbeat)
        self.virtual_host: Optional[str] = None
        self.close_received: Optional[tuple[int, str]] = None  # client's connection.close (code, text)
        self.bad_header: Optional[bytes] = None
        self.tls_error: Optional[BaseException] = None
        self.error: Optional[BaseException] = None  # a bug in the fake (or in a handler)
        self.bytes_received = 0  # plaintext AMQP bytes
        self.bytes_sent = 0  # wire bytes

    def start(self) -> "Peer":
        self._thread.start()
        return self

    # -- introspection -------------------------------------------------------

    def __repr__(self) -> str:
        with self._cond:
            flags = [self._state, "tls" if self.tls else self.via]
            if self._silenced:
                flags.append("silenced")
            if not self._reading:
                flags.append("not-reading")
            if self._close_reason:
                flags.append(f"closed:{self._close_reason}")
            return (
                f"<Peer #{self.number} {' '.join(flags)} {self.address} "
                f"channels={sorted(self._channels)} received={len(self._methods)} "
                f"published={len(self._published)} heartbeats={len(self._heartbeats)}>"
            )

    @property
    def options(self) -> PeerOptions:
        return self._options

    @property
    def state(self) -> str:
        """"handshake", "open", "closing" (a connection.close is under way) or "closed"."""
        with self._cond:
            return self._state

    @property
    def is_open(self) -> bool:
        return self.state == "open"

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def close_reason(self) -> Optional[str]:
        """Why the socket closed: "closed" (close handshake), "eof", "reset", "dropped",
        "stopped", "protocol-error", "bad-header", "tls-error" or "error"."""
        with self._cond:
            return self._close_reason

    @property
    def methods(self) -> list[Method]:
        """Every method received, in order (handshake included)."""
        with self._cond:
            return list(self._methods)

    @property
    def published(self) -> list[Published]:
        with self._cond:
            return list(self._published)

    @property
    def heartbeats(self) -> list[float]:
        """``time.monotonic()`` of every heartbeat frame received from the client."""
        with self._cond:
            return list(self._heartbeats)

    @property
    def heartbeats_sent(self) -> list[float]:
        with self._cond:
            return list(self._heartbeats_sent)

    @property
    def protocol_errors(self) -> list[tuple[int, str]]:
        """Connection errors the peer raised against the client: (code, text)."""
        with self._cond:
            return list(self._protocol_errors)

    @property
    def channels(self) -> list[int]:
        """Ids of channels open (or closing) right now."""
        with self._cond:
            return sorted(self._channels)

    @property
    def frame_max(self) -> int:
        """The negotiated frame_max (the client's tune-ok value, else what we proposed)."""
        with self._cond:
            return (self.tune_ok[1] if self.tune_ok else 0) or self._options.frame_max

    @property
    def heartbeat(self) -> int:
        """The negotiated heartbeat (0 until tune-ok)."""
        with self._cond:
            return self.tune_ok[2] if self.tune_ok else 0

    def received(self, method: Optional[MethodRef] = None, channel: Optional[int] = None) -> list[Method]:
        """The methods received so far, filtered by method and/or channel."""
        sig = method_spec(method).sig if method is not None else None
        return [m for m in self.methods
                if (sig is None or m.sig == sig) and (channel is None or m.channel == channel)]

    def consumers(self, channel: int) -> list[str]:
        with self._cond:
            ch = self._channels.get(channel)
            return list(ch.consumers) if ch else []

    def pending_confirms(self, channel: int) -> list[int]:
        """Delivery tags of confirm-mode publishes not yet acked/nacked."""
        with self._cond:
            ch = self._channels.get(channel)
            return list(ch.pending) if ch else []

    # -- waiting ---------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = DEFAULT_TIMEOUT, what: str = "") -> Any:
        """Wait until ``predicate()`` is truthy (checked on every change) and return its value."""
        if self._in_loop():
            raise FakeBrokerError("a handler cannot wait on its own peer")
        with self._cond:
            value = self._cond.wait_for(predicate, timeout)
            if not value:
                raise WaitTimeout(f"{what or predicate!r} not true within {timeout}s: {self!r}")
            return value

    def wait_open(self, timeout: float = DEFAULT_TIMEOUT) -> "Peer":
        """Wait until the handshake completed (open-ok sent)."""
        self.wait_for(lambda: self._state != "handshake", timeout, "handshake")
        with self._cond:
            if self._state != "open":
                raise PeerClosed(f"the handshake did not complete: {self!r}")
        return self

    def wait_flushed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until every byte queued so far has been written to the socket."""
        with self._cond:
            end = self._queued
        self._wait_flushed(end, timeout)

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """Wait until the socket is closed; return the close reason."""
        self.wait_for(lambda: self._closed, timeout, "socket closed")
        assert self._close_reason is not None
        return self._close_reason

    def expect(
        self, method: Optional[MethodRef] = None, timeout: float = DEFAULT_TIMEOUT, *, channel: Optional[int] = None,
    ) -> Method:
        """The next not-yet-expected method matching ``method`` (any if None) and ``channel``.

        Methods are queued as they arrive; each is returned by at most one
        ``expect``, so methods can be expected out of order without loss.
        Raises :class:`WaitTimeout`, or :class:`PeerClosed` once the
        connection is gone and no match is queued.
        """
        sig = method_spec(method).sig if method is not None else None

        def find() -> Optional[Method]:
            for m in self._unclaimed:
                if (sig is None or m.sig == sig) and (channel is None or m.channel == channel):
                    return m
            return None

        if self._in_loop():
            raise FakeBrokerError("a handler cannot wait on its own peer")
        with self._cond:
            self._cond.wait_for(lambda: find() is not None or self._closed, timeout)
            found = find()
            if found is not None:
                self._unclaimed.remove(found)
                return found
            queued = [m.name for m in self._unclaimed]
            what = method_spec(method).name if method is not None else "any method"
            where = f" on channel {channel}" if channel is not None else ""
            if self._closed:
                raise PeerClosed(f"{what}{where} never came, connection closed; queued: {queued}; {self!r}")
            raise WaitTimeout(f"{what}{where} not received within {timeout}s; queued: {queued}; {self!r}")

    # -- configuration ------------------------------------------------------------

    def set_auto(self, method: MethodRef, enabled: bool) -> None:
        """Turn the automatic answer to one method on or off."""
        with self._cond:
            self._auto[method_spec(method).sig] = enabled

    def on(self, method: MethodRef, handler: Optional[Handler]) -> None:
        """Call ``handler(peer, method)`` on the peer's thread instead of the automatic answer.

        State tracking (channels, confirm counters, published) still happens.
        The handler must not wait on the peer (it runs on the thread that reads).
        ``None`` removes the handler.
        """
        with self._cond:
            sig = method_spec(method).sig
            if handler is None:
                self._handlers.pop(sig, None)
            else:
                self._handlers[sig] = handler

    def set_confirms(self, reply: Optional[str] = "ack", *, delay: float = 0.0, batch: int = 1) -> None:
        """How publishes on confirm channels are answered from now on.

        ``reply`` is "ack", "nack" or None (withhold: see :meth:`confirm`);
        answers go ``delay`` seconds after the publish, one ``multiple=True``
        answer per ``batch`` publishes.
        """
        with self._cond:
            self._options = replace(self._options, confirm=reply, confirm_delay=delay, confirm_batch=batch)

    def set_heartbeats(self, enabled: bool) -> None:
        with self._cond:
            self._heartbeats_on = enabled
        self._wake()

    def silence(self) -> None:
        """Send nothing more on our own (answers, confirms, heartbeats); keep reading.

        Explicit sends by the test still go out.
        """
        with self._cond:
            self._silenced = True
            self._cond.notify_all()

    def resume(self) -> None:
        """Undo :meth:`silence` (withheld confirms stay pending: see :meth:`release_confirms`)."""
        with self._cond:
            self._silenced = False
            if self._next_heartbeat is not None:
                self._next_heartbeat = time.monotonic() + self._heartbeat_interval()
        self._wake()

    def stop_reading(self) -> None:
        """Stop reading the socket: the client's writes stall once the buffers fill."""
        with self._cond:
            self._reading = False
        self._wake()

    def resume_reading(self) -> None:
        with self._cond:
            self._reading = True
        self._wake()

    # -- sending ---------------------------------------------------------------------

    def send_method(
        self,
        channel: int,
        method: MethodRef,
        *args: Any,
        body: Union[bytes, str, None] = None,
        properties: Optional[Mapping[str, Any]] = None,
        wait: Optional[float] = DEFAULT_TIMEOUT,
        **fields: Any,
    ) -> None:
        """Send one method (with content for content methods).

        Arguments are positional in spec order and/or by field name; missing
        trailing ones are zero.  ``wait`` bounds the wait for the bytes to
        reach the socket (None: return at once).
        """
        self._send_method(channel, method_spec(method), args, fields, body, properties, auto=False, wait=wait)

    def deliver(
        self,
        channel: int,
        consumer_tag: str,
        delivery_tag: Optional[int] = None,
        body: Union[bytes, str] = b"",
        properties: Optional[Mapping[str, Any]] = None,
        exchange: str = "",
        routing_key: str = "",
        *,
        redelivered: bool = False,
        wait: Optional[float] = DEFAULT_TIMEOUT,
    ) -> int:
        """basic.deliver with content split per the negotiated frame_max; returns the delivery tag.

        The tag defaults to the channel's next one (one more than the last delivered).
        """
        with self._cond:
            if delivery_tag is None:
                delivery_tag = self._delivery_tags.get(channel, 0) + 1
            self.send_method(
                channel, "basic.deliver", consumer_tag, delivery_tag, redelivered, exchange, routing_key,
                body=body, properties=properties, wait=None,
            )
            end = self._queued
        self._wait_flushed(end, wait)
        return delivery_tag

    def close_channel(
        self, channel: int, code: int, text: str, class_id: int = 0, method_id: int = 0,
        *, wait: Optional[float] = DEFAULT_TIMEOUT,
    ) -> None:
        """A broker-initiated channel.close; the channel ignores all but close/close-ok until close-ok."""
        self.send_method(channel, "channel.close", code, text, class_id, method_id, wait=wait)

    def close_connection(
        self, code: int = 320, text: str = "CONNECTION_FORCED - broker forced connection closure",
        class_id: int = 0, method_id: int = 0, *, wait: Optional[float] = DEFAULT_TIMEOUT,
    ) -> None:
        """A broker-initiated connection.close; the socket closes when close-ok arrives."""
        self.send_method(0, "connection.close", code, text, class_id, method_id, wait=wait)

    def block(self, reason: str = "low on memory", *, wait: Optional[float] = DEFAULT_TIMEOUT) -> None:
        self.send_method(0, "connection.blocked", reason, wait=wait)

    def unblock(self, *, wait: Optional[float] = DEFAULT_TIMEOUT) -> None:
        self.send_method(0, "connection.unblocked", wait=wait)

    def send_heartbeat(self, *, wait: Optional[float] = DEFAULT_TIMEOUT) -> None:
        self._enqueue(HEARTBEAT_FRAME, auto=False, wait=wait)
        with self._cond:
            self._heartbeats_sent.append(time.monotonic())
            self._cond.notify_all()

    def send_raw(self, data: bytes, *, wait: Optional[float] = DEFAULT_TIMEOUT) -> None:
        """Send bytes into the AMQP stream as they are (through TLS when TLS is on)."""
        self._enqueue(bytes(data), auto=False, wait=wait)

    def send_partial_frame(
        self,
        channel: int,
        method: MethodRef,
        *args: Any,
        body: Union[bytes, str, None] = None,
        properties: Optional[Mapping[str, Any]] = None,
        keep: Optional[int] = None,
        wait: Optional[float] = DEFAULT_TIMEOUT,
        **fields: Any,
    ) -> int:
        """Send only the first ``keep`` bytes (default: half) of a method's frames, then nothing.

        On TLS the client also gets the first half of the TLS record that holds
        the next bytes, so it is left with half a record.  The peer then
        falls silent for good (the stream cannot be continued).  Returns ``keep``.
        """
        data = encode_frames(channel, method, *args, body=body, properties=properties,
                             frame_limit=self.frame_max, **fields)
        keep = len(data) // 2 if keep is None else keep
        if not 0 < keep < len(data):
            raise ValueError(f"keep must be within 1..{len(data) - 1}")
        with self._cond:
            self._check_writable()
            end = self._queue_raw(self._layer.encrypt_partial(data, keep))
            self._cut = self._silenced = True
        self._wait_flushed(end, wait)
        return keep

    def confirm(
        self, channel: int, delivery_tag: Optional[int] = None, *, multiple: bool = False,
        nack: bool = False, wait: Optional[float] = DEFAULT_TIMEOUT,
    ) -> int:
        """Ack (or nack) a publish; default: the newest pending one.  Returns the tag sent."""
        with self._cond:
            ch = self._channels.get(channel)
            pending = ch.pending if ch else []
            if delivery_tag is None:
                if not pending:
                    raise FakeBrokerError(f"no pending confirms on channel {channel}: {self!r}")
                delivery_tag = pending[-1]
            if ch:
                ch.pending = [t for t in pending if (t > delivery_tag if multiple else t != delivery_tag)]
            name = "basic.nack" if nack else "basic.ack"
            self.send_method(channel, name, delivery_tag, multiple, wait=None)
            end = self._queued
        self._wait_flushed(end, wait)
        return delivery_tag

    def release_confirms(self, nack: bool = False, *, wait: Optional[float] = DEFAULT_TIMEOUT) -> int:
        """Confirm everything pending on every channel (one answer per channel); returns how many."""
        count = 0
        with self._cond:
            for ch in list(self._channels.values()):
                if ch.pending:
                    count += len(ch.pending)
                    self.confirm(ch.id, ch.pending[-1], multiple=len(ch.pending) > 1, nack=nack, wait=None)
            end = self._queued
        self._wait_flushed(end, wait)
        return count

    def drop(self, rst: bool = True, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close the socket abruptly: an RST (``rst=True``) or a bare FIN, no AMQP close."""
        with self._cond:
            if self._closed:
                return
            self._drop_request = rst
        self._wake()
        if not self._in_loop():
            self.wait_closed(timeout)

    def stop(self) -> None:
        """Ask the peer's thread to close the socket and exit (see :meth:`join`)."""
        with self._cond:
            self._stop_request = True
        self._wake()

    def join(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise WaitTimeout(f"peer thread did not exit within {timeout}s: {self!r}")

    # -- internals: output ----------------------------------------------------------

    def _in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already awake, or already gone

    def _check_writable(self) -> None:
        if self._cut:
            raise FakeBrokerError(f"the stream was cut mid-frame; nothing more can be sent: {self!r}")
        if self._closed or self._close_after_flush is not None:
            raise PeerClosed(f"cannot send, the connection is closed: {self!r}")

    def _queue_raw(self, raw: bytes) -> int:
        if raw:
            self._outbox.append(memoryview(raw))
            self._queued += len(raw)
            self._wake()
        return self._queued

    def _enqueue(self, data: bytes, *, auto: bool, wait: Optional[float]) -> bool:
        """Queue plaintext for the socket; auto sends are dropped when silenced or closed."""
        with self._cond:
            if auto and (self._silenced or self._cut or self._closed or self._close_after_flush is not None):
                return False
            self._check_writable()
            end = self._queue_raw(self._layer.encrypt(data))
        if not auto:
            self._wait_flushed(end, wait)
        return True

    def _wait_flushed(self, end: int, wait: Optional[float]) -> None:
        if wait is None or self._in_loop():
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._flushed >= end or self._closed, wait):
                raise WaitTimeout(f"{end - self._flushed} bytes not written within {wait}s "
                                  f"(is the client reading?): {self!r}")
            if self._flushed < end:
                raise PeerClosed(f"connection closed before the bytes went out: {self!r}")

    def _send_method(
        self, channel: int, mspec: MethodSpec, args: tuple[Any, ...], fields: Mapping[str, Any] = {},
        body: Union[bytes, str, None] = None, properties: Optional[Mapping[str, Any]] = None,
        *, auto: bool, wait: Optional[float] = None,
    ) -> bool:
        with self._cond:
            data = encode_frames(channel, mspec, *args, body=body, properties=properties,
                                 frame_limit=self.frame_max, **fields)
            if not self._enqueue(data, auto=auto, wait=None):
                return False
            self._track_sent(channel, mspec, args, fields)
            end = self._queued
        if not auto:
            self._wait_flushed(end, wait)
        return True

    def _reply(self, m: Method, name: str, *args: Any) -> None:
        """An automatic answer (dropped when silenced)."""
        self._send_method(m.channel, method_spec(name), args, auto=True)

    def _track_sent(self, channel: int, mspec: MethodSpec, args: tuple[Any, ...], fields: Mapping[str, Any]) -> None:
        name = mspec.name
        if name == "connection.open-ok":
            self._state = "open"
        elif name == "connection.close":
            self._state = "closing"
        elif name == "connection.close-ok":
            self._close_after_flush = "closed"
        elif name == "channel.close":
            ch = self._channels.get(channel)
            if ch is not None and ch.closing is None:
                ch.closing = "server"
        elif name == "channel.close-ok":
            self._channels.pop(channel, None)
        elif name == "basic.deliver":
            tag = fields.get("delivery_tag", args[1] if len(args) > 1 else 0)
            self._delivery_tags[channel] = max(self._delivery_tags.get(channel, 0), int(tag))
        self._cond.notify_all()

    # -- internals: the loop ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in the fake or in a test's handler
            with self._cond:
                self.error = exc
            self._finish("error", rst=True)
        finally:
            self._finish("stopped", rst=True)
            for s in (self._wake_r, self._wake_w):
                s.close()

    def _loop(self) -> None:
        sock = self._sock
        while True:
            with self._cond:
                if self._closed:
                    return
                if self._stop_request:
                    self._finish("stopped", rst=True)
                    return
                if self._drop_request is not None:
                    self._finish("dropped", rst=self._drop_request)
                    return
                if self._close_after_flush is not None and not self._outbox:
                    self._finish(self._close_after_flush)
                    return
                want_read = self._reading
                want_write = bool(self._outbox)
                timeout = self._next_due() - time.monotonic()
            rlist = [self._wake_r, sock] if want_read else [self._wake_r]
            readable, writable, _ = select.select(rlist, [sock] if want_write else [], [],
                                                  min(max(timeout, 0.0), _TICK))
            if self._wake_r in readable:
                try:
                    while self._wake_r.recv(512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
            if writable and not self._flush():
                return
            if sock in readable and not self._receive():
                return
            self._run_due()

    def _next_due(self) -> float:
        due = time.monotonic() + _TICK
        if self._timers:
            due = min(due, self._timers[0][0])
        if self._next_heartbeat is not None:
            due = min(due, self._next_heartbeat)
        return due

    def _schedule(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._timer_seq), fn))
        self._wake()

    def _run_due(self) -> None:
        now = time.monotonic()
        due = []
        with self._cond:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers)[2])
            beat = self._next_heartbeat is not None and self._next_heartbeat <= now
            if beat:
                self._next_heartbeat = now + self._heartbeat_interval()
                beat = self._heartbeats_on and not self._silenced and self._state != "closing"
        for fn in due:
            fn()
        if beat and self._enqueue(HEARTBEAT_FRAME, auto=True, wait=None):
            with self._cond:
                self._heartbeats_sent.append(time.monotonic())
                self._cond.notify_all()

    def _heartbeat_interval(self) -> float:
        return self._options.heartbeat_interval or float(self.heartbeat or 0) or 1.0

    def _flush(self) -> bool:
        while True:
            with self._cond:
                if not self._outbox:
                    return True
                chunk = self._outbox[0]
            try:
                sent = self._sock.send(chunk)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self._finish("reset")
                return False
            with self._cond:
                self._flushed += sent
                self.bytes_sent += sent
                if sent < len(chunk):
                    self._outbox[0] = chunk[sent:]
                else:
                    self._outbox.popleft()
                self._cond.notify_all()
                if sent < len(chunk):
                    return True

    def _receive(self) -> bool:
        try:
            raw = self._sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            self._finish("reset")
            return False
        if not raw:
            self._finish("eof")
            return False
        if self._options.silent_at == "tls" and self.tls:
            return True  # swallow the ClientHello, never answer
        try:
            data, eof = self._layer.receive(raw)
        except ssl.SSLError as exc:
            with self._cond:
                self.tls_error = exc
                self._queue_raw(self._layer.pending_output())  # the alert, best effort
                self._cond.notify_all()
            self._flush()
            self._finish("tls-error")
            return False
        with self._cond:
            if not self._cut:
                self._queue_raw(self._layer.pending_output())
        if data:
            with self._cond:
                self.bytes_received += len(data)
                self._cond.notify_all()
            if not self._discard_input:
                self._feed(data)
        if eof:
            self._finish("eof")
            return False
        return True

    def _finish(self, reason: str, rst: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._state = "closed"
            self._close_reason = reason
            self._cond.notify_all()
        if rst:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self._sock.close()

    # -- internals: input ------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        pos = 0
        try:
            if not self._header_seen:
                if len(buf) < 8:
                    return
                self._header_seen = True
                header, pos = bytes(buf[:8]), 8
                if header != PROTOCOL_HEADER:
                    with self._cond:
                        self.bad_header = header
                    self._discard_input = True
                    self._enqueue(PROTOCOL_HEADER, auto=True, wait=None)
                    with self._cond:
                        self._close_after_flush = "bad-header"
                    return
                self._on_header()
            while not self._discard_input and len(buf) - pos >= 7:
                ftype, channel, size = struct.unpack_from(">BHI", buf, pos)
                limit = self.frame_max if self.tune_ok else 0
                if limit and size + 8 > limit:
                    raise _ProtocolError(501, f"FRAME_ERROR - frame of {size + 8} bytes exceeds "
                                              f"the negotiated frame_max {limit}")
                end = pos + 7 + size
                if len(buf) <= end:
                    break
                payload, marker, pos = bytes(buf[pos + 7:end]), buf[end], end + 1
                if marker != FRAME_END:
                    raise _ProtocolError(501, f"FRAME_ERROR - frame_end {marker:#04x}, expected 0xce")
                method = self._on_frame(ftype, channel, payload)
                if method is not None:
                    self._on_method(method)
        except _ProtocolError as exc:
            self._protocol_error(exc, fatal=True)
        finally:
            del buf[:pos]

    def _on_frame(self, ftype: int, channel: int, payload: bytes) -> Optional[Method]:
        """Decode one frame; return the method it completes, if any."""
        if ftype == FRAME_HEARTBEAT:
            with self._cond:
                self._heartbeats.append(time.monotonic())
                self._cond.notify_all()
            return None
        content = self._content.get(channel)
        try:
            if ftype == FRAME_METHOD:
                if content is not None:
                    raise _ProtocolError(505, f"UNEXPECTED_FRAME - expected a content header on channel "
                                              f"{channel}, got a method frame", content.spec.sig)
                sig = struct.unpack_from(">HH", payload)
                mspec = _BY_SIG.get(sig)
                if mspec is None:
                    raise _ProtocolError(540, f"NOT_IMPLEMENTED - unknown method {sig}", sig)
                args = tuple(loads(mspec.argsig, payload, 4)[0]) if mspec.argsig else ()
                if not mspec.content:
                    return Method(channel, mspec, args)
                self._content[channel] = _Content(mspec, args)
            elif ftype == FRAME_HEADER:
                if content is None or content.size is not None:
                    raise _ProtocolError(505, f"UNEXPECTED_FRAME - content header on channel {channel}")
                msg = Message()
                msg.inbound_header(payload)
                content.size, content.properties = msg.body_size, dict(msg.properties)
                if not content.size:
                    return self._complete(channel, content)
            elif ftype == FRAME_BODY:
                if content is None or content.size is None:
                    raise _ProtocolError(505, f"UNEXPECTED_FRAME - content body on channel {channel}")
                content.chunks.append(payload)
                content.received += len(payload)
                if content.received > content.size:
                    raise _ProtocolError(501, f"FRAME_ERROR - body of {content.received} bytes, "
                                              f"header announced {content.size}", content.spec.sig)
                if content.received == content.size:
                    return self._complete(channel, content)
            else:
                raise _ProtocolError(501, f"FRAME_ERROR - unknown frame type {ftype}")
        except (struct.error, UnicodeDecodeError, ValueError, KeyError, IndexError) as exc:
            raise _ProtocolError(502, f"SYNTAX_ERROR - cannot decode frame: {exc!r}") from exc
        return None

    def _complete(self, channel: int, content: _Content) -> Method:
        del self._content[channel]
        body = b"".join(content.chunks)
        return Method(channel, content.spec, content.args, content.properties, body)

    def _protocol_error(self, exc: _ProtocolError, fatal: bool) -> None:
        """Close the connection with a hard error, the way RabbitMQ does.

        After a framing error (``fatal``) the stream cannot be parsed any
        more: the socket closes once connection.close is out.  After a
        method-level error the peer waits for the client's close-ok.
        """
        with self._cond:
            self._protocol_errors.append((exc.code, exc.text))
            already_closing = self._state == "closing"
        sent = not already_closing and self._send_method(
            0, method_spec("connection.close"), (exc.code, exc.text, *exc.sig), auto=True)
        if fatal or not sent:
            self._discard_input = True
            with self._cond:
                if self._close_after_flush is None:
                    self._close_after_flush = "protocol-error"
            self._wake()

    def _on_header(self) -> None:
        opts = self._options
        if opts.silent_at == "start":
            self.silence()
            return
        props = dict(DEFAULT_SERVER_PROPERTIES)
        props.update(opts.server_properties)
        self._send_method(0, method_spec("connection.start"), (0, 9, props, opts.mechanisms, opts.locales),
                          auto=True)

    def _on_method(self, m: Method) -> None:
        """Track the method's effects and record it in one step, then answer.

        The route runs under the lock and the method becomes visible to
        ``expect``/``wait_for`` together with its effects (a test that saw
        channel.close-ok also sees the channel gone).  Answers only queue bytes
        that this same thread writes later, so the record always precedes them.
        """
        handler: Optional[Handler] = None
        try:
            with self._cond:
                try:
                    connection_level = m.sig[0] == spec.Connection.CLASS_ID
                    if self._state == "closing" and not connection_level:
                        return  # after connection.close only close/close-ok count
                    if not connection_level and not self._check_channel(m):
                        return
                    handler = self._handlers.get(m.sig)
                    answer = handler is None and self._auto.get(m.sig, self._options.answers(m.spec))
                    route = _ROUTES.get(m.sig)
                    if route is not None:
                        route(self, m, answer)
                finally:
                    self._methods.append(m)
                    self._unclaimed.append(m)
                    self._cond.notify_all()
        except _ProtocolError as exc:
            self._protocol_error(exc, fatal=False)
            return
        if handler is not None:
            handler(self, m)

    def _check_channel(self, m: Method) -> bool:
        """Whether the method should be processed; raises for misuse in strict mode."""
        with self._cond:
            ch = self._channels.get(m.channel)
            strict = self._options.strict
        if m.channel == 0:
            if strict:
                raise _ProtocolError(503, f"COMMAND_INVALID - {m.name} on channel 0", m.sig)
            return False
        if m.name == "channel.open":
            if ch is not None and strict:
                raise _ProtocolError(504, "CHANNEL_ERROR - second 'channel.open' seen", m.sig)
            return ch is None
        if ch is None:
            if strict:
                raise _ProtocolError(504, f"CHANNEL_ERROR - expected 'channel.open', got {m.name}", m.sig)
            return False
        if ch.closing == "server" and m.name not in ("channel.close", "channel.close-ok"):
            return False  # RabbitMQ drops everything on a channel it is closing
        return True

    # -- per-method tracking and automatic answers (on the peer's thread) --------------------

    def _on_start_ok(self, m: Method, answer: bool) -> None:
        client_properties, mechanism, response, locale = m.args
        login = _decode_login(mechanism, response)
        with self._cond:
            self.start_ok = m.args
            self.login = login
        if not answer:
            return
        opts = self._options
        if opts.refuse_login:
            self._reply(m, "connection.close", 403,
                        f"ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. "
                        "For details see the broker logfile.", 0, 0)
        elif opts.silent_at == "tune":
            self.silence()
        else:
            self._reply(m, "connection.tune", opts.channel_max, opts.frame_max, opts.heartbeat)

    def _on_tune_ok(self, m: Method, answer: bool) -> None:
        channel_max, frame_max, heartbeat = m.args
        with self._cond:
            self.tune_ok = (channel_max, frame_max, heartbeat)
            if heartbeat or self._options.heartbeat_interval:
                self._next_heartbeat = time.monotonic() + self._heartbeat_interval()
            self._cond.notify_all()

    def _on_open(self, m: Method, answer: bool) -> None:
        with self._cond:
            self.virtual_host = m.args[0]
        if not answer:
            return
        if self._options.silent_at == "open-ok":
            self.silence()
        else:
            self._reply(m, "connection.open-ok", "")

    def _on_connection_close(self, m: Method, answer: bool) -> None:
        with self._cond:
            self.close_received = (m.args[0], m.args[1])
            self._state = "closing"
            self._next_heartbeat = None
        if answer:
            self._reply(m, "connection.close-ok")

    def _on_connection_close_ok(self, m: Method, answer: bool) -> None:
        with self._cond:
            self._close_after_flush = "closed"
            self._discard_input = True
        self._wake()

    def _on_channel_open(self, m: Method, answer: bool) -> None:
        with self._cond:
            self._channels[m.channel] = _Channel(m.channel)
            self._delivery_tags[m.channel] = 0
        if answer:
            self._reply(m, "channel.open-ok", "")

    def _on_channel_close(self, m: Method, answer: bool) -> None:
        with self._cond:
            ch = self._channels[m.channel]
            ch.closing = ch.closing or "client"  # both closing at once: each answers the other
        if answer:
            self._reply(m, "channel.close-ok")

    def _on_channel_close_ok(self, m: Method, answer: bool) -> None:
        with self._cond:
            self._channels.pop(m.channel, None)
            self._cond.notify_all()

    def _on_confirm_select(self, m: Method, answer: bool) -> None:
        with self._cond:
            self._channels[m.channel].confirm = True
        if answer and not m["nowait"]:
            self._reply(m, "confirm.select-ok")

    def _on_queue_declare(self, m: Method, answer: bool) -> None:
        name = m["queue"] or "amq.gen-" + secrets.token_urlsafe(16)
        if answer and not m["nowait"]:
            self._reply(m, "queue.declare-ok", name, 0, 0)

    def _on_basic_consume(self, m: Method, answer: bool) -> None:
        tag = m["consumer_tag"] or "amq.ctag-" + secrets.token_urlsafe(16)
        with self._cond:
            self._channels[m.channel].consumers.append(tag)
        if answer and not m["nowait"]:
            self._reply(m, "basic.consume-ok", tag)

    def _on_basic_cancel(self, m: Method, answer: bool) -> None:
        tag = m["consumer_tag"]
        with self._cond:
            consumers = self._channels[m.channel].consumers
            if tag in consumers:
                consumers.remove(tag)
        if answer and not m["nowait"]:
            self._reply(m, "basic.cancel-ok", tag)

    def _on_basic_publish(self, m: Method, answer: bool) -> None:
        with self._cond:
            ch = self._channels[m.channel]
            tag = None
            if ch.confirm:
                ch.seq += 1
                tag = ch.seq
                ch.pending.append(tag)
            self._published.append(Published(
                m.channel, m["exchange"], m["routing_key"], m.body or b"", m.properties or {},
                m["mandatory"], m["immediate"], tag, m.received_at,
            ))
            self._cond.notify_all()
            opts = self._options
            if tag is None or not answer or opts.confirm is None:
                return
            waiting = [t for t in ch.pending if t > ch.scheduled]
            if len(waiting) < opts.confirm_batch:
                return
            ch.scheduled = waiting[-1]
        nack = opts.confirm == "nack"
        if opts.confirm_delay:
            self._schedule(opts.confirm_delay, lambda: self._auto_confirm(ch, waiting[-1], nack))
        else:
            self._auto_confirm(ch, waiting[-1], nack)

    def _auto_confirm(self, ch: _Channel, upto: int, nack: bool) -> None:
        with self._cond:
            if self._channels.get(ch.id) is not ch or self._silenced or ch.closing:
                return  # the channel went away, or the broker is keeping quiet
            tags = [t for t in ch.pending if t <= upto]
            if not tags:
                return
            ch.pending = [t for t in ch.pending if t > upto]
            self._send_method(ch.id, method_spec("basic.nack" if nack else "basic.ack"),
                              (tags[-1], len(tags) > 1), auto=True)


def _simple(reply: str, *args: Any, nowait: Optional[str] = None) -> Callable[[Peer, Method, bool], None]:
    """An automatic answer with fixed arguments, skipped when the request says nowait."""

    def route(peer: Peer, m: Method, answer: bool) -> None:
        if answer and not (nowait and m[nowait]):
            peer._reply(m, reply, *args)

    return route


def _flow(peer: Peer, m: Method, answer: bool) -> None:
    if answer:
        peer._reply(m, "channel.flow-ok", m["active"])


def _no_answer(peer: Peer, m: Method, answer: bool) -> None:
    pass


_ROUTES: Mapping[tuple[int, int], Callable[[Peer, Method, bool], None]] = {
    spec.Connection.StartOk: Peer._on_start_ok,
    spec.Connection.TuneOk: Peer._on_tune_ok,
    spec.Connection.Open: Peer._on_open,
    spec.Connection.Close: Peer._on_connection_close,
    spec.Connection.CloseOk: Peer._on_connection_close_ok,
    spec.Channel.Open: Peer._on_channel_open,
    spec.Channel.Close: Peer._on_channel_close,
    spec.Channel.CloseOk: Peer._on_channel_close_ok,
    spec.Channel.Flow: _flow,
    spec.Channel.FlowOk: _no_answer,
    spec.Confirm.Select: Peer._on_confirm_select,
    spec.Basic.Qos: _simple("basic.qos-ok"),
    spec.Queue.Declare: Peer._on_queue_declare,
    spec.Queue.Bind: _simple("queue.bind-ok", nowait="nowait"),
    spec.Queue.Unbind: _simple("queue.unbind-ok"),
    spec.Queue.Purge: _simple("queue.purge-ok", 0, nowait="nowait"),
    spec.Queue.Delete: _simple("queue.delete-ok", 0, nowait="nowait"),
    spec.Exchange.Declare: _simple("exchange.declare-ok", nowait="nowait"),
    spec.Exchange.Delete: _simple("exchange.delete-ok", nowait="nowait"),
    spec.Exchange.Bind: _simple("exchange.bind-ok", nowait="nowait"),
    spec.Exchange.Unbind: _simple("exchange.unbind-ok", nowait="nowait"),
    spec.Basic.Consume: Peer._on_basic_consume,
    spec.Basic.Cancel: Peer._on_basic_cancel,
    spec.Basic.Publish: Peer._on_basic_publish,
    spec.Basic.Get: _simple("basic.get-empty", ""),
    spec.Basic.Recover: _simple("basic.recover-ok"),
    spec.Tx.Select: _simple("tx.select-ok"),
    spec.Tx.Commit: _simple("tx.commit-ok"),
    spec.Tx.Rollback: _simple("tx.rollback-ok"),
}


def _decode_login(mechanism: str, response: str) -> tuple[str, str, str]:
    """(mechanism, username, password) from a start-ok response; empty strings when unknown."""
    raw = response.encode("utf-8", "surrogatepass")
    try:
        if mechanism == "PLAIN":
            _, user, password = raw.split(b"\0", 2)
            return mechanism, user.decode(), password.decode()
        if mechanism == "AMQPLAIN":
            table = loads("F", struct.pack(">I", len(raw)) + raw, 0)[0][0]
            return mechanism, str(table.get("LOGIN", "")), str(table.get("PASSWORD", ""))
    except (ValueError, struct.error, UnicodeDecodeError):
        pass
    return mechanism, "", ""


# -- the broker ------------------------------------------------------------------------


def _make_certificates(directory: str) -> tuple[str, str, str]:
    """A throwaway CA and a server certificate for localhost/127.0.0.1 (openssl CLI)."""
    config = os.path.join(directory, "openssl.cnf")
    with open(config, "w") as f:
        f.write(
            "[req]\ndistinguished_name = dn\nprompt = no\n"
            "[dn]\nCN = carrot_kombu fakebroker CA\n"
            "[ca]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
            "[server]\nbasicConstraints = critical,CA:FALSE\n"
            "keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n"
            "subjectAltName = DNS:localhost,IP:127.0.0.1\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
        )
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        ["req", "-x509", "-config", config, "-extensions", "ca", *key,
         "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
        ["req", "-new", "-config", config, *key, "-subj", "/CN=localhost",
         "-keyout", "server.key", "-out", "server.csr"],
        ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-set_serial", str(secrets.randbits(63)), "-days", "2",
         "-extfile", config, "-extensions", "server", "-out", "server.pem"],
    ]
    for args in steps:
        done = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, timeout=30)
        if done.returncode:
            raise FakeBrokerError(f"openssl {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return (os.path.join(directory, "ca.pem"), os.path.join(directory, "server.pem"),
            os.path.join(directory, "server.key"))


class FakeBroker:
    """A fake AMQP 0-9-1 broker on 127.0.0.1 (ephemeral port unless ``port``).

    Keyword arguments other than ``tls``, ``port`` and ``recv_buffer`` are
    :class:`PeerOptions` for every connection accepted from now on; change
    them later with ``broker.options = dataclasses.replace(broker.options, ...)``.
    ``recv_buffer`` sets SO_RCVBUF on accepted sockets, so that
    :meth:`Peer.stop_reading` stalls the client sooner (below ~128 KiB,
    loopback TCP crawls on zero-window probes once reading resumes).

    Use as a context manager, or ``start()`` / ``stop()``.
    """

    def __init__(
        self, *, tls: bool = False, port: int = 0, recv_buffer: Optional[int] = None,
        options: Optional[PeerOptions] = None, **option_fields: Any,
    ) -> None:
        self.tls = tls
        self.host = "127.0.0.1"
        self.options = replace(options or PeerOptions(), **option_fields)
        self._requested_port = port
        self._recv_buffer = recv_buffer
        self._cond = threading.Condition()
        self._peers: list[Peer] = []
        self._accepted: list[Peer] = []
        self._handed_out = 0
        self._numbers = itertools.count(1)
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._tmpdir: Optional[str] = None
        self._server_context: Optional[ssl.SSLContext] = None
        self.ca_path: Optional[str] = None
        self.cert_path: Optional[str] = None
        self.key_path: Optional[str] = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> "FakeBroker":
        if self._thread is not None:
            raise FakeBrokerError("already started")
        try:
            if self.tls:
                self._tmpdir = tempfile.mkdtemp(prefix="fakebroker-tls-")
                self.ca_path, self.cert_path, self.key_path = _make_certificates(self._tmpdir)
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(self.cert_path, self.key_path)
                self._server_context = context
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener = listener
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._recv_buffer:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._recv_buffer)
            listener.bind((self.host, self._requested_port))
            listener.listen(64)
            listener.setblocking(False)
            self.port = listener.getsockname()[1]
            self._wake_r, self._wake_w = socket.socketpair()
            self._thread = threading.Thread(target=self._accept_loop, name=f"fakebroker-accept-{self.port}",
                                            daemon=True)
            self._thread.start()
        except BaseException:
            self._release()
            raise
        return self

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Close the listener and every peer (RST), join all threads, delete the certificates.

        Raises the first internal error a peer hit (a bug in the fake or in a
        test's handler), so such bugs cannot pass silently.  A second call
        does nothing.
        """
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            peers = list(self._peers)
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        try:
            if self._thread is not None:
                self._thread.join(max(deadline - time.monotonic(), 0.1))
                if self._thread.is_alive():
                    raise WaitTimeout(f"accept thread did not exit within {timeout}s")
            for peer in peers:
                peer.stop()
            for peer in peers:
                peer.join(max(deadline - time.monotonic(), 0.1))
        finally:
            self._release()
        errors = [p.error for p in peers if p.error is not None]
        if errors:
            raise FakeBrokerError(f"a peer failed: {errors[0]!r}") from errors[0]

    def _release(self) -> None:
        for s in (self._listener, self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> "FakeBroker":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        with self._cond:
            peers = list(self._peers)
        open_ = sum(1 for p in peers if not p.closed)
        return (f"<FakeBroker {self.host}:{self.port}{' tls' if self.tls else ''} "
                f"peers=[{open_} open, {len(peers) - open_} closed]>")

    # -- addresses -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    @property
    def tls_url(self) -> str:
        return f"amqps://guest:guest@localhost:{self.port}//"

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the throwaway CA (TLS brokers only)."""
        if self.ca_path is None:
            raise FakeBrokerError("not a TLS broker")
        return ssl.create_default_context(cafile=self.ca_path)

    # -- peers ---------------------------------------------------------------------------

    @property
    def peers(self) -> list[Peer]:
        """Every peer so far (accepted and socketpair), oldest first."""
        with self._cond:
            return list(self._peers)

    def accept(self, timeout: float = DEFAULT_TIMEOUT) -> Peer:
        """The next accepted connection not yet returned by ``accept``."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._accepted) > self._handed_out, timeout):
                raise WaitTimeout(f"no new connection within {timeout}s: {self!r}")
            peer = self._accepted[self._handed_out]
            self._handed_out += 1
            return peer

    def socketpair(self, *, tcp: bool = False, tls: Optional[bool] = None) -> tuple[socket.socket, Peer]:
        """A connected (client socket, peer) without the listener.

        ``tcp=False`` gives a real :func:`socket.socketpair` (AF_UNIX: TCP
        socket options fail on it); ``tcp=True`` a loopback TCP pair.  The
        caller owns and closes the client socket.
        """
        if tcp:
            with socket.create_server((self.host, 0)) as lst:
                client = socket.create_connection(lst.getsockname(), timeout=DEFAULT_TIMEOUT)
                server, _ = lst.accept()
            client.settimeout(None)
        else:
            client, server = socket.socketpair()
        try:
            use_tls = self.tls if tls is None else tls
            if use_tls and self._server_context is None:
                raise FakeBrokerError("tls=True needs a FakeBroker(tls=True)")
            peer = self._add_peer(server, "socketpair", self._server_context if use_tls else None)
        except BaseException:
            client.close()
            server.close()
            raise
        return client, peer

    def _add_peer(self, sock: socket.socket, via: str, context: Optional[ssl.SSLContext]) -> Peer:
        with self._cond:
            if self._stopping:
                raise FakeBrokerError("broker is stopping")
            peer = Peer(sock, self.options, number=next(self._numbers), tls_context=context, via=via)
            self._peers.append(peer)
            if via == "tcp":
                self._accepted.append(peer)
            peer.start()
            self._cond.notify_all()
        return peer

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        while True:
            select.select([self._listener, self._wake_r], [], [], 1.0)
            with self._cond:
                if self._stopping:
                    return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                return
            try:
                self._add_peer(sock, "tcp", self._server_context)
            except FakeBrokerError:
                sock.close()
                return
