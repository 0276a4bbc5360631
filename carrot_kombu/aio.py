"""asyncio on the same supervised connection: :class:`AsyncConnectionManager`.

An asyncio face over one :class:`~carrot_kombu.ConnectionManager`, not a
second connection stack: the supervisor, the confirm channel, the pending
table, reconnects and republishing are the manager's.  The event loop never
waits on a lock or a socket for a publish:

* ``await m.publish(...)`` encodes and checks the message on the loop
  (``TypeError``/``ValueError`` at once), writes it without waiting when it
  can (nothing is ever waited for on the loop: a blocked connection or a
  full outgoing buffer hands the write to the manager's helper thread), and
  awaits a future that the confirm completes.  While the loop keeps
  publishing it reads the connection itself (``_pyamqp.loopturn``) and
  completes the future directly; otherwise the thread reading the
  connection does, with ``loop.call_soon_threadsafe``.  No thread per call.
* Consuming builds on the public ``manager.consume(queue, callback,
  prefetch_count=...)``: the callback, on the consumer's worker thread,
  hands each delivery to the loop; the buffer holds at most
  ``prefetch_count`` deliveries (the worker waits when it is full, and the
  broker sends no more than ``prefetch_count`` unacknowledged ones).
* What does blocking I/O by design (starting a subscription, ``declare``,
  ``stop``, cancelling a consumer) runs in the loop's default executor:
  rare calls, never the publish path.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, NamedTuple, Optional, Union

import kombu

from ._deadline import check_timeout
from ._nowait import WouldWait, nowait
from .consumers import Consumer
from .events import EVENTS
from .exceptions import CarrotKombuError, ConfigurationError, Disconnected
from .manager import ConnectionManager, _check_bodies
from .publisher import Publisher, Submission
from .status import ConnectionState, Status

__all__ = ("AsyncConnectionManager", "AsyncConsumer", "AsyncMessage", "Event")

logger = logging.getLogger("carrot_kombu")

#: Events kept for an ``events()`` iterator that does not keep up; older ones are dropped.
EVENT_BUFFER = 1000
#: Most seconds ``async with`` spends stopping the manager after the start failed.
FAILED_START_STOP = 1.0
#: Seconds between two looks, by a consumer thread waiting for a buffer slot, at whether its consumer ended.
SLOT_CHECK = 0.5


class Event(NamedTuple):
    """One manager event (:meth:`ConnectionManager.on` names): ``name`` and its arguments."""

    name: str
    args: tuple[Any, ...]


class AsyncConnectionManager:
    """The asyncio API of a :class:`~carrot_kombu.ConnectionManager`.

    ``AsyncConnectionManager(url, **options)`` makes (and owns) a manager
    with the same options as :class:`~carrot_kombu.ConnectionManager`;
    :meth:`wrap` shares an existing one (a Celery app's, say), so that async
    code and ``.delay()`` run over one AMQP connection.

    ``async with AsyncConnectionManager(url) as m:`` starts the manager and
    waits up to ``start_timeout`` seconds for the first connection
    (:class:`~carrot_kombu.Disconnected` past it, or at once when the broker
    refuses the connection for a reason retrying will not fix; the manager
    is stopped then, within ``FAILED_START_STOP`` seconds more: a connection
    attempt still in progress is cut), and on exit calls :meth:`stop`.

    Args:
        url: As :class:`~carrot_kombu.ConnectionManager`.
        start_timeout: Most seconds ``async with`` (and :meth:`start` by
            default) waits for the first connection.
        **options: Every :class:`~carrot_kombu.ConnectionManager` option.

    Raises:
        ConfigurationError: An option or URL is invalid (as the manager's).
        TypeError, ValueError: ``start_timeout`` is not a number of seconds.
    """

    def __init__(self, url: Union[str, list[str], None] = None, *, start_timeout: float = 30.0,
                 **options: Any) -> None:
        self._start_timeout = check_timeout("start_timeout", start_timeout)
        self._manager = ConnectionManager(url, **options)
        self._owned = True
        self._consumers: set[AsyncConsumer] = set()

    @classmethod
    def wrap(cls, manager: ConnectionManager, *, start_timeout: float = 30.0) -> "AsyncConnectionManager":
        """Share ``manager`` (not owned: :meth:`stop` leaves it running for its owner).

        Raises:
            TypeError: ``manager`` is not a :class:`~carrot_kombu.ConnectionManager`.
        """
        if not isinstance(manager, ConnectionManager):
            raise TypeError(f"wrap() manager must be a ConnectionManager, got {type(manager).__name__}")
        self = cls.__new__(cls)
        self._start_timeout = check_timeout("start_timeout", start_timeout)
        self._manager = manager
        self._owned = False
        self._consumers = set()
        return self

    @property
    def manager(self) -> ConnectionManager:
        """The synchronous manager underneath (for threads, kombu leases, Celery)."""
        return self._manager

    def __repr__(self) -> str:
        status = self._manager.status()
        return (f"<AsyncConnectionManager [{status.state.value} {status.broker} | "
                f"{'owned' if self._owned else 'wrapped'}, {len(self._consumers)} consumer(s)]>")

    # -- life ------------------------------------------------------------------------------

    async def start(self, wait: Optional[float] = None) -> "AsyncConnectionManager":
        """Start the manager and wait up to ``wait`` seconds (default ``start_timeout``) for a connection.

        Raises:
            Disconnected: Not connected in time, or refused for good (the
                manager keeps trying in the background: call :meth:`stop`).
        """
        seconds = self._start_timeout if wait is None else check_timeout("wait", wait)
        manager = self._manager
        manager.start()  # threads only: returns at once

        def settled(status: Status) -> bool:
            return (status.state is ConnectionState.CONNECTED or status.state is ConnectionState.STOPPED
                    or status.gave_up or (status.state is ConnectionState.FAILED and status.fatal))

        await self._wait_status(settled, seconds)
        status = manager.status()
        if status.state is not ConnectionState.CONNECTED:
            why = "the broker refused the connection" if status.fatal else f"not connected within {seconds}s"
            raise Disconnected(f"{why} ({status.state.value}"
                               + (f": {status.last_error})" if status.last_error else ")"))
        return self

    async def stop(self, timeout: Optional[float] = None) -> None:
        """Cancel this object's consumers; stop the manager if this object made it.

        A wrapped manager (:meth:`wrap`) keeps running for its owner.  The
        manager's ``stop()`` (a polite close, bounded by ``timeout``) runs
        in the loop's default executor.  Publishes still awaiting confirms
        raise :class:`~carrot_kombu.Disconnected`.
        """
        timeout = check_timeout("timeout", timeout)
        for consumer in list(self._consumers):
            await consumer.cancel()
        if self._owned:
            await asyncio.get_running_loop().run_in_executor(None, self._manager.stop, timeout)

    async def __aenter__(self) -> "AsyncConnectionManager":
        try:
            return await self.start()
        except BaseException:
            # Bounded: a connection attempt in progress (a peer that accepts
            # TCP and never answers) would hold an unbounded stop() for its
            # connection_timeout, far past start_timeout.  Nothing was
            # connected, so there is nothing to close politely: it is cut.
            await self.stop(timeout=FAILED_START_STOP)
            raise

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.stop()

    # -- state -----------------------------------------------------------------------------

    def status(self) -> Status:
        """The manager's :meth:`~carrot_kombu.ConnectionManager.status` (never blocks the loop for long)."""
        return self._manager.status()

    async def wait_connected(self, timeout: Optional[float] = None) -> bool:
        """Wait until connected: True; False on timeout, or if stopped or given up."""
        timeout = check_timeout("timeout", timeout)

        def settled(status: Status) -> bool:
            return status.state is ConnectionState.CONNECTED or status.state is ConnectionState.STOPPED or status.gave_up

        await self._wait_status(settled, timeout)
        return self._manager.status().state is ConnectionState.CONNECTED

    async def _wait_status(self, predicate: Callable[[Status], bool], timeout: Optional[float]) -> None:
        """Until ``predicate(status())`` or ``timeout``; re-checked on every manager event (no polling)."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        manager = self._manager

        def on_event(*_: Any) -> None:
            _soon(loop, changed.set)

        names = ("connected", "connect_failed", "disconnected", "stopped")
        for name in names:
            manager.on(name, on_event)
        try:
            deadline = None if timeout is None else loop.time() + timeout
            while not predicate(manager.status()):
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                changed.clear()
                if predicate(manager.status()):
                    return
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except asyncio.TimeoutError:
                    return
        finally:
            for name in names:
                manager.off(name, on_event)

    def events(self) -> AsyncIterator[Event]:
        """``async for event in m.events():`` every manager event from the first iteration on.

        Events are the :meth:`~carrot_kombu.ConnectionManager.on` names,
        delivered in order as :class:`Event` tuples; the iteration ends after
        ``stopped``.  An iterator that does not keep up keeps the newest
        ``EVENT_BUFFER`` events (older ones are dropped, never an unbounded
        buffer).  Leaving the ``async for`` unsubscribes.
        """
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        buffer: deque[Event] = deque(maxlen=EVENT_BUFFER)
        ready = asyncio.Event()
        manager = self._manager

        def post(event: Event) -> None:
            buffer.append(event)
            ready.set()

        subscribed: list[tuple[str, Callable[..., None]]] = []
        for name in EVENTS:
            def callback(*args: Any, _name: str = name) -> None:
                _soon(loop, post, Event(_name, args))

            manager.on(name, callback)
            subscribed.append((name, callback))
        try:
            while True:
                while not buffer:
                    ready.clear()
                    await ready.wait()
                event = buffer.popleft()
                yield event
                if event.name == "stopped":
                    return
        finally:
            for name, callback in subscribed:
                manager.off(name, callback)

    # -- topology ----------------------------------------------------------------------------

    async def declare(self, *entities: Any) -> None:
        """:meth:`ConnectionManager.declare` (its round trips run in the loop's default executor)."""
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._manager.declare(*entities))

    # -- publishing ------------------------------------------------------------------------------

    async def publish(
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
        """Publish; returns once the broker confirmed the message.

        Arguments, guarantees and errors are those of
        :meth:`ConnectionManager.publish` (at-least-once across reconnects;
        ``republish=False``: at most once, :class:`~carrot_kombu.OutcomeUnknown`
        after a loss).

        If the awaiting task is cancelled, the message is forgotten: it is
        not published again after a reconnect, nothing is raised about it
        later, and if it was already written the broker may have stored it
        (as after a :class:`~carrot_kombu.PublishTimeout` with outcome
        ``"unknown"``).  ``asyncio.CancelledError`` propagates.
        """
        await self._publish([body], exchange, routing_key, headers, serializer, mandatory, timeout, republish,
                            properties)

    async def publish_many(
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
        """Publish a batch; returns once every message was confirmed (:meth:`ConnectionManager.publish_many`)."""
        _check_bodies(bodies)
        await self._publish(bodies, exchange, routing_key, headers, serializer, mandatory, timeout, republish,
                            properties)

    async def _publish(self, bodies: Iterable[Any], exchange: Any, routing_key: str,
                       headers: Optional[Mapping[str, Any]], serializer: Optional[str], mandatory: bool,
                       timeout: Optional[float], republish: bool, properties: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        wakeups = _wakeups(loop)

        def settled(submission: Submission) -> None:
            # On the thread that settled the last message, under the
            # publisher's lock: only hand off.  The loop itself when it read
            # the confirm (_pyamqp.loopturn), or expired or failed the
            # message: the future is completed at once (it only schedules
            # the task), without a trip through the loop's self-pipe.
            if wakeups.on_loop():
                _resolve(done)
            else:
                wakeups.post(_resolve, done)

        submission = self._manager._submit(
            bodies, exchange=exchange, routing_key=routing_key, headers=headers, serializer=serializer,
            mandatory=mandatory, timeout=timeout, republish=republish, properties=properties,
            on_settled=settled, flush=False,
        )
        # One socket write per loop iteration for every task that published in it.
        wakeups.flush_soon(self._manager._core.publisher)
        remaining = submission.deadline.remaining()
        timer = None if remaining is None or submission.settled else loop.call_later(remaining, submission.expire)
        try:
            await done
        except asyncio.CancelledError:
            submission.cancel()  # forgotten: see publish()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        submission.record()
        if submission.error is not None:
            raise submission.error

    # -- consuming ---------------------------------------------------------------------------------

    def consume(
        self,
        queue: Union[str, kombu.Queue],
        *,
        prefetch_count: int = 100,
        arguments: Optional[Mapping[str, Any]] = None,
        declare: bool = True,
    ) -> "AsyncConsumer":
        """An async iterator of the deliveries of ``queue``, surviving reconnects as :meth:`ConnectionManager.consume`.

        ``async for message in m.consume("jobs"):`` subscribes on the first
        iteration and cancels the subscription when the iteration ends
        (``break``, an exception, the task cancelled; deliveries not yet
        acknowledged go back to the queue).  ``async with m.consume("jobs")
        as messages:`` subscribes on entry and cancels on exit, whatever the
        iteration does.  Each :class:`AsyncMessage` is settled with ``await
        message.ack()`` / ``reject()`` / ``requeue()``.

        Args:
            queue: A queue name or a kombu ``Queue``.
            prefetch_count: Most deliveries unacknowledged at once, 1-65535:
                also the bound of the buffer between the consumer's thread and
                the loop (0, unlimited, is refused: the buffer must be bounded).
            arguments: ``basic.consume`` arguments.
            declare: Declare the queue on every connection (as ``consume()``).

        Raises:
            TypeError: ``prefetch_count`` is not an int (at once; the other
                arguments are checked by ``consume()`` when subscribing).
            ConfigurationError: ``prefetch_count`` outside 1-65535.
        """
        if isinstance(prefetch_count, bool) or not isinstance(prefetch_count, int):
            raise TypeError(f"consume() prefetch_count must be an int, got {type(prefetch_count).__name__}")
        if not 1 <= prefetch_count <= 65535:
            raise ConfigurationError(f"consume() prefetch_count must be 1-65535, got {prefetch_count!r}")
        return AsyncConsumer(self, queue, prefetch_count, arguments, declare)


class AsyncMessage:
    """One delivery: ``body`` (decoded), the kombu ``message``, and async settlement.

    Settling writes one small frame on the consumer's channel from the loop
    and never waits, neither for the broker nor for room: while the
    connection's outgoing buffer is over its high-water mark (a stalled peer
    under heavy publishing from other threads) the frame is written from the
    loop's default executor instead, and the awaiting task waits for that
    (the loop goes on).  As with :meth:`ConnectionManager.consume`, a
    settlement of a delivery from a lost connection, or after the consumer
    was cancelled, is dropped: the broker redelivers the message.
    """

    __slots__ = ("body", "message")

    def __init__(self, body: Any, message: Any) -> None:
        self.body = body
        self.message = message

    @property
    def properties(self) -> dict[str, Any]:
        return self.message.properties  # type: ignore[no-any-return]

    @property
    def headers(self) -> dict[str, Any]:
        return self.message.headers or {}

    @property
    def delivery_tag(self) -> Any:
        return self.message.delivery_tag

    @property
    def redelivered(self) -> bool:
        return bool(self.message.delivery_info.get("redelivered"))

    async def ack(self) -> None:
        await _settle(self.message.ack)

    async def reject(self) -> None:
        """Reject without requeue (dead-lettered if the queue has a dead-letter exchange)."""
        await _settle(self.message.reject, False)

    async def requeue(self) -> None:
        await _settle(self.message.requeue)

    def __repr__(self) -> str:
        return f"<AsyncMessage tag={self.delivery_tag!r} body={self.body!r:.60}>"


_END = object()


async def _settle(settle: Callable[..., None], *args: Any) -> None:
    """``settle(*args)`` from the loop if it needs no wait, else from the default executor."""
    try:
        with nowait():
            settle(*args)
        return
    except WouldWait:
        pass  # nothing was written: write it where waiting is allowed
    await asyncio.get_running_loop().run_in_executor(None, settle, *args)


class AsyncConsumer:
    """``m.consume(queue)``: an async iterator (and async context manager) of :class:`AsyncMessage`.

    One owner per piece of state: the buffer and the waiting future belong
    to the loop; the consumer's worker thread only hands deliveries over
    (``call_soon_threadsafe``) after taking a buffer slot.
    """

    def __init__(self, owner: AsyncConnectionManager, queue: Union[str, kombu.Queue], prefetch_count: int,
                 arguments: Optional[Mapping[str, Any]], declare: bool) -> None:
        self._owner = owner
        self._queue = queue
        self._prefetch = prefetch_count
        self._arguments = arguments
        self._declare = declare
        self._consumer: Optional[Consumer] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._buffer: deque[Any] = deque()
        self._ready: Optional[asyncio.Event] = None
        # Taken by the worker thread per delivery, given back when the loop
        # hands one to the user: the buffer never holds more than prefetch_count.
        self._slots = threading.Semaphore(prefetch_count)
        self._closed = False
        # _closed and _consumer between the loop (cancel) and the subscribing
        # thread: whichever comes second cancels the consumer, never neither.
        self._lock = threading.Lock()
        self._starting: Optional[asyncio.Future[None]] = None
        self._wakeups: Optional[_Wakeups] = None

    @property
    def consumer(self) -> Optional[Consumer]:
        """The manager's :class:`~carrot_kombu.Consumer` (None before the first iteration)."""
        return self._consumer

    async def start(self) -> None:
        """Subscribe (in the loop's default executor: ``consume()`` talks to the broker when connected)."""
        if self._closed:
            raise CarrotKombuError("this consumer was cancelled")
        if self._starting is None:
            loop = self._loop = asyncio.get_running_loop()
            self._wakeups = _wakeups(loop)
            self._ready = asyncio.Event()
            self._starting = loop.run_in_executor(None, self._subscribe)
            self._owner._consumers.add(self)
        await asyncio.shield(self._starting)

    def _subscribe(self) -> None:
        consumer = self._owner.manager.consume(
            self._queue, self._deliver, prefetch_count=self._prefetch, arguments=self._arguments,
            declare=self._declare,
        )
        with self._lock:
            self._consumer = consumer
            closed = self._closed
        if closed:  # cancelled while subscribing: nobody else will cancel it
            consumer.cancel()

    def _deliver(self, body: Any, message: Any) -> None:
        # The consumer's worker thread: wait for a buffer slot, then hand over.
        # Re-checked every SLOT_CHECK seconds: a consumer cancelled behind our
        # back, or a loop closed without cancelling it, frees the thread.
        while not self._slots.acquire(timeout=SLOT_CHECK):
            consumer = self._consumer
            loop = self._loop
            if loop is not None and loop.is_closed():
                self._orphaned(message)
                return
            if self._closed or (consumer is not None and not consumer.active):
                return  # not settled: its channel's close sends it back to the queue
        wakeups = self._wakeups
        if self._closed or wakeups is None:
            self._slots.release()
            return  # not settled: the cancel's channel close sends it back to the queue
        if not wakeups.post(self._put, AsyncMessage(body, message)):
            self._slots.release()
            self._orphaned(message)

    def _orphaned(self, message: Any) -> None:
        """The consumer's thread: the loop closed without cancelling us; give the delivery back, end the subscription.

        Otherwise the subscription would hold ``prefetch_count`` deliveries
        unacknowledged, and take new ones, until the manager stops.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            consumer = self._consumer
        self._owner._consumers.discard(self)
        try:
            message.requeue()
        except Exception:  # noqa: BLE001 - the channel is going: the broker redelivers anyway
            logger.debug("carrot_kombu: could not requeue a delivery of a closed event loop", exc_info=True)
        if consumer is not None:
            consumer.cancel()  # from its own callback: does not wait for itself

    def _put(self, item: Any) -> None:
        self._buffer.append(item)
        assert self._ready is not None
        self._ready.set()

    async def get(self) -> AsyncMessage:
        """The next delivery (subscribing first if needed).

        Outside ``async for`` / ``async with``, the subscription lasts until
        :meth:`cancel` (or the owner's ``stop()``).

        Raises:
            StopAsyncIteration: The consumer was cancelled.
        """
        if self._starting is None:
            await self.start()
        ready = self._ready
        assert ready is not None
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            ready.clear()
            await ready.wait()
        item = self._buffer[0]
        if item is _END:
            raise StopAsyncIteration  # left in place for every other getter
        self._buffer.popleft()
        self._slots.release()
        return item  # type: ignore[no-any-return]

    def __aiter__(self) -> AsyncIterator[AsyncMessage]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[AsyncMessage]:
        # An async generator: when the ``async for`` ends (break, an
        # exception) the loop finalizes it, and the finally cancels.
        try:
            while True:
                try:
                    message = await self.get()
                except StopAsyncIteration:
                    return
                yield message
        finally:
            await self.cancel()

    async def __aenter__(self) -> "AsyncConsumer":
        try:
            await self.start()
        except BaseException:
            # Cancelled (or failed) while subscribing: ``async with`` will not
            # call __aexit__, so end the subscription here, without awaiting
            # (a cancelled task must not wait): the subscribing thread, or the
            # executor, cancels the consumer once it exists.
            self._close()
            raise
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.cancel()

    async def cancel(self) -> None:
        """End the subscription (idempotent); deliveries not acknowledged go back to the queue.

        If the awaiting task is cancelled, the subscription still ends (in
        the background).
        """
        if self._closed:
            return
        consumer = self._close(cancel_now=False)
        starting = self._starting
        if starting is not None and consumer is None:
            try:
                await asyncio.shield(starting)
            except Exception:  # noqa: BLE001 - it never subscribed: nothing to cancel
                pass
            # The subscribing thread saw _closed and cancelled its consumer
            # before the future completed.
            return
        if consumer is not None:
            await asyncio.get_running_loop().run_in_executor(None, consumer.cancel)

    def _close(self, cancel_now: bool = True) -> Optional[Consumer]:
        """On the loop: mark closed, free the worker; the consumer, if it already exists.

        With ``cancel_now`` an existing consumer is cancelled in the loop's
        executor without waiting for it; a subscription still in progress
        is cancelled by its thread when it ends (see :meth:`_subscribe`).
        """
        with self._lock:
            if self._closed:
                return None
            self._closed = True
            consumer = self._consumer
        self._owner._consumers.discard(self)
        # Free a worker waiting for a slot: it sees _closed and leaves its delivery unsettled.
        for _ in range(self._prefetch):
            self._slots.release()
        if self._ready is not None:
            self._buffer.append(_END)
            self._ready.set()
        if consumer is not None and cancel_now:
            asyncio.get_running_loop().run_in_executor(None, consumer.cancel).add_done_callback(_retrieve)
        return consumer


def _retrieve(future: "asyncio.Future[Any]") -> None:
    """A background call's outcome, read so that asyncio does not warn about it; failures logged."""
    if not future.cancelled() and future.exception() is not None:
        logger.warning("carrot_kombu: cancelling an async consumer failed", exc_info=future.exception())


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


class _Wakeups:
    """Calls from other threads into one loop, coalesced: one ``call_soon_threadsafe`` per burst.

    A confirm frame (or a burst of deliveries) settles many awaiting tasks:
    each would otherwise write to the loop's self-pipe and cost the loop an
    iteration.  The first post of a burst schedules :meth:`_drain`; the
    others only append.
    """

    __slots__ = ("_loop", "_thread", "_lock", "_todo", "_scheduled", "_flushes", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()  # made on the loop's thread (see _wakeups)
        self._lock = threading.Lock()
        self._todo: deque[tuple[Callable[[Any], None], Any]] = deque()
        self._scheduled = False
        self._flushes: dict[int, Publisher] = {}  # the loop's own: no lock

    def on_loop(self) -> bool:
        """Whether the calling thread is the loop's."""
        return threading.get_ident() == self._thread

    def flush_soon(self, publisher: Publisher) -> None:
        """On the loop: flush ``publisher`` once, after what this iteration's tasks write.

        The loop then reads the connection itself while it keeps publishing
        (``_pyamqp.loopturn``): the confirms need no other thread.
        """
        if not self._flushes:
            self._loop.call_soon(self._flush)
        self._flushes[id(publisher)] = publisher

    def _flush(self) -> None:
        flushes, self._flushes = self._flushes, {}
        for publisher in flushes.values():
            publisher.flush(self._loop)

    def post(self, callback: Callable[[Any], None], arg: Any) -> bool:
        """From any thread: ``callback(arg)`` on the loop soon; False if the loop is closed."""
        with self._lock:
            self._todo.append((callback, arg))
            if self._scheduled:
                return True
            self._scheduled = True
        if _soon(self._loop, self._drain):
            return True
        with self._lock:
            self._scheduled = False
            self._todo.clear()
        return False

    def _drain(self) -> None:
        with self._lock:
            todo, self._todo = self._todo, deque()
            self._scheduled = False
        for callback, arg in todo:
            callback(arg)


_WAKEUPS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wakeups]" = weakref.WeakKeyDictionary()
_WAKEUPS_LOCK = threading.Lock()


def _wakeups(loop: asyncio.AbstractEventLoop) -> _Wakeups:
    """The loop's coalescing inbox (made on first use, on the loop's thread)."""
    found = _WAKEUPS.get(loop)
    if found is None:
        with _WAKEUPS_LOCK:
            found = _WAKEUPS.setdefault(loop, _Wakeups(loop))
    return found


def _soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> bool:
    """Run ``callback(*args)`` on ``loop`` from any thread; False if the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        return False
    return True
