"""The memory link: :class:`~carrot_kombu._link.Link` over kombu's in-process transports.

``memory://`` (and its subclasses, which is how unit tests inject faults)
has no socket, no confirms and no heartbeats: a publish is stored when
``basic_publish`` returns, liveness is ``heartbeat_check``, and a consumer
reads from a private connection on its own pump thread.  Only kombu's
public API is used here.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable, Optional

import kombu
from kombu.transport import resolve_transport

from ._link import (
    ConfirmChannel,
    ConfirmHooks,
    Link,
    Outbound,
    Subscription,
    Waiter,
    establish_once,
    guarded,
    quietly,
)
from ._sync import SLICE, raised_by_library
from .config import Endpoint, Settings
from .exceptions import Disconnected

__all__ = ("MemoryLink", "connect")

logger = logging.getLogger("carrot_kombu")


class MemoryLink(Link):
    """kombu's in-process transport: no socket, liveness by ``heartbeat_check``."""

    tick_interval = 0.05

    def __init__(self, generation: int, endpoint: Endpoint, kombu_connection: kombu.Connection, raw: Any) -> None:
        super().__init__(generation, endpoint, kombu_connection)
        self._raw = raw

    def tick(self) -> None:
        self.kombu.transport.heartbeat_check(self._raw)

    def kill(self, exc: BaseException) -> None:
        try:
            self.kombu.collect()
        except Exception:
            logger.debug("ignored error while dropping a connection", exc_info=True)

    def close(self, timeout: float) -> None:
        try:
            self.kombu.release()
        except Exception as exc:
            self.kill(exc)

    def open_channel(self, deadline: Optional[float] = None) -> Any:
        # ``deadline`` is moot: kombu's in-process transports answer at once.
        return self.kombu.transport.create_channel(self._raw)

    def close_channel(self, chan: Any, wait: bool = False) -> None:
        quietly(chan.close, "closing a channel")

    def reusable(self, chan: Any) -> bool:
        if getattr(chan, "closed", False) or not getattr(chan, "is_open", True):
            return False
        # Consumers would keep delivering to whoever leases the channel next.
        return not getattr(chan, "callbacks", None)

    def open_confirm_channel(self, hooks: ConfirmHooks) -> "MemoryConfirmChannel":
        return MemoryConfirmChannel(self.open_channel(), hooks)

    def subscription(self, on_delivery: Callable[[Any], None], on_cancelled: Callable[[Optional[str]], None],
                     on_moved: Optional[Callable[[], None]] = None, on_close: Optional[Callable[[], None]] = None,
                     borrow: Optional[Callable[[], Any]] = None) -> "MemorySubscription":
        # A private connection per consumer: its channel is its own (nothing to fence).
        return MemorySubscription(self, on_delivery)

    def drain_events(self, timeout: Optional[float]) -> None:
        self.kombu.drain_events(timeout=timeout)

    def private_connection(self) -> kombu.Connection:
        """A connection of the same in-process broker, for one consumer's own thread."""
        conn = kombu.Connection(transport=type(self.kombu.transport), hostname=self.endpoint.host)
        conn.connect()
        return conn


class MemoryConfirmChannel(ConfirmChannel):
    """Stored when ``basic_publish`` returns: each message is confirmed right after it."""

    def __init__(self, chan: Any, hooks: ConfirmHooks) -> None:
        self._chan = chan
        self._hooks = hooks
        self._next_tag = 1
        self._lock = threading.Lock()

    def write(self, messages: list[Outbound], on_queued: Callable[[int, bool], None],
              deadline: Optional[float] = None, flush: bool = True) -> None:
        with self._lock:
            first = self._next_tag
            self._next_tag += len(messages)
        on_queued(first, True)
        for offset, message in enumerate(messages):
            props = dict(message.properties)
            headers = props.pop("application_headers", None)
            prepared = self._chan.prepare_message(
                message.body, props.pop("priority", None), props.pop("content_type", None),
                props.pop("content_encoding", None), headers, props,
            )
            try:
                self._chan.basic_publish(prepared, exchange=message.exchange, routing_key=message.routing_key)
            except Exception as exc:
                if not raised_by_library(exc):
                    raise  # a signal handler's, for the caller
                raise Disconnected(f"publish failed: {type(exc).__name__}: {exc}", exc) from exc
            self._hooks.on_confirm(first + offset, False, True)

    def wait(self, waiter: Waiter, deadline: Optional[float],
             interrupt: Optional[Callable[[], bool]] = None) -> bool:
        import time

        while not waiter.ready():
            remaining = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
            if remaining <= 0 or (interrupt is not None and interrupt()):
                return False
            event = waiter.event
            if not waiter.ready():
                event.wait(remaining)
        return True

    def wait_confirm(self, waiter: Waiter, deadline: Optional[float], what: Callable[[], str]) -> bool:
        return self.wait(waiter, deadline)

    def failure(self) -> Optional[BaseException]:
        return None


class MemorySubscription(Subscription):
    """A private connection of the in-process broker, drained by a pump thread."""

    def __init__(self, link: MemoryLink, on_delivery: Callable[[Any], None]) -> None:
        self._link = link
        self._on_delivery = on_delivery
        self._conn: Optional[kombu.Connection] = None
        self._chan: Any = None
        self._tag: Optional[str] = None
        self._stopped = threading.Event()

    def start(self, queue: kombu.Queue, prepare: Callable[[Any], None], no_ack: bool,
              arguments: Optional[dict[str, Any]], pipelined: Any = None, isolated: bool = False) -> None:
        conn = self._link.private_connection()
        try:
            chan = conn.channel()
            prepare(chan)
            self._tag = chan.basic_consume(queue=queue.name, no_ack=no_ack, callback=self._on_delivery,
                                           consumer_tag=f"carrot-kombu.{id(self):x}", arguments=arguments)
        except BaseException:
            _release(conn)
            raise
        self._conn, self._chan = conn, chan
        threading.Thread(target=self._pump, args=(conn,), name=f"carrot-kombu-pump-{queue.name}",
                         daemon=True).start()

    def _pump(self, conn: kombu.Connection) -> None:
        """Deliver from our own connection (only our callback runs here)."""
        while not self._stopped.is_set():
            try:
                conn.drain_events(timeout=0.05)
            except (socket.timeout, TimeoutError):
                continue
            except Exception:
                logger.debug("consumer pump ended", exc_info=True)
                return

    def stop(self) -> None:
        chan, tag = self._chan, self._tag
        if chan is not None and tag is not None:
            self._tag = None
            try:
                chan.basic_cancel(tag)
            except Exception:
                logger.debug("ignored error cancelling a consumer", exc_info=True)

    def cancel(self) -> None:
        self.stop()
        self.close()

    def requeue(self, raw: Any) -> None:
        try:
            raw.requeue()
        except Exception:  # noqa: BLE001 - its channel is closing: restored with it
            logger.debug("carrot_kombu could not requeue a delivery", exc_info=True)

    def close(self) -> None:
        self._stopped.set()
        conn, self._conn, self._chan = self._conn, None, None
        _release(conn)

    def alive(self, raw: Any = None) -> bool:
        return True  # nothing is lost with an in-process connection

    def message(self, raw: Any) -> Any:
        return raw  # kombu's virtual transports deliver kombu messages

    def reject(self, message: Any, raw: Any) -> None:
        try:
            message.reject(requeue=False)
        except Exception:  # noqa: BLE001 - the channel may be gone
            logger.debug("carrot_kombu could not reject an undecodable delivery", exc_info=True)


def _release(conn: Any) -> None:
    if conn is None:
        return
    try:
        conn.release()
    except Exception:
        logger.debug("ignored error while closing a consumer connection", exc_info=True)


_GUARDED: dict[type, type] = {}
_GUARD_LOCK = threading.Lock()


def _transport_for(endpoint: Endpoint) -> type:
    base: Any = resolve_transport(endpoint.scheme)
    with _GUARD_LOCK:
        cls = _GUARDED.get(base)
        if cls is None:
            cls = _GUARDED[base] = guarded(base)
    return cls


def connect(generation: int, endpoint: Endpoint, settings: Settings, connect_timeout: Optional[float] = None,
            on_created: Optional[Callable[[Any], None]] = None) -> MemoryLink:
    """Connect to the in-process broker named by ``endpoint``."""
    conn = kombu.Connection(
        hostname=endpoint.host, port=endpoint.port, userid=endpoint.userid, password=endpoint.password,
        virtual_host=endpoint.virtual_host, heartbeat=endpoint.heartbeat,
        connect_timeout=connect_timeout or endpoint.connect_timeout,
        transport=_transport_for(endpoint), transport_options=dict(settings.transport_options),
    )
    return MemoryLink(generation, endpoint, conn, establish_once(conn))
