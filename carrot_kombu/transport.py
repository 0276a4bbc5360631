"""A kombu transport over the process's supervised managers: ``carrot+amqp://``.

A Celery or kombu project switches carrot_kombu on by its broker URL::

    broker_url = "carrot+amqp://user:pass@host:5672/vhost"      # Celery
    kombu.Connection("carrot+amqp://user:pass@host:5672/vhost")  # kombu

(``import carrot_kombu`` registers the ``carrot`` alias; without the import,
``broker_transport = "carrot_kombu.transport:Transport"`` with a plain
``amqp://`` URL does the same.)

Every kombu connection of the process with the same broker settings is a
*view* (:class:`VirtualConnection`) of one supervised
:class:`~carrot_kombu.ConnectionManager`: one AMQP connection per process,
with its heartbeats, backoff, fail-fast ``Disconnected`` (a kombu connection
error, so kombu's and Celery's own retry logic applies) and fork safety.

* Establishing a kombu connection never makes an AMQP connection: it takes
  the manager's current one, waiting only while an attempt is in progress
  (at most ``connect_timeout``).  A wrong password therefore never makes
  kombu's retry loops hammer the broker with logins.
* kombu channels are channels of that connection, leased from the manager
  and fenced by it: after a loss every use raises ``Disconnected``.
* Deliveries reach kombu callbacks only in the thread that drains the view
  (``drain_events``, or Celery's event loop through :meth:`VirtualConnection.fileno`),
  never on the thread that reads the socket.
* A view belongs to one AMQP connection: after a loss it stays dead, so
  kombu and Celery see the loss (Celery clears its reserved requests and
  QoS) and establish again; nothing is resubscribed underneath them.
* ``transport_options={"confirm_publish": True}`` (as kombu's pyamqp
  transport): every publish of that connection waits for its confirm.
* In a forked child (prefork pool) the manager connects when the child
  first needs the broker, not at fork.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Optional

import amqp
from kombu.transport import base

from amqp.exceptions import AccessRefused, NotAllowed

from ._deadline import Deadline
from .exceptions import Blocked, BrokerUnavailable, ChannelLimitReached, Disconnected, PoolTimeout, ReplyTimeout
from .manager import ConnectionManager
from .options import TRANSPORT_MANAGER_OPTIONS
from .status import ConnectionState
from .urls import TRANSPORT_PREFIX, connection_urls, current_url, mask_url, with_connection_credentials
from .view import CallbackQueue, ConnectionView

__all__ = ("Transport", "VirtualConnection", "manager_for_connection")

logger = logging.getLogger("carrot_kombu")

#: Transport options that configure the process's manager (not py-amqp).
MANAGER_OPTIONS = TRANSPORT_MANAGER_OPTIONS
#: Transport options that belong to one kombu connection.
CONNECTION_OPTIONS = ("confirm_publish", "confirm_timeout", "default_prefetch_count")
#: The prefetch a kombu consumer that acks gets when its channel never set one
#: (``basic_qos``): without it the broker pushes the whole backlog, which
#: py-amqp leaves in the socket (TCP back-pressure) but the manager's reader
#: would queue in memory.  As ``ConnectionManager.consume()``'s default; 0 = none.
DEFAULT_PREFETCH_COUNT = 100
#: Default pool size of a transport's manager: Celery keeps a channel per
#: pooled producer connection, plus the worker's consumers, pidbox, results.
DEFAULT_POOL_LIMIT = 256

_registry_lock = threading.Lock()
_registry: dict[tuple[Any, ...], "_Entry"] = {}

#: A manager no kombu connection has used for this many seconds (none open)
#: is stopped and forgotten: its AMQP connection and threads go.
IDLE_GRACE = 60.0


class _Entry:
    """A registry entry: the manager, its open kombu connections (weakly), when it was last asked for."""

    __slots__ = ("manager", "views", "used_at")

    def __init__(self, manager: ConnectionManager) -> None:
        self.manager = manager
        self.views: "weakref.WeakSet[VirtualConnection]" = weakref.WeakSet()
        self.used_at = time.monotonic()

    def due(self) -> Optional[float]:
        """When this manager may be retired (monotonic), or None while a kombu connection is open."""
        if any(not view._closed for view in list(self.views)):
            return None
        return self.used_at + IDLE_GRACE

    def idle(self, now: float) -> bool:
        due = self.due()
        return due is not None and now >= due


_janitor: Optional[threading.Thread] = None
#: Set when a kombu connection closes: the janitor looks again at once instead
#: of finishing a sleep computed when every connection was still open.
_janitor_wake = threading.Event()


def _start_janitor() -> None:
    """Under ``_registry_lock``: one thread retires idle managers while the registry has any."""
    global _janitor
    if _janitor is None or not _janitor.is_alive():
        _janitor = threading.Thread(target=_retire_idle, name="carrot-kombu-transport-janitor", daemon=True)
        _janitor.start()


def _retire_idle() -> None:
    global _janitor
    while True:
        now = time.monotonic()
        with _registry_lock:
            idle = [key for key, entry in _registry.items() if entry.idle(now)]
            retired = [_registry.pop(key).manager for key in idle]
            done = not _registry
            if done:
                _janitor = None
            dues = [due for due in (entry.due() for entry in _registry.values()) if due is not None]
        for manager in retired:
            try:
                manager.stop(timeout=5.0)
            except Exception:  # noqa: BLE001 - it is being dropped anyway
                logger.debug("ignored error while retiring an idle transport manager", exc_info=True)
        if done:
            return
        # Until the first manager falls due (a close wakes us sooner); at most
        # 5 s, so a changed IDLE_GRACE or a clock step is seen soon enough.
        _janitor_wake.wait(max(0.05, min(min(dues, default=now + 5.0) - now, 5.0)))
        _janitor_wake.clear()


#: After a worker's consuming connection was lost, establishing *on the thread
#: that ran it* (Celery's consumer reconnecting) waits up to CONSUMER_WAIT
#: seconds for the manager, for CONSUMER_RECONNECT_WINDOW seconds.  Other
#: threads (a task's ``.delay()``) are not held: they fail as on ``pyamqp://``
#: and Celery's publish retry policy applies.
CONSUMER_WAIT = 30.0
CONSUMER_RECONNECT_WINDOW = 300.0
_consumer_lost_at: dict[tuple[int, int], float] = {}


def _consumer_lost(manager: ConnectionManager) -> None:
    _consumer_lost_at.setdefault((id(manager), threading.get_ident()), time.monotonic())


def _consumer_back(manager: ConnectionManager) -> None:
    _consumer_lost_at.pop((id(manager), threading.get_ident()), None)


def _may_wait(status: Any, consumer_reconnecting: bool) -> bool:
    """Whether establishing should wait for the manager instead of failing now.

    While an attempt is in progress, right after a loss (the supervisor has
    not noticed yet, or its first reconnect attempt has not failed yet: a blip
    is over in a fraction of a second), or on a consumer's own reconnect.
    Never after a refusal retrying will not fix, never once stopped; during
    an outage (an attempt failed) everyone else fails at once, as on
    ``pyamqp://``, and kombu's or Celery's retry policy applies.
    """
    if status.fatal or status.gave_up or status.state in (ConnectionState.STOPPED, ConnectionState.FAILED):
        return False
    if consumer_reconnecting or status.state in (ConnectionState.CONNECTING, ConnectionState.CONNECTED):
        return True
    return status.state is ConnectionState.DISCONNECTED and status.attempts == 0


def _wait_for_view(manager: ConnectionManager, timeout: float) -> ConnectionView:
    """The manager's live connection, waiting for it while :func:`_may_wait` says so (at most ``timeout``).

    Raises:
        BrokerUnavailable, AccessRefused, NotAllowed: None (see :func:`_establish_error`).
    """
    lost_at = _consumer_lost_at.get((id(manager), threading.get_ident()))
    consumer = lost_at is not None and time.monotonic() - lost_at < CONSUMER_RECONNECT_WINDOW
    if consumer:
        # A worker's consuming connection was lost: this is most likely
        # Celery reconnecting it.  Waiting here for the manager (which
        # reconnects on its own, ~0.3 s after the broker is back) costs
        # the broker nothing, unlike Celery's retry schedule (2, 4, 6 s...).
        timeout = max(timeout, CONSUMER_WAIT)
    deadline = Deadline.after(timeout)
    while True:
        try:
            return manager.connection(timeout=0)
        except Disconnected as down:
            status = manager.status()
            if deadline.expired() or not _may_wait(status, consumer):
                raise _establish_error(down, status) from None
            try:
                return manager.connection(timeout=deadline.within(0.25))
            except Disconnected:
                continue


#: The broker URLs of a kombu connection, without the ``carrot+`` prefix.
_urls = connection_urls
_with_connection_credentials = with_connection_credentials


def _key(client: Any) -> tuple[Any, ...]:
    ssl = client.ssl
    ssl_key = tuple(sorted((k, repr(v)) for k, v in ssl.items())) if isinstance(ssl, dict) else bool(ssl)
    # Everything that shapes the AMQP connection: the manager's options and
    # py-amqp's (``client_properties``...).  Two kombu connections that differ
    # there get two AMQP connections, as on ``pyamqp://``; sharing one would
    # silently apply the first one's settings to both.
    managed, amqp_options = _split_options(client)
    shaping = tuple(sorted((k, repr(v)) for k, v in {**managed, **amqp_options}.items()))
    return (os.getpid(), tuple(_urls(client)), ssl_key, shaping)


#: Transport options that are kombu's or Celery's retry settings, not py-amqp arguments.
_RETRY_OPTIONS = ("max_retries", "interval_start", "interval_step", "interval_max", "retry_policy")


def _split_options(client: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """A kombu connection's transport options: (the manager's, py-amqp's)."""
    options = dict(client.transport_options or {})
    managed = {k: options.pop(k) for k in MANAGER_OPTIONS if k in options}
    for key in CONNECTION_OPTIONS + _RETRY_OPTIONS:
        options.pop(key, None)
    return managed, options


def manager_for_connection(client: Any) -> ConnectionManager:
    """The process's manager for a kombu connection's broker settings (made on first use).

    Raises:
        ConfigurationError: The settings are invalid (the message names the option).
    """
    key = _key(client)
    with _registry_lock:
        entry = _registry.get(key)
        if entry is None:
            entry = _registry[key] = _Entry(_build(client))
            _start_janitor()
        entry.used_at = time.monotonic()
    return entry.manager


def _opened(manager: ConnectionManager, view: "VirtualConnection") -> None:
    """Count a kombu connection as using ``manager`` (until it is closed or collected)."""
    with _registry_lock:
        for entry in _registry.values():
            if entry.manager is manager:
                entry.views.add(view)
                entry.used_at = time.monotonic()
                return


def _build(client: Any) -> ConnectionManager:
    managed, options = _split_options(client)
    ssl = client.ssl
    heartbeat = _heartbeat(client, managed.pop("heartbeat", None))
    manager = ConnectionManager(
        _urls(client),
        ssl_options=(dict(ssl) if isinstance(ssl, dict) else True) if ssl else None,
        heartbeat=heartbeat,
        connection_timeout=float(client.connect_timeout or 5.0),
        transport_options=options or None,
        pool_limit=managed.pop("pool_limit", DEFAULT_POOL_LIMIT),
        # In a forked child the manager starts when the child first needs it.
        restart_after_fork=False,
        **managed,
    )
    return manager


def _heartbeat(client: Any, option: Any) -> float:
    """The manager's heartbeat: what the application chose, else carrot_kombu's 10 s.

    Chosen means: ``?heartbeat=`` in the URL (it wins anyway), the
    ``heartbeat`` transport option, the Celery app's ``broker_heartbeat`` if
    the app set it (Celery passes it only to the worker's consuming
    connection, but the manager serves the whole process), or the kombu
    connection's own ``heartbeat``.  Celery's default ``broker_heartbeat``
    (120 s) is not a choice: the manager sends heartbeats on its own thread,
    so a short one costs nothing.
    """
    # ``is not None``, never truthiness: 0 is a choice (heartbeats off, as in kombu).
    if option is not None:
        return float(option)
    chosen = _celery_heartbeat(client)
    if chosen is not None:
        return chosen
    value = client.heartbeat
    if value and not _is_celery_default_heartbeat(value):
        return float(value)
    return 10.0


def _celery_heartbeat(client: Any) -> Optional[float]:
    """``broker_heartbeat`` of the current Celery app, if the app set it."""
    import sys

    if "celery" not in sys.modules:
        return None
    try:
        from celery import current_app
        from celery.app.defaults import DEFAULTS

        conf = current_app.conf
        value = conf.get("broker_heartbeat")
        if value is not None and ("broker_heartbeat" in conf.changes or value != DEFAULTS.get("broker_heartbeat")):
            return float(value)
    except Exception:  # no app configured, or an unusual Celery
        return None
    return None


def _is_celery_default_heartbeat(value: Any) -> bool:
    import sys

    if "celery" not in sys.modules:
        return False
    try:
        from celery.app.defaults import DEFAULTS

        return float(value) == float(DEFAULTS.get("broker_heartbeat") or 0)
    except Exception:
        return False


class VirtualConnection:
    """What kombu calls a connection: one kombu connection's view of a manager's live AMQP connection.

    Bound to the manager's connection at the time it was established; once
    that connection is lost the view stays dead (kombu then establishes a
    new one).
    """

    def __init__(self, kombu_transport: "Transport", manager: ConnectionManager, view: ConnectionView) -> None:
        self.client = kombu_transport.client
        self.manager = manager
        self._view = view
        self.events: CallbackQueue = view.callback_queue()
        #: Every callback queue this connection had (see _replace_if_unused): the finalizer closes them.
        self._queues: list[CallbackQueue] = [self.events]
        self._leases: dict[int, Any] = {}
        #: Exclusive queues declared through this connection (deleted by close()).
        self._exclusive: set[str] = set()
        # kombu code often drops a Connection without close(): when this view
        # is collected, its channels go back (py-amqp closes them with its
        # socket; here they would stay leased for the process's life).  Only
        # weak references lead back here from the channels (see channel()).
        weakref.finalize(self, _collected, self._leases, self._queues)
        self._lock = threading.Lock()
        self._closed = False
        #: The loss was raised to kombu once: from now on kombu may re-establish.
        self.loss_reported = False
        #: A channel was handed out: kombu holds something of this AMQP connection.
        self._handed_out = False
        #: Registered with an event loop: this is a worker's consuming connection.
        self.in_event_loop = False
        #: basic_consume was called on one of its channels: kombu consumes here.
        self.consumed = False
        options = self.client.transport_options or {}
        self.confirm_publish = bool(options.get("confirm_publish"))
        self.confirm_timeout = options.get("confirm_timeout")
        self.default_prefetch_count = _prefetch_option(options.get("default_prefetch_count", DEFAULT_PREFETCH_COUNT))

    # -- what kombu and Celery read --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return not self._closed and self._view.alive

    @property
    def server_properties(self) -> dict[str, Any]:
        return self._view.server_properties

    @property
    def heartbeat(self) -> Any:
        return self._view.heartbeat

    @property
    def channel_max(self) -> Any:
        return self._view.channel_max

    @property
    def frame_max(self) -> Any:
        return self._view.frame_max

    @property
    def transport(self) -> Any:
        """py-amqp's transport object (``.sock``), as on a py-amqp connection."""
        return self._view.transport

    @property
    def sock(self) -> Any:
        return self._view.transport.sock

    def fileno(self) -> int:
        """Readable while callbacks are queued for this connection (or it died): for event loops."""
        return self.events.fileno()

    def __repr__(self) -> str:
        state = "connected" if self.connected else "dead"
        return f"<carrot_kombu VirtualConnection {state} generation={self._view.generation} leases={len(self._leases)}>"

    # -- channels --------------------------------------------------------------------------

    def channel(self) -> Any:
        """A kombu channel of this connection (leased from the manager, never reused by others).

        Raises:
            Disconnected: This connection is lost.
            BrokerUnavailable: It was lost before it handed anything out,
                and no other connection came within ``connect_timeout``.
        """
        self._replace_if_unused()
        self.check()
        lease = self.manager.open_channel(timeout=float(self.client.connect_timeout or 5.0))
        if lease.generation != self._view.generation:
            lease.release()
            raise Disconnected("the connection this kombu connection was established on is gone")
        chan = lease.channel
        # kombu reads channel.connection.client (declared-entity cache,
        # SimpleQueue, Producer.connection): it must be *this* kombu connection.
        chan.connection = _ConnectionView(chan.connection, self.client)
        gone = weakref.WeakMethod(self._channel_gone)
        if self.confirm_publish:
            chan.basic_publish = chan.basic_publish_confirm
        chan.queue_declare = self._recording_exclusive(chan.queue_declare)
        chan.basic_consume = self._noting_consumers(chan.basic_consume)
        chan.settle_strictly = True  # message.ack() of a lost delivery raises, as on py-amqp
        if self.default_prefetch_count:
            _bound_consumers(chan, self.default_prefetch_count)
        with self._lock:
            self._leases[id(chan)] = lease
            self._handed_out = True
        self._view.adopt(chan, self.events, lambda chan: _call_if_alive(gone, chan))
        return chan

    def _replace_if_unused(self) -> None:
        """Move to the manager's next connection if this one died before it handed anything out.

        kombu's ``ensure`` (``Producer.publish(retry=True)``, Celery's
        publish retry policy) establishes a connection, then opens its
        default channel outside its retry block.  On ``pyamqp://`` that
        connection is new; here it is the manager's, which may be dying at
        that moment (lost, not yet noticed when it was handed out).  Nothing
        of it reached kombu yet (no channel, no event loop, no loss raised),
        so nothing is lost by moving on: this waits for the next connection
        as establishing does (at most ``connect_timeout``; at once during an
        outage).
        """
        dead = self._view
        if dead.alive or self._closed or self._handed_out or self.in_event_loop or self.loss_reported:
            return
        view = _wait_for_view(self.manager, float(self.client.connect_timeout or 5.0))
        try:
            events = view.callback_queue()
        except Disconnected as down:  # lost again already
            raise _establish_error(down, self.manager.status()) from None
        with self._lock:
            replaced = self._view is dead and not self._handed_out
            if replaced:
                old, self.events, self._view = self.events, events, view
                self._queues.append(events)
        (old if replaced else events).close()
        if replaced:
            _mirror_endpoint(self.client, view)
            logger.debug("carrot_kombu: a kombu connection lost before its first channel moved to generation %s",
                         view.generation)

    def _noting_consumers(self, consume: Any) -> Any:
        """``basic_consume`` that notes this connection consumes (a loss must then be raised, see :attr:`usable`)."""
        me = weakref.ref(self)  # channels lead back here weakly only (see channel())

        def basic_consume(*args: Any, **kwargs: Any) -> Any:
            owner = me()
            if owner is not None:
                owner.consumed = True
            return consume(*args, **kwargs)

        return basic_consume

    def _recording_exclusive(self, declare: Any) -> Any:
        """``queue_declare`` that notes this connection's exclusive queues.

        With py-amqp an exclusive queue ends with its kombu connection; here
        the AMQP connection is shared and lives on, so :meth:`close` deletes
        them (the per-request reply-queue pattern would leak one per request).
        """
        exclusive_queues = self._exclusive

        def queue_declare(*args: Any, **kwargs: Any) -> Any:
            result = declare(*args, **kwargs)
            exclusive = kwargs.get("exclusive", args[3] if len(args) > 3 else False)
            passive = kwargs.get("passive", args[1] if len(args) > 1 else False)
            if exclusive and not passive:
                name = getattr(result, "queue", None) or kwargs.get("queue", args[0] if args else "")
                if name:
                    exclusive_queues.add(name)
            return result

        return queue_declare

    def _delete_exclusive(self, leases: list[Any]) -> None:
        """Delete this connection's exclusive queues (best effort, without waiting for answers)."""
        names, self._exclusive = self._exclusive, set()
        if not names or not self._view.alive:
            return
        lease = next((lease for lease in leases if lease.valid), None)
        try:
            if lease is None:
                with self.manager.channel(timeout=1.0) as spare:
                    for name in names:
                        spare.queue_delete(name, nowait=True)
                return
            for name in names:
                lease.channel.queue_delete(name, nowait=True)
        except Exception as exc:  # noqa: BLE001 - closing goes on; the queues end with the AMQP connection
            logger.debug("carrot_kombu could not delete exclusive queues %s: %r", sorted(names), exc)

    def _channel_gone(self, chan: Any) -> None:
        # py-amqp reopens a channel the broker closed; kombu's default_channel
        # relies on that (one 404 on it and every later use would fail): the
        # next use of default_channel opens a new channel instead.
        from ._pyamqp.kombu_client import forget_default_channel

        forget_default_channel(self.client, chan)
        with self._lock:
            lease = self._leases.pop(id(chan), None)
        if lease is not None:
            lease.release(discard=True)

    # -- reading -----------------------------------------------------------------------------

    def check(self) -> None:
        if self._closed:
            raise Disconnected("this kombu connection was closed")
        if not self._view.alive:
            self.loss_reported = True
            if self.in_event_loop:
                _consumer_lost(self.manager)
            self._view.check()

    @property
    def usable(self) -> bool:
        """What kombu's verify_connection sees: alive, or dead but not yet said so.

        kombu re-establishes silently when this is False; a dead connection
        that consumes must first *raise* once (from drain_events, a channel,
        a heartbeat check), so that kombu and Celery see the loss (Celery
        then forgets what it reserved, the rpc:// result consumer subscribes
        again).  One that never consumed is given up silently.
        """
        if self._closed:
            return False
        if self._view.alive or self.loss_reported:
            return self._view.alive
        if not (self.consumed or self.in_event_loop):
            # Nothing consumes here (a producer's connection, Celery's
            # .delay()): kombu re-establishes silently on pyamqp:// too when
            # its connection is gone (ensure, revive), and nothing is lost by
            # it.  Raising the loss once from the next channel instead failed
            # Celery's send_task, which asks for the producer's channel
            # outside any retry (rpc:// backend's on_task_call), right after a
            # blip.
            self.loss_reported = True
            return False
        # Dead, not yet said: kombu may hold one of its channels as the
        # client's default channel and keep using it (each use raising from
        # the channel, which never reports the loss here): that channel is
        # forgotten, so the next use opens a channel through channel(),
        # which raises once and reports the loss (then kombu re-establishes).
        from ._pyamqp.kombu_client import default_channel, forget_default_channel

        chan = default_channel(self.client)
        if chan is not None and id(chan) in self._leases:
            forget_default_channel(self.client, chan)
        return True

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """Run this connection's queued callbacks here; ``socket.timeout`` if none within ``timeout``.

        Draining is consuming: from now on a loss is raised here once
        before kombu may re-establish (see :attr:`usable`).

        Raises:
            Disconnected: The connection is lost (kombu/Celery re-establish).
        """
        self.consumed = True
        self.check()
        self.events.drain(timeout)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close this kombu connection's channels; the shared AMQP connection stays."""
        if self._closed:
            return
        self._closed = True
        _janitor_wake.set()
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()  # the same dict: the finalizer holds it
        self._delete_exclusive(leases)
        for lease in leases:
            lease.release(discard=True)
        self.events.close()

    collect = close


def _establish_error(down: Disconnected, status: Any) -> BaseException:
    """What kombu should see when no connection can be handed out.

    A refusal retrying will not fix keeps py-amqp's own error class (kombu
    does not retry it); anything else is :class:`BrokerUnavailable`, an
    ``OSError`` that kombu's retry policies count like py-amqp's refused
    connection.
    """
    reason = down.reason
    if status.fatal and isinstance(reason, (AccessRefused, NotAllowed)):
        error: BaseException = type(reason)(str(down), getattr(reason, "method_sig", None), reason.reply_code)
    else:
        error = BrokerUnavailable(str(down), down)
    error.__cause__ = down
    return error


def _mirror_endpoint(client: Any, endpoint: Any) -> None:
    """Show on the kombu connection which broker it is on (kombu's failover would have switched to it)."""
    if client.hostname == endpoint.host and client.port == endpoint.port:
        return
    from urllib.parse import urlparse

    for url in client.alt or []:
        parsed = urlparse(url) if isinstance(url, str) and "://" in url else None
        if parsed is not None and parsed.hostname in (endpoint.host, "localhost" if endpoint.host == "127.0.0.1" else None) \
                and (parsed.port or 5672) == endpoint.port:
            client.hostname, client.port = parsed.hostname, parsed.port or endpoint.port
            if "+" in parsed.scheme:
                client.transport_cls = parsed.scheme
            return


def _prefetch_option(value: Any) -> int:
    """The ``default_prefetch_count`` transport option, checked.

    Raises:
        TypeError: Not an int.
        ValueError: Out of AMQP's short range (0-65535).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"transport option default_prefetch_count must be an int, got {type(value).__name__}")
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"transport option default_prefetch_count must be in 0..65535, got {value}")
    return value


def _bound_consumers(chan: Any, prefetch_count: int) -> None:
    """A consumer that acks on a channel that never set a prefetch gets ``prefetch_count`` first.

    Per consumer (``global=False``), as kombu's ``Consumer(prefetch_count=)``.
    A channel that set its own QoS (``basic_qos``, even 0: Celery does) is
    left alone; ``no_ack`` consumers are not bounded by any prefetch (the
    broker ignores it for them).
    """
    basic_qos, basic_consume = chan.basic_qos, chan.basic_consume
    chosen = [False]

    def qos(*args: Any, **kwargs: Any) -> Any:
        result = basic_qos(*args, **kwargs)
        chosen[0] = True
        return result

    def consume(*args: Any, **kwargs: Any) -> Any:
        no_ack = kwargs.get("no_ack", args[3] if len(args) > 3 else False)
        if not no_ack and not chosen[0]:
            basic_qos(0, prefetch_count, False)
            chosen[0] = True
        return basic_consume(*args, **kwargs)

    chan.basic_qos, chan.basic_consume = qos, consume


def _call_if_alive(method: "weakref.WeakMethod[Any]", chan: Any) -> None:
    bound = method()
    if bound is not None:
        bound(chan)


def _collected(leases: dict[int, Any], queues: list[CallbackQueue]) -> None:
    """A kombu connection was dropped without ``close()``: its channels go back (any thread, never blocks).

    Its callback queue is closed too (two descriptors each, until EMFILE otherwise).
    """
    for lease in list(leases.values()):
        lease.abandon()
    leases.clear()
    for events in queues:
        events.close()


class _ConnectionView:
    """A channel's ``connection`` as kombu expects it: the AMQP connection, with this ``client``.

    The client is held weakly: the channel outlives it in the AMQP
    connection's channel table, and must not keep it alive.
    """

    __slots__ = ("_raw", "_client")

    def __init__(self, raw: Any, client: Any) -> None:
        object.__setattr__(self, "_raw", raw)
        object.__setattr__(self, "_client", weakref.ref(client))

    @property
    def client(self) -> Any:
        return self._client()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._raw, name, value)


class Transport(base.Transport):  # type: ignore[misc]
    """kombu transport ``carrot`` (``carrot+amqp://``, ``carrot+amqps://``)."""

    Connection = VirtualConnection
    can_parse_url = True
    default_port = 5672
    default_ssl_port = 5671
    driver_type = "amqp"
    driver_name = "carrot_kombu"

    connection_errors = (Disconnected, BrokerUnavailable, ReplyTimeout, Blocked) + tuple(
        amqp.Connection.connection_errors
    )
    channel_errors = tuple(amqp.Connection.channel_errors) + (ChannelLimitReached, PoolTimeout)
    recoverable_connection_errors = (Disconnected, ReplyTimeout) + tuple(amqp.Connection.recoverable_connection_errors)
    recoverable_channel_errors = tuple(amqp.Connection.recoverable_channel_errors)

    implements = base.Transport.implements.extend(asynchronous=True, heartbeats=True)

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)

    def driver_version(self) -> str:
        from ._version import __version__

        return __version__

    def establish_connection(self) -> VirtualConnection:
        """A view of the manager's live connection; waits only while an attempt is in progress.

        Raises:
            Disconnected: Not connected (at once, unless the first attempt
                is still running: then after at most ``connect_timeout``).
        """
        manager = manager_for_connection(self.client)
        manager.start()
        view = _wait_for_view(manager, float(self.client.connect_timeout or 5.0))
        try:
            _mirror_endpoint(self.client, view)
            connection = VirtualConnection(self, manager, view)
            _opened(manager, connection)
            return connection
        except Disconnected as down:
            raise _establish_error(down, manager.status()) from None

    def create_channel(self, connection: VirtualConnection) -> Any:
        return connection.channel()

    def close_connection(self, connection: VirtualConnection) -> None:
        connection.close()

    def _collect(self, connection: Optional[VirtualConnection]) -> None:
        if connection is not None:
            connection.close()

    def drain_events(self, connection: VirtualConnection, timeout: Optional[float] = None, **kwargs: Any) -> None:
        connection.drain_events(timeout=timeout)

    def verify_connection(self, connection: VirtualConnection) -> bool:
        return connection.usable

    def heartbeat_check(self, connection: VirtualConnection, rate: int = 2) -> None:
        # The manager's own thread sends heartbeats and judges liveness; a
        # loss shows here so that Celery's event loop restarts its consumer.
        connection.consumed = True  # only a consuming loop checks heartbeats
        connection.check()

    def get_heartbeat_interval(self, connection: VirtualConnection) -> Any:
        return connection.heartbeat

    def register_with_event_loop(self, connection: VirtualConnection, loop: Any) -> None:
        connection.in_event_loop = True
        _consumer_back(connection.manager)
        loop.add_reader(connection.fileno(), self.on_readable, connection, loop)

    def unregister_from_event_loop(self, connection: VirtualConnection, loop: Any) -> None:
        try:
            loop.remove(connection.fileno())
        except Exception:
            pass

    def on_readable(self, connection: VirtualConnection, loop: Any) -> None:
        """Celery's event loop: run what is queued for this connection, on the loop's thread."""
        try:
            connection.drain_events(timeout=0)
        except socket.timeout:
            pass

    def qos_semantics_matches_spec(self, connection: VirtualConnection) -> bool:
        props = connection.server_properties
        if props.get("product") == "RabbitMQ":
            from kombu.utils.text import version_string_as_tuple

            version = props.get("version")
            if not version:
                return True
            parsed = version_string_as_tuple(version.decode() if isinstance(version, bytes) else version)
            return bool(parsed < (3, 3) or parsed >= (4, 0))
        return True

    def as_uri(self, uri: str, include_password: bool = False, mask: str = "**") -> str:
        """The connection's current URL (password masked), as kombu's ``Connection.as_uri()``.

        kombu passes its ``hostname``: a URL, or (keyword settings, or a URL
        parsed into the fields) a host name; then the URL is the one of
        ``alt`` the connection is on, else it is built from the fields.
        """
        if "://" not in uri:
            uri = current_url(self.client) or self._uri_of_fields(include_password, mask)
        shown = uri if include_password else mask_url(uri)
        return shown if shown.startswith(TRANSPORT_PREFIX) else f"{TRANSPORT_PREFIX}{shown}"

    def _uri_of_fields(self, include_password: bool, mask: str) -> str:
        from kombu.utils.url import as_url

        client = self.client
        params = self.default_connection_params
        password = client.password or params["password"]
        return str(as_url(
            "amqps" if client.ssl else "amqp", client.hostname or params["hostname"], client.port or params["port"],
            client.userid or params["userid"], password if include_password else mask, client.virtual_host or "/",
        ))

    @property
    def default_connection_params(self) -> dict[str, Any]:
        return {
            "userid": "guest",
            "password": "guest",
            "port": self.default_ssl_port if self.client.ssl else self.default_port,
            "hostname": "localhost",
            "login_method": "PLAIN",
        }
