"""The public facade: :class:`ConnectionManager`."""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import os
import random
import threading
import weakref
from collections import abc
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from ._core import Core, abandon
from ._deadline import Deadline, check_timeout
from .config import Settings
from .consumers import Consumer
from .exceptions import CarrotKombuError, ConfigurationError, Disconnected
from .options import OPTION_NAMES
from ._handoff import Handoff, Timer
from .pool import Lease
from ._pending import Outcome
from .publisher import Publisher, Submission
from .retry import Backoff
from .status import ConnectionState, Status
from .topology import check_entity, declare_for_caller

if TYPE_CHECKING:
    import kombu

    from .view import ConnectionView

__all__ = ("ConnectionManager",)

logger = logging.getLogger("carrot_kombu")

#: Every manager alive in this process, for the fork hook.
_MANAGERS: "weakref.WeakSet[ConnectionManager]" = weakref.WeakSet()


class ConnectionManager:
    """One supervised AMQP connection shared by any number of threads.

    A background supervisor thread owns the connection: it connects with
    exponential backoff, notices loss and reconnects; the connection's own
    service thread sends heartbeats whatever the application is doing.
    Threads borrow channels from a bounded pool with :meth:`open_channel`,
    which returns a :class:`Lease` or raises
    :class:`~carrot_kombu.Disconnected` at once while there is no connection
    (Carrot's ``{:error, :disconnected}``).

    Args:
        url: kombu broker URL (``amqp://``, ``amqps://``; ``memory://`` for
            tests), several separated by ``;`` (before the next ``scheme://``,
            so a ``;`` inside a password is fine) or given as a list, for
            failover.  A URL overrides every option it expresses (host, port,
            credentials, vhost, query parameters ``heartbeat``,
            ``connect_timeout``, ``channel_max``, ``frame_max``, ``ssl``,
            ``ssl_*``); the other options still apply.
        username: Login, unless the URL has one.
        password: Password, unless the URL has one.  Never logged or shown.
        virtual_host: Virtual host, unless the URL names one.
        host: Broker host, unless the URL names one.
        port: Broker port, unless the URL names one.
        channel_max: Channels per connection to ask for (0: the broker's).
            The smaller of this and the broker's is used.
        frame_max: Largest frame to ask for in bytes (0: the broker's).  The
            smaller of this and the broker's is used.
        heartbeat: Heartbeat interval in seconds (0 disables; rounded up to
            whole seconds).
        connection_timeout: Seconds for one connection attempt (TCP, TLS and
            AMQP handshake).  Carrot's ``60000`` ms is ``60.0``.  With
            several brokers, one attempt is bounded by at most 5 s (or the
            heartbeat, if longer) so that a frozen node is left quickly.
        backoff: :class:`Backoff`, or a mapping of its fields.
        ssl_options: ``True`` or a mapping of py-amqp ssl options
            (``ca_certs``, ``certfile``, ``keyfile``, ``cert_reqs``,
            ``server_hostname``...) or Carrot's names (``cacertfile``,
            ``certfile``, ``keyfile``, ``verify``,
            ``server_name_indication``); certificates are verified by default.
        client_properties: Extra AMQP client properties (e.g.
            ``connection_name``).
        socket_options: TCP socket options (py-amqp ``socket_settings``),
            keyed by number or by name (``"TCP_NODELAY"``).
        pool_limit: Most channels leased at once.
        transport_options: Extra keyword arguments for the py-amqp connection.
        blocked_timeout: While the broker blocks the connection (resource
            alarm), a publish waits at most this many seconds for it to
            unblock, then raises :class:`~carrot_kombu.Blocked` (``None``:
            wait as long as the broker blocks).  A write already stuck
            half-way for that long drops the connection.
        max_pending: Most messages :meth:`publish` keeps waiting for their
            confirms at once (from all threads); more wait for a slot.
        consumer_threads: Most threads running the callbacks of
            :meth:`consume` (all consumers share them; started on demand,
            ended when idle).  One consumer's callbacks run in delivery order,
            one at a time; while every thread is busy, deliveries wait within
            each consumer's ``prefetch_count``.
        reply_timeout: Most seconds any request waits for the broker's reply
            (``queue_declare``, ``basic_get``, opening a channel...).  Then it
            raises :class:`~carrot_kombu.ReplyTimeout` and the channel is
            discarded; the connection itself is judged by its heartbeats.
        restart_after_fork: In a forked child, a manager that was started in
            the parent starts again at once (``True``), or stays stopped until
            ``start()`` is called (``False``: for a child that may never need
            the broker, such as a Celery prefork child before its first task;
            the ``carrot+amqp://`` transport starts it when the child first
            connects).  The parent's connection is never touched either way.

    Raises:
        ConfigurationError: If an option or URL is invalid (nothing is
            started, nothing is logged with a password).
    """

    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        *,
        username: str = "guest",
        password: str = "guest",
        virtual_host: str = "/",
        host: str = "localhost",
        port: int = 5672,
        channel_max: int = 0,
        frame_max: int = 0,
        heartbeat: float = 10,
        connection_timeout: float = 60.0,
        backoff: Union[Backoff, Mapping[str, Any], None] = None,
        ssl_options: Union[bool, Mapping[str, Any], None] = None,
        client_properties: Optional[Mapping[str, Any]] = None,
        socket_options: Optional[Mapping[Union[int, str], Any]] = None,
        pool_limit: int = 10,
        transport_options: Optional[Mapping[str, Any]] = None,
        blocked_timeout: Optional[float] = 30.0,
        max_pending: int = 1000,
        consumer_threads: int = 8,
        reply_timeout: float = 10.0,
        restart_after_fork: bool = True,
    ) -> None:
        # Every keyword above is a row of carrot_kombu.options.OPTIONS (a test
        # keeps them equal): Settings checks them all, by that table.
        self._settings: Settings = Settings.from_options(
            url, **{name: value for name, value in locals().items() if name in OPTION_NAMES}
        )
        self._max_pending = self._settings.max_pending
        self._lock = threading.Lock()
        # The finalizer holds this list (never the manager): it always sees
        # the current core, across restarts and forks.
        self._cores: list[Core] = [Core.build(self._settings, max_pending)]
        self._started_once = False
        self._restart_after_fork = self._settings.restart_after_fork
        finalizer = weakref.finalize(self, _abandon, self._cores)
        # At interpreter exit a manager still alive is stopped politely by
        # _stop_at_exit (weakref's own exit hook runs first and would log
        # "garbage-collected without stop()" and drop the connection).
        finalizer.atexit = False
        _MANAGERS.add(self)

    @property
    def _core(self) -> Core:
        return self._cores[0]

    # -- construction from what users already have -------------------------------

    @classmethod
    def from_url(cls, url: Union[str, Sequence[str]], **options: Any) -> "ConnectionManager":
        """Same as ``ConnectionManager(url, **options)``."""
        return cls(url, **options)

    @classmethod
    def from_connection(cls, connection: "kombu.Connection", **options: Any) -> "ConnectionManager":
        """Build a manager from an existing kombu ``Connection`` (its socket is not used).

        Takes the hosts and failover alternates (``shuffle`` shuffles their order
        once), credentials, vhost, ssl, heartbeat, connect timeout and transport
        options.  ``options`` override them.  A kombu heartbeat of 0 (kombu's
        default) keeps carrot_kombu's default of 10 s; pass ``heartbeat=0`` to
        disable heartbeats.

        Raises:
            ConfigurationError: For a transport other than py-amqp or memory.
        """
        url, derived = _settings_of(connection)
        derived.update(options)
        return cls(url, **derived)

    @classmethod
    def from_celery(cls, app: Any, url: Optional[str] = None, **overrides: Any) -> "ConnectionManager":
        """Build a manager from a Celery app's broker settings.

        Uses ``url`` (else ``broker_write_url``, else ``broker_url``),
        ``broker_use_ssl``, ``broker_transport_options`` and
        ``broker_failover_strategy`` through ``app.connection_for_write()``.
        Then, in this order of precedence: ``overrides``; the URL's own
        query parameters (``heartbeat``, ``connect_timeout``), as Celery
        honours them; ``broker_connection_timeout`` → ``connection_timeout``
        (Celery's default of 4 s included); the Celery settings you changed:
        ``broker_heartbeat`` → ``heartbeat``, ``broker_pool_limit`` →
        ``pool_limit``, ``broker_connection_max_retries`` →
        ``Backoff.max_tries`` (counted in rounds through the brokers).

        Celery's *default* values of ``broker_heartbeat`` (120 s) and
        ``broker_connection_max_retries`` (100, which would make the manager
        give up for good after about 25 minutes) are not taken: carrot_kombu's
        own defaults apply (10 s, retry for ever), and a log line says so.
        """
        from ._celery_settings import celery_options

        connection, options = celery_options(app, url)
        options.update(overrides)
        return cls.from_connection(connection, **options)

    # -- lifecycle -----------------------------------------------------------------

    def start(self, wait: Optional[float] = None) -> "ConnectionManager":
        """Start connecting in the background (idempotent).

        Args:
            wait: Also wait up to this many seconds for the first connection
                (``None``: return at once).

        Returns:
            The manager (``manager = ConnectionManager(url).start(wait=5)``).

        Raises:
            Disconnected: Not connected within ``wait`` seconds; the manager
                keeps trying in the background.  ``reason`` says why.
            TypeError, ValueError: ``wait`` is not a number of seconds.
        """
        seconds = None if wait is None else check_timeout("wait", wait)
        if self._core.stopping is not None:
            self.stop()  # an earlier stop() was interrupted: finish it before starting again
        with self._lock:
            core = self._core
            if core.supervisor is None:
                if self._started_once:
                    # A fresh pool and board for this run: a supervisor that
                    # did not stop in time still holds the old ones.
                    core = Core.build(self._settings, self._max_pending, previous=core)
                    self._cores[0] = core
                self._started_once = True
                core.start()
        if wait is not None and not self._wait_settled(seconds):
            status = self.status()
            why = "the broker refused the connection" if status.fatal else f"not connected within {wait}s"
            raise Disconnected(
                f"{why} ({status.state.value}" + (f": {status.last_error})" if status.last_error else ")")
                + "; still trying in the background",
                core.live.down_reason(),
            )
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Close the connection, its channels and every lease (idempotent).

        Leases still held raise :class:`~carrot_kombu.Disconnected` on use;
        publishes still waiting raise it at once.  The ``stopped`` event is
        delivered before this returns (within ``timeout``).

        Args:
            timeout: Most seconds this call takes, whatever the network does
                (``None``: until done; a polite close is bounded by
                ``reply_timeout``, an attempt in progress by its timeout).
        """
        deadline = Deadline.of("timeout", timeout)
        timeout = deadline.timeout
        with self._lock:
            core = self._core
            supervisor = core.take_supervisor()
        if supervisor is None:
            return
        core.publisher.abort("the manager stopped")
        core.live.close("manager stopped")  # a caller waiting in connection(timeout=...) returns now
        # Keep a slice of the time for delivering "stopped" on the event thread.
        reserve = 0.0 if timeout is None else min(0.25, timeout / 4)
        if not supervisor.stop(None if timeout is None else timeout - reserve):
            # Stuck writing to a silent peer, or in a connection attempt: cut
            # it now, so nobody stays blocked, and let the thread end alone.
            if not supervisor.on_own_thread():  # from a setup function it cannot wait for itself
                logger.warning("carrot_kombu supervisor did not stop within %ss; it will exit on its own", timeout)
            report = supervisor.retire()
            supervisor.abort(Disconnected("the manager stopped"))
            core.live.detach("manager stopped", None)
            if report:
                core.board.stopped()
                core.bus.post("stopped")
            else:
                # The loop ended just now and is posting "stopped" itself (or a
                # redone stop() already did): let it before the bus closes.
                supervisor.wait_ended(deadline.remaining())
        core.bus.close(deadline.remaining())
        core.stopping = None  # done: every step above is idempotent, so an interrupted stop() is redone whole

    def __enter__(self) -> "ConnectionManager":
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _wait_settled(self, timeout: Optional[float]) -> bool:
        """Like :meth:`wait_connected`, but also returns early on a refusal retrying will not fix."""
        def settled(status: Status) -> bool:
            return (status.state is ConnectionState.CONNECTED or status.state is ConnectionState.STOPPED
                    or status.gave_up or (status.state is ConnectionState.FAILED and status.fatal))

        board = self._core.board
        board.wait_for(settled, timeout)
        return board.state is ConnectionState.CONNECTED

    def wait_status(self, predicate: Callable[[Status], bool], timeout: Optional[float] = None) -> bool:
        """Block until ``predicate(status())`` is true (True) or ``timeout`` passes (False).

        ``predicate`` runs on the calling thread, under the manager's state
        lock: keep it a quick look at the :class:`Status` it gets.

        Raises:
            TypeError, ValueError: ``timeout`` is not a number of seconds.
        """
        timeout = check_timeout("timeout", timeout)
        return bool(self._core.board.wait_for(predicate, timeout))

    def connection(self, timeout: Optional[float] = 0) -> "ConnectionView":
        """A view of the live connection, waiting up to ``timeout`` for one (``0``: at once).

        For integrations that present the manager's connection as their own
        (the ``carrot+amqp://`` kombu transport): what the broker negotiated,
        whether it is still alive, a queue for kombu callbacks.  A view never
        outlives its connection: after a loss it stays dead.

        Raises:
            Disconnected: No live connection within ``timeout``; ``reason`` says why.
        """
        from .view import ConnectionView

        timeout = check_timeout("timeout", timeout)
        core = self._core
        if core.supervisor is None:
            raise Disconnected("manager is not started" if not self._started_once else "manager is stopped")
        link = core.live.current() if timeout == 0 else core.live.wait(timeout)
        if link is None:
            raise core.live.down_error()
        return ConnectionView(link)

    def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Block until connected; False on timeout, or if stopped or given up.

        A refusal retrying soon will not fix (``status().fatal``: wrong
        password...) does not end the wait: the manager retries it at
        ``Backoff.max``, so a fix on the broker's side is picked up.
        ``start(wait=...)`` is the call that gives up at once on it.
        """
        def settled(status: Status) -> bool:
            return status.state is ConnectionState.CONNECTED or status.state is ConnectionState.STOPPED or status.gave_up

        timeout = check_timeout("timeout", timeout)
        board = self._core.board
        board.wait_for(settled, timeout)
        return board.state is ConnectionState.CONNECTED

    # -- state -----------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._core.board.state

    @property
    def connected(self) -> bool:
        return self._core.board.state is ConnectionState.CONNECTED

    @property
    def blocked(self) -> bool:
        """True while the broker has blocked publishing (resource alarm)."""
        return self._core.board.current.blocked

    def status(self) -> Status:
        """A consistent snapshot; ``status().as_dict()`` is JSON-ready."""
        core = self._core
        return core.board.snapshot(core.pool.counts())

    # -- channels ----------------------------------------------------------------------

    def open_channel(self, timeout: Optional[float] = 5.0) -> Lease:
        """Lease a channel from the bounded pool.

        Args:
            timeout: Most seconds this call takes: waiting for a free slot
                when all ``pool_limit`` channels are leased, and the broker's
                answer when a new channel is opened (``None``: as long as it
                takes, the answer bounded by ``reply_timeout``).

        Raises:
            Disconnected: At once while not connected; its ``reason`` (and
                ``__cause__``) is the last connection error.
            PoolTimeout: No channel was released within ``timeout`` (the
                message says whether the pool or the broker's
                ``channel_max`` is the limit, and if the connection looks
                dead), or the broker did not answer ``channel.open`` in time.
            Blocked: A new channel was needed while the broker blocked the
                connection (a resource alarm) past ``timeout`` or
                ``blocked_timeout``.
        """
        timeout = check_timeout("timeout", timeout)
        core = self._core
        if core.supervisor is None:
            raise Disconnected("manager is not started" if not self._started_once else "manager is stopped")
        return core.pool.acquire(timeout)

    def release(self, lease: Lease) -> None:
        """Give a lease back; same as ``lease.release()``."""
        lease.release()

    def channel(self, timeout: Optional[float] = 5.0) -> Lease:
        """``with manager.channel() as ch:`` leases a channel for the block.

        The channel goes back to the pool on exit, or is discarded if the
        block failed with a channel or connection error or was interrupted.
        (The lease is its own context manager: no generator frame sits
        between the block and the release, so nothing is left for the
        garbage collector when an interrupt lands in the exit.)
        """
        return self.open_channel(timeout)

    def drain_events(self, timeout: Optional[float] = None) -> None:
        """Run callbacks of kombu consumers on leases in this thread (kombu's ``drain_events``).

        The thread that reads the connection never runs user code: it queues
        deliveries (and ``on_return`` callbacks...) for the consumers
        registered on leases (``kombu.Consumer(lease, callbacks=[...])``);
        this runs them here, one at a time, in arrival order, after waiting
        up to ``timeout`` seconds for the first.

        Raises:
            Disconnected: While not connected (or lost meanwhile).
            socket.timeout: Nothing arrived within ``timeout``.
        """
        timeout = check_timeout("timeout", timeout)
        self._core.live.require().drain_events(timeout)

    # -- topology recovery ----------------------------------------------------------------

    def declare(self, *entities: Any) -> None:
        """Declare kombu ``Exchange``/``Queue`` entities now and on every new connection.

        A ``Queue`` brings its exchange and bindings; ``Queue("")`` (a
        server-named queue) is declared exclusive, so it ends with its
        connection, and its new name is written back on every connection.
        On a reconnect the entities are declared again *before* the manager
        reports ``connected``; one that fails then is reported as degraded
        and retried, without keeping the rest from working.  While
        disconnected they are only registered.

        Every entity is checked first, connected or not: one that could
        never be declared raises here and nothing is registered (it would
        otherwise fail every later connection, where nobody can be told).
        Sixteen or more are written in pipelined chunks (a round trip per
        chunk, not per entity, as on a reconnect); a chunk the broker
        refuses is declared again one by one, so the error is still the
        broker's answer for the entity it refused.

        Raises:
            TypeError: An argument is not a kombu ``Queue``/``Exchange`` (a
                queue name alone: ``kombu.Queue("jobs")``), or a part of it
                has the wrong type; the message names it.
            ValueError: A name or routing key over 255 bytes, an argument
                table AMQP cannot encode; the message names the field.
            Exception: What the broker answered now (e.g. ``PreconditionFailed``
                for an exchange declared before with other arguments); the
                refused entities are *not* registered.
        """
        for index, entity in enumerate(entities):
            check_entity(entity, f"declare() argument {index + 1}")
        topology = self._core.topology
        added = topology.add_entities(entities)
        try:
            lease = self.open_channel()
        except Disconnected:
            return  # declared on connect
        try:
            with lease:
                declare_for_caller(self._core.live.current(), lease.channel, entities, topology.server_named)
        except BaseException:
            topology.remove_entities(added)
            raise

    def add_setup(self, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Run ``fn(channel)`` on every new connection (and now, if connected).

        For what :meth:`declare` cannot express (``basic_qos`` defaults,
        queues with computed arguments...).  Setup runs after the declared
        entities, in the order added.  If it raises on a new connection, the
        attempt counts as failed: ``connect_failed`` carries the error, the
        manager does not report ``connected`` and retries with its backoff.
        If it raises now, it is not registered and the error propagates.
        Returns ``fn`` (usable as a decorator).

        Raises:
            TypeError: ``fn`` is not callable.
        """
        _check_callable("add_setup() fn", fn)
        topology = self._core.topology
        added = topology.add_setup(fn)
        try:
            lease = self.open_channel()
        except Disconnected:
            return fn
        try:
            with lease:
                fn(lease.channel)
        except BaseException:
            if added:
                topology.remove_setup(fn)
            raise
        return fn

    def remove_setup(self, fn: Callable[[Any], Any]) -> None:
        """Stop running ``fn`` on new connections (no error if absent).

        Raises:
            TypeError: ``fn`` is not callable (it could never have been added).
        """
        _check_callable("remove_setup() fn", fn)
        self._core.topology.remove_setup(fn)

    # -- consumers that survive reconnects ----------------------------------------------------

    def consume(
        self,
        queue: Union[str, "kombu.Queue"],
        callback: Callable[[Any, Any], Any],
        *,
        prefetch_count: Optional[int] = None,
        no_ack: bool = False,
        arguments: Optional[Mapping[str, Any]] = None,
        declare: bool = True,
    ) -> Consumer:
        """Consume ``queue`` now (if connected) and after every reconnect.

        ``callback(body, message)`` runs on one of the manager's
        ``consumer_threads`` dispatcher threads (one delivery at a time per
        consumer, in order), never on the thread that reads the connection
        (a body that cannot be decoded is rejected without requeue and
        logged, as Celery does); ``message.ack()``, ``reject()`` and
        ``requeue()`` are safe there.  Consumers share channels:
        ``message.channel`` is this consumer's own view of its channel
        (see :ref:`consumer-channel`): it settles only this consumer's
        deliveries, ``close()`` on it cancels this consumer alone,
        declares and publishes on it run on a pool lease (a refusal raises
        the broker's error there and closes no shared channel), and what
        would reach the other consumers (``basic_qos``, another
        consumer's ``basic_cancel``, ``ack(multiple=True)``...) raises
        :class:`~carrot_kombu.ConsumerChannelRefused`.  An ack for a delivery
        of a lost connection (or sent after :meth:`Consumer.cancel`) is
        dropped: the broker redelivers the message.  A consumer the broker
        cancels (its queue was deleted, its node went down) or whose channel
        it closes because of it (406) emits
        ``consumer_cancelled(queue)`` once, shows in ``status().degraded`` and
        is subscribed again, with backoff, until the queue is back; one lost
        again within 5 s of coming back (a poison message) waits
        ``Backoff.min``, doubling up to ``Backoff.max``, before the next try.

        A callback that raises without having settled its message: the
        delivery is rejected with requeue, and when it raises again on the
        redelivered message, rejected without requeue (dead-lettered if the
        queue has a dead-letter exchange, else dropped); each time a log
        line with the exception and ``consumer_error(queue, error,
        outcome)`` (``"requeued"``, ``"rejected"``, ``"settled"`` when the
        callback had acked or rejected it, ``"no_ack"``).  The consumer goes
        on with the next delivery.

        Args:
            queue: A kombu ``Queue`` or a queue name (``kombu.Queue(name)``).
            callback: ``callback(body, message)``, kombu message semantics.
            prefetch_count: ``basic_qos`` prefetch for this consumer (per consumer on a shared channel):
                at most this many deliveries are unacknowledged at once.
                ``None`` (default): 100, so that a backlog is never pulled into
                memory whole; ``0``: no limit (the whole backlog may arrive).
            no_ack: Automatic acknowledgement.
            arguments: ``basic.consume`` arguments.
            declare: Declare the queue (with its exchange and bindings) on
                every connection before subscribing, as kombu's ``Consumer``
                does; ``False`` for a queue someone else declares.

        Returns:
            The consumer; ``consumer.cancel()`` ends it.

        Raises:
            TypeError: ``queue`` is not a name or a kombu ``Queue``,
                ``callback`` is not callable, ``prefetch_count`` is not an
                int, ``no_ack``/``declare`` not a bool, ``arguments`` not a
                mapping (or ``x-priority`` in it not an int,
                ``x-cancel-on-ha-failover`` not a bool); the message names
                the parameter.
            ValueError: ``prefetch_count`` outside 0-65535 (a
                :class:`~carrot_kombu.ConfigurationError`), a queue name over
                255 bytes or ``arguments`` AMQP cannot encode; the message
                names the field.  Nothing is registered.
            Exception: What the broker answered now (e.g. ``NotFound`` for a
                queue that does not exist with ``declare=False``,
                ``PreconditionFailed`` for one declared before with other
                arguments, ``InvalidCommand`` for an exchange of unknown
                type, after which the connection is made again); nothing
                stays registered.  The queue's declare (a passive one with
                ``declare=False``) is tried on a channel of its own first, so
                that a refusal closes no channel shared with other consumers.
        """
        import kombu

        from .topology import check_consume_arguments, refused_declare

        if isinstance(queue, str):
            queue = kombu.Queue(_checked_name("consume() queue", queue))
        elif not isinstance(queue, kombu.Queue):
            raise TypeError(f"consume() queue must be a str or a kombu Queue, got {type(queue).__name__}")
        check_entity(queue, "consume() queue")
        _check_callable("consume() callback", callback)
        if prefetch_count is not None:
            if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
                raise TypeError(f"consume() prefetch_count must be an int or None, got {type(prefetch_count).__name__}")
            if not 0 <= prefetch_count <= 65535:
                raise ConfigurationError(f"consume() prefetch_count must be 0-65535, got {prefetch_count!r}")
        for name, flag in (("no_ack", no_ack), ("declare", declare)):
            if not isinstance(flag, bool):
                raise TypeError(f"consume() {name} must be a bool, got {type(flag).__name__}")
        check_consume_arguments("consume() arguments", arguments)
        core = self._core
        consumer = Consumer(core.consumers, queue, callback, prefetch_count, no_ack,
                            dict(arguments or {}) or None, declare=declare)
        try:
            # From here on an exception (a 404, or one raised into this thread
            # by a signal) cancels it: the caller never got it, and nothing
            # may stay registered or subscribed.
            core.consumers.add(consumer)
            consumer.start()
            link = core.live.current()
            if link is not None:
                refused: Optional[BaseException] = None
                try:
                    consumer.subscribe(link)
                except Disconnected as exc:
                    refused = refused_declare(exc)  # None: subscribed on the next connection
                if refused is not None:
                    # Its declare closed the connection (503 unknown exchange
                    # type...): it would on every reconnect.  Once the manager
                    # says so (a few ms), so that a wait_connected() right after
                    # waits for the next one.  Raised outside the handler: the
                    # Disconnected's chain leads to it (a loop in the chain).
                    core.board.wait_for(lambda status: status.state is not ConnectionState.CONNECTED, 2.0)
                    raise refused
        except BaseException:
            consumer.cancel()
            raise
        return consumer

    # -- confirmed publishing -------------------------------------------------------------------

    def publish(
        self,
        body: Any,
        *,
        exchange: Any = "",
        routing_key: str = "",
        headers: Optional[Mapping[str, Any]] = None,
        serializer: Optional[str] = None,
        mandatory: bool = False,
        timeout: Optional[float] = 30.0,
        republish: bool = True,
        **properties: Any,
    ) -> None:
        """Publish and return once the broker has confirmed the message.

        Any number of threads may publish at once: their messages share one
        confirm channel and their confirms are awaited in parallel.  Across a
        reconnect, messages not yet confirmed are published again
        (at-least-once: a message may arrive twice, never zero times after
        this returned).  At most ``max_pending`` messages wait for confirms;
        more wait for a slot, within ``timeout``.

        Args:
            body: Serialized like kombu's ``Producer.publish`` (bytes and str
                as they are, anything else with ``serializer``, default JSON).
            exchange: Exchange name (or kombu ``Exchange``); ``""`` is the default exchange.
            routing_key: Routing key.
            headers: Message headers.
            serializer: kombu serializer name.
            mandatory: Fail with :class:`~carrot_kombu.Unroutable` if no queue gets it.
            timeout: Seconds to wait for the confirm (also while disconnected).
                ``0`` waits for nothing: the message is written if that can be
                done at once, and unless its confirm was already read (on a
                LAN it almost never is) the call raises ``PublishTimeout``
                (``outcome`` ``"unknown"`` if written, ``"not_sent"`` if not).
            republish: ``False``: at most once for this message.  If its
                connection (or the confirm channel) is lost after it was
                written and before its confirm, it is not published again and
                :class:`~carrot_kombu.OutcomeUnknown` is raised (it may or may
                not have been stored).  Not yet written when the loss came: it
                is written once on the next connection, as usual.
            **properties: AMQP properties (``delivery_mode`` defaults to 2,
                persistent; ``priority``, ``expiration`` (a str of
                milliseconds), ``message_id``...).

        Raises:
            TypeError, ValueError: The message cannot be sent as given (the
                error names the field); nothing was sent.
            Disconnected: At once when waiting cannot help: the manager is
                stopped (or not started), the broker refused the connection
                for a reason retrying will not fix, or the policy gave up.
            PublishTimeout: No confirm in time; ``outcome`` is ``"unknown"`` if
                the message was written (it may be stored), ``"not_sent"`` if not.
            Nacked: The broker refused it.
            Rejected: The broker refused it and closed the channel (404 no
                such exchange, 406 too large...); ``reply_code`` and
                ``reply_text`` say why.
            Unroutable: ``mandatory`` and no queue matched.
            Blocked: The broker blocked the connection longer than
                ``blocked_timeout``, before the message was written (nothing
                was sent) or while its confirm was awaited (it may have been
                stored: the message says which).
            OutcomeUnknown: ``republish=False`` and the connection was lost
                between the write and the confirm.
        """
        # publish_many([body]) without its batch bookkeeping: this is the hot
        # path (carrot_kombu.tracing wraps it to trace it as publish_many does).
        deadline = Deadline.of("timeout", timeout)
        publisher = self._publisher_for(headers, exchange, routing_key, serializer, mandatory, republish)
        publisher.publish_one(
            body, exchange=getattr(exchange, "name", exchange), routing_key=routing_key, headers=headers,
            serializer=serializer, mandatory=mandatory, deadline=deadline, properties=properties,
            republish=republish,
        )

    def publish_many(
        self,
        bodies: Iterable[Any],
        *,
        exchange: Any = "",
        routing_key: str = "",
        headers: Optional[Mapping[str, Any]] = None,
        serializer: Optional[str] = None,
        mandatory: bool = False,
        timeout: Optional[float] = 30.0,
        republish: bool = True,
        **properties: Any,
    ) -> None:
        """Publish a batch and return once the broker confirmed every message.

        Every message is checked first (nothing is sent if one cannot be),
        then all are written and their confirms awaited together: one round
        trip for the batch instead of one per message.  Same options and
        errors as :meth:`publish`; the error names the first message that
        failed, after every message of the batch was settled or ``timeout``
        passed.
        """
        self._publish_many(
            bodies, exchange=exchange, routing_key=routing_key, headers=headers, serializer=serializer,
            mandatory=mandatory, timeout=timeout, republish=republish, properties=properties,
        )

    def _publish_many(
        self, bodies: Iterable[Any], *, exchange: Any, routing_key: str, headers: Optional[Mapping[str, Any]],
        serializer: Optional[str], mandatory: bool, timeout: Optional[float], republish: bool,
        properties: dict[str, Any], headers_each: Optional[Sequence[Mapping[str, Any]]] = None,
        report: Optional[Callable[[list[Outcome]], None]] = None,
    ) -> None:
        """:meth:`publish_many`, with per-message headers and outcomes (for :mod:`carrot_kombu.tracing`)."""
        deadline = Deadline.of("timeout", timeout)
        _check_bodies(bodies)
        publisher = self._publisher_for(headers, exchange, routing_key, serializer, mandatory, republish)
        name = getattr(exchange, "name", exchange)
        publisher.publish_many(
            bodies, exchange=name, routing_key=routing_key, headers=dict(headers or {}),
            serializer=serializer, mandatory=mandatory, deadline=deadline, properties=properties,
            republish=republish, headers_each=headers_each, report=report,
        )

    def publish_async(
        self,
        body: Any,
        *,
        exchange: Any = "",
        routing_key: str = "",
        headers: Optional[Mapping[str, Any]] = None,
        serializer: Optional[str] = None,
        mandatory: bool = False,
        timeout: Optional[float] = 30.0,
        republish: bool = True,
        **properties: Any,
    ) -> "concurrent.futures.Future[None]":
        """Publish without waiting: a future resolved once the broker confirmed the message.

        Same arguments and guarantees as :meth:`publish`; the future's
        exception is what :meth:`publish` would raise (``PublishTimeout``
        once ``timeout`` passes).  The message is written before this
        returns when it can be without waiting; otherwise (no free slot,
        a blocked connection) a helper thread of the manager writes it.  No
        thread waits per call: the confirm completes the future (its
        ``result()`` and its timeout never wait for anybody's
        done-callback), and its done-callbacks run, in order, on the
        manager's callback thread (never on the thread reading the
        connection).  Keep them short: a slow one delays the callbacks of
        other futures, not their results.  A done-callback may wait for
        another ``publish_async`` future's ``result()``, but not for a
        future's own done-callbacks to have run.  ``future.cancel()``
        forgets the message: it is not published again after a reconnect
        (if already written, it may have been stored).

        Raises:
            TypeError, ValueError: At once, as :meth:`publish` (nothing was sent).
            Disconnected: At once when waiting cannot help (stopped, refused).
        """
        future = _PublishFuture(self._core.publisher.callbacks)
        completions = self._core.publisher.completions
        timer: list[Timer] = []

        def complete(submission: Submission) -> None:
            # On the completion thread, which runs no user code: the future's
            # done-callbacks are handed to the callback thread (_PublishFuture).
            if timer:
                completions.cancel(timer[0])
            submission.record()
            if not future.set_running_or_notify_cancel():
                return
            if submission.error is None:
                future.set_result(None)
            else:
                future.set_exception(submission.error)

        submission = self._submit(
            [body], exchange=exchange, routing_key=routing_key, headers=headers, serializer=serializer,
            mandatory=mandatory, timeout=timeout, republish=republish, properties=properties,
            on_settled=lambda s: completions.call(lambda: complete(s)),
        )
        if submission.deadline.at is not None and not submission.settled:
            timer.append(completions.call_at(submission.deadline.at, submission.expire))
        def on_done(done: "concurrent.futures.Future[None]") -> None:
            if done.cancelled():
                submission.cancel()
                if timer:
                    completions.cancel(timer[0])  # a live timer would keep the completion thread up

        future.add_internal_callback(on_done)
        return future

    def _submit(
        self, bodies: Iterable[Any], *, exchange: Any, routing_key: str, headers: Optional[Mapping[str, Any]],
        serializer: Optional[str], mandatory: bool, timeout: Optional[float], republish: bool,
        properties: dict[str, Any], on_settled: Callable[[Submission], None], flush: bool = True,
    ) -> Submission:
        """Publish without waiting (``publish_async``, :mod:`carrot_kombu.aio`): ``on_settled`` reports.

        ``on_settled`` runs on whichever thread settles the last message,
        under the publisher's lock: it must only hand off.  The caller
        enforces the deadline (``submission.expire()``).  With ``flush=False``
        the caller must call ``publisher.flush()`` soon.
        """
        deadline = Deadline.of("timeout", timeout)
        publisher = self._publisher_for(headers, exchange, routing_key, serializer, mandatory, republish)
        name = getattr(exchange, "name", exchange)
        pendings = publisher.encode_many(
            bodies, exchange=name, routing_key=routing_key, headers=dict(headers or {}), serializer=serializer,
            mandatory=mandatory, properties=properties, republish=republish,
        )
        submission, rest = publisher.submit(pendings, deadline, on_settled, flush)
        if rest:
            publisher.waiting.call(lambda: publisher.send_waiting(submission, rest))
        return submission

    def _publisher_for(self, headers: Any, exchange: Any, routing_key: Any, serializer: Any, mandatory: Any,
                       republish: Any) -> Publisher:
        """Check a publish's arguments and the manager's state; the publisher, its channel asked for."""
        if headers is not None and not isinstance(headers, abc.Mapping):
            raise TypeError(f"headers must be a mapping, got {type(headers).__name__}")
        _check_publish_args(exchange, routing_key, serializer, mandatory, republish)
        core = self._core
        self._check_can_publish(core)
        publisher = core.publisher
        publisher.used = True
        link = core.live.current()
        if link is not None and publisher.needs(link.generation):
            # Opened by the supervisor, not here: opening takes up to two round
            # trips bounded by reply_timeout, and this caller's own timeout may
            # be shorter (its messages wait for the channel within it).
            core.inbox.replace_publisher_channel(link.generation)
        return publisher

    def _check_can_publish(self, core: Core) -> None:
        """Fail at once when waiting for a connection cannot help."""
        supervisor = core.supervisor
        if supervisor is None:
            raise Disconnected("manager is not started" if not self._started_once else "manager is stopped")
        if supervisor.on_own_thread():
            # A setup function: the confirm channel is attached after it, on
            # this very thread, so the publish could only time out.
            raise CarrotKombuError(
                "publish() cannot be called from a setup function (it runs before the connection is "
                "served); publish on the channel the setup function receives"
            )
        status = core.board.current
        if status.state is ConnectionState.FAILED and (status.fatal or status.gave_up):
            raise core.live.down_error()

    # -- events --------------------------------------------------------------------------

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        """Subscribe ``callback`` to ``event``; returns it (usable as a decorator).

        Events: ``connecting()``, ``connected()``, ``connect_failed(error,
        delay)`` (``delay`` is ``None`` when giving up), ``disconnected(error)``,
        ``blocked(reason)``, ``unblocked()``, ``stopped()``,
        ``consumer_cancelled(queue)``, ``consumer_error(queue, error,
        outcome)`` (a :meth:`consume` callback raised), ``degraded(what, error)`` (a declared
        entity or a consumer the broker cannot serve right now) and
        ``recovered(what)``.  Callbacks run in order on one dispatcher
        thread, never under an internal lock; an exception in a callback is
        logged and ignored.

        Raises:
            TypeError: ``callback`` is not callable.
            ConfigurationError: ``event`` is not one of these names.
        """
        _check_event_name(event)
        _check_callable("on() callback", callback)
        return self._core.bus.on(event, callback)

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        """Unsubscribe ``callback`` from ``event`` (no error if absent).

        Raises:
            ConfigurationError: ``event`` is not an event name.
        """
        _check_event_name(event)
        self._core.bus.off(event, callback)

    # -- fork safety -------------------------------------------------------------------------

    def _after_fork_in_child(self) -> None:
        """Start afresh in a forked child; the parent's connection is never touched."""
        old = self._core
        link = old.live.forget_after_fork()
        old.pool.forget_after_fork()
        if link is not None:
            link.disown()
        was_started = old.supervisor is not None
        old.supervisor = None  # the parent's thread: not in this process
        self._lock = threading.Lock()
        self._cores[0] = Core.build(self._settings, self._max_pending, previous=old, forked=True)
        if was_started and self._restart_after_fork:
            self.start()

    # -- introspection -----------------------------------------------------------------------

    @property
    def settings(self) -> Settings:
        """The validated configuration."""
        return self._settings

    def __repr__(self) -> str:
        status = self.status()
        pool = status.pool
        return (
            f"<ConnectionManager [{status.state.value} {status.broker} | "
            f"Pool: {pool.leased} leased, {pool.idle} idle, limit {pool.limit}]>"
        )


def _check_bodies(bodies: Any) -> None:
    """publish_many()'s ``bodies``: TypeError unless an iterable of message bodies."""
    # A str/bytes is iterable (one message per character) and a mapping
    # iterates its keys: each is almost surely one message meant for publish().
    if isinstance(bodies, (str, bytes, bytearray, memoryview, abc.Mapping)) or not isinstance(bodies, abc.Iterable):
        raise TypeError(
            f"publish_many() bodies must be an iterable of message bodies (a list...), got {type(bodies).__name__}"
            + ("; to publish one message use publish()" if isinstance(bodies, (str, bytes, bytearray, abc.Mapping))
               else "")
        )


def _check_callable(name: str, value: Any) -> None:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def _check_event_name(event: Any) -> None:
    if not isinstance(event, str):
        raise TypeError(f"event must be a str (an event name), got {type(event).__name__}")


def _check_publish_args(exchange: Any, routing_key: Any, serializer: Any, mandatory: Any,
                        republish: Any = True) -> None:
    """The arguments of publish() that are not the message itself; TypeError naming the parameter."""
    if (type(exchange) is str and type(routing_key) is str and type(mandatory) is bool  # noqa: E721
            and serializer is None and type(republish) is bool):  # noqa: E721
        return  # the common call, checked without the import below (publish is a hot path)
    import kombu

    if not isinstance(exchange, (str, kombu.Exchange)):
        raise TypeError(f"exchange must be a str or a kombu Exchange, got {type(exchange).__name__}")
    if not isinstance(routing_key, str):
        raise TypeError(f"routing_key must be a str, got {type(routing_key).__name__}")
    if serializer is not None and not isinstance(serializer, str):
        raise TypeError(f"serializer must be a str (a kombu serializer name) or None, got {type(serializer).__name__}")
    if not isinstance(mandatory, bool):
        raise TypeError(f"mandatory must be a bool, got {type(mandatory).__name__}")
    if not isinstance(republish, bool):
        raise TypeError(f"republish must be a bool, got {type(republish).__name__}")


def _checked_name(name: str, value: str) -> str:
    from .topology import check_shortstr

    check_shortstr(name, value)
    return value


def _settings_of(connection: "kombu.Connection") -> tuple[Union[str, list[str], None], dict[str, Any]]:
    """The URL(s) and options a kombu connection stands for (see :meth:`ConnectionManager.from_connection`).

    Raises:
        ConfigurationError: For a transport other than py-amqp or memory.
    """
    transport = connection.transport_cls
    scheme = transport if isinstance(transport, str) else getattr(transport, "driver_type", "")
    if _is_carrot_transport(transport):
        from .urls import connection_urls

        return connection_urls(connection), _connection_options(connection, transport_options=False)
    if scheme == "memory":
        return "memory://", {}
    if scheme not in ("amqp", "amqps", "pyamqp"):
        raise ConfigurationError(f"from_connection: transport {scheme!r} is not supported (py-amqp or memory)")
    url: Optional[list[str]] = [u for u in connection.alt if u] or None
    if url and connection.failover_strategy is kombu_failover("shuffle"):
        random.shuffle(url)
    derived: dict[str, Any] = dict(
        host=connection.hostname or "localhost",
        username=connection.userid or "guest",
        password=connection.password or "guest",
        virtual_host=connection.virtual_host or "/",
    )
    if connection.port:
        derived["port"] = connection.port
    derived.update(_connection_options(connection, transport_options=True))
    return url, derived


def _connection_options(connection: "kombu.Connection", transport_options: bool) -> dict[str, Any]:
    """ssl, heartbeat, connect timeout (and transport options) a kombu connection sets."""
    derived: dict[str, Any] = {}
    if connection.ssl:
        derived["ssl_options"] = dict(connection.ssl) if isinstance(connection.ssl, Mapping) else True
    if connection.heartbeat:
        derived["heartbeat"] = connection.heartbeat
    if connection.connect_timeout:
        derived["connection_timeout"] = float(connection.connect_timeout)
    if transport_options and connection.transport_options:
        derived["transport_options"] = dict(connection.transport_options)
    return derived


def _is_carrot_transport(transport: Any) -> bool:
    if isinstance(transport, str):
        return transport.split("+", 1)[0] == "carrot" or transport == "carrot_kombu.transport:Transport"
    return getattr(transport, "driver_name", None) == "carrot_kombu"


def kombu_failover(name: str) -> Any:
    from kombu.connection import failover_strategies

    return failover_strategies.get(name)


@atexit.register
def _stop_at_exit() -> None:
    """At interpreter exit: close every started manager's connection politely, briefly."""
    for manager in list(_MANAGERS):
        if manager._core.supervisor is None:
            continue
        try:
            manager.stop(timeout=1.0)
        except Exception:  # noqa: BLE001 - exiting anyway
            logger.debug("ignored error while stopping a manager at exit", exc_info=True)


def _abandon(cores: list[Core]) -> None:
    abandon(cores[0])


def _after_fork_in_child() -> None:
    for manager in list(_MANAGERS):
        try:
            manager._after_fork_in_child()
        except Exception:  # a hook must never break the child
            logger.exception("carrot_kombu: could not reset a manager after fork")


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _PublishFuture(concurrent.futures.Future[None]):
    """``publish_async``'s future: done-callbacks run on the manager's callback thread.

    ``concurrent.futures`` runs done-callbacks inside ``set_result()`` on the
    completing thread; that thread (the completion thread, which also
    expires every future at its deadline) must not run user code, or one
    caller's slow callback would delay every other caller's result and
    timeout.  So each callback is handed to ``callbacks`` instead.
    """

    def __init__(self, callbacks: Handoff) -> None:
        super().__init__()
        self._carrot_callbacks = callbacks

    def add_done_callback(self, fn: Callable[["concurrent.futures.Future[None]"], object]) -> None:
        callbacks = self._carrot_callbacks

        def hand_over(future: "concurrent.futures.Future[None]") -> None:
            callbacks.call(lambda: _run_callback(fn, future))

        super().add_done_callback(hand_over)

    def add_internal_callback(self, fn: Callable[["concurrent.futures.Future[None]"], object]) -> None:
        """A callback of ours (never blocks, no user code): runs where the future completes."""
        super().add_done_callback(fn)


def _run_callback(fn: Callable[["concurrent.futures.Future[None]"], object],
                  future: "concurrent.futures.Future[None]") -> None:
    try:
        fn(future)
    except Exception:  # noqa: BLE001 - as concurrent.futures does: logged, the others still run
        logger.exception("carrot_kombu: exception calling a publish_async done-callback for %r", future)
