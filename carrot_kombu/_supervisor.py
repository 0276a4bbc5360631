"""The supervisor: one thread that owns the manager's connection.

It is one loop, easy to follow: connect (one attempt), serve (check
liveness, retry what is degraded, wait for "lost", "blocked", "stop"),
drop, choose the next attempt, repeat.  Other threads only *post* small
typed messages to its inbox; it only *posts* events to the bus.

Choosing the next attempt:

* after a loss, with other brokers configured, the next one is tried at
  once (a node that just failed is not retried first);
* failed attempts rotate through the brokers without waiting; only when
  every broker failed in a row does the backoff policy apply;
* during a backoff wait after a round in which a broker refused TCP or was
  still starting (541 INTERNAL_ERROR, "vhost is down"), a cheap TCP probe
  checks every 0.25 s whether a broker accepts connections, and ends the
  wait early (at most one early AMQP attempt per backoff slot: a herd of
  clients never hammers the broker with handshakes);
* refusals a retry will not fix (credentials, vhost, certificate) are
  retried only every ``Backoff.max`` seconds, and never probed.
"""

from __future__ import annotations

import itertools
import logging
import queue
import random
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

from amqp.exceptions import AMQPError

from ._connect import open_link
from ._deadline import Deadline
from ._link import Link, LinkHooks
from ._live import LiveConnection
from ._sync import Flag, Worker
from .config import Endpoint, Settings
from .events import EventBus
from .exceptions import CarrotKombuError, Disconnected, SetupFailed
from .pool import ChannelPool
from .publisher import Publisher
from .recovery import Degraded, Recovery
from .retry import failed_before_tcp, is_fatal, is_starting, is_unavailable
from .status import StateBoard

__all__ = ("Inbox", "Supervisor", "is_fatal", "failed_before_tcp", "SetupFailed")

logger = logging.getLogger("carrot_kombu")

#: Link generations are unique in the process, across supervisors: a manager
#: started again must never mistake a new link for one it saw before.
_GENERATIONS = itertools.count(1)

#: A consumer lost again within this many seconds of coming back "flaps":
#: its next resubscription waits with backoff instead of at once.
FLAP_WINDOW = 5.0
#: Quiet moves (a shared channel closed with no culprit) of one consumer
#: within FLAP_WINDOW before the next one waits with backoff, as a flap does.
MOVES_BEFORE_BACKOFF = 3

#: Seconds between TCP readiness probes during a backoff wait.
PROBE_INTERVAL = 0.25
#: With other brokers to try, one handshake with a silent peer is bounded by this.
ALTERNATE_ATTEMPT_TIMEOUT = 5.0
#: After a connection lost sooner than this, the next attempt waits
#: ``Backoff.min`` (a broker that kills every new connection must not make us spin).
SHORT_LIVED = 1.0


# -- the inbox --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Lost:
    generation: int
    error: BaseException


@dataclass(frozen=True)
class BlockedNotice:
    generation: int
    reason: Optional[str]  # None: unblocked


@dataclass(frozen=True)
class ReplacePublisherChannel:
    generation: int
    #: The broker closed the last one for no message we can name: replacing
    #: it at once could loop (every rewrite closed again), so it backs off.
    backoff: bool = False


@dataclass(frozen=True)
class Resubscribe:
    consumer: Any
    #: Moved off a channel another consumer's error closed: at once, no event.
    quiet: bool = False


Message = Union[Stop, Lost, BlockedNotice, ReplacePublisherChannel, Resubscribe]


class Inbox:
    """Where other threads post to the manager's supervisor; outlives each supervisor.

    Long-lived parts (publisher, consumers) hold the inbox, never a
    supervisor: a supervisor started again takes the inbox over, and one
    that is retired keeps reading only what was posted before.
    """

    def __init__(self) -> None:
        self._queue: "queue.SimpleQueue[Message]" = queue.SimpleQueue()

    def open(self) -> "queue.SimpleQueue[Message]":
        """A new supervisor's queue: everything posted from now on goes there."""
        self._queue = queue.SimpleQueue()
        return self._queue

    def post(self, message: "Message") -> None:
        """From any thread; never blocks."""
        self._queue.put(message)

    def replace_publisher_channel(self, generation: int, backoff: bool = False) -> None:
        """The publisher needs a confirm channel (first use, or the broker closed it)."""
        self.post(ReplacePublisherChannel(generation, backoff))

    def resubscribe(self, consumer: Any, quiet: bool = False) -> None:
        """From the reading thread: the broker cancelled a consumer (or, ``quiet``, closed a channel it shared)."""
        self.post(Resubscribe(consumer, quiet))


class _Retry:
    """A degraded entity or consumer and when to try it again."""

    __slots__ = ("item", "due", "attempt")

    def __init__(self, item: Degraded, due: float, attempt: int) -> None:
        self.item = item
        self.due = due
        self.attempt = attempt


class Supervisor:
    """Runs the connect/serve/reconnect loop on its own thread."""

    def __init__(
        self,
        settings: Settings,
        live: LiveConnection,
        pool: ChannelPool,
        bus: EventBus,
        board: StateBoard,
        recovery: Recovery,
        publisher: Publisher,
        inbox: Inbox,
    ) -> None:
        self._settings = settings
        self._recovery = recovery
        self._publisher = publisher
        self._live = live
        self._pool = pool
        self._bus = bus
        self._board = board
        self._inbox = inbox.open()
        self._stopping = Flag()  # set by stop() in any thread, maybe interrupted: see _sync
        self._thread = Worker(self._run, "carrot-kombu-supervisor")
        self._retired = False
        #: Who reports the stop (the "stopped" event) is decided once, under
        #: this lock: the ending loop, or a stop() that retires it.
        self._report_lock = threading.Lock()
        self._stop_reported = False
        self._endpoint_index = 0
        self._stop_timeout = 5.0
        self._last_failure: BaseException = CarrotKombuError("no attempt yet")
        #: When the attempt in progress (or the last one) started: logs say how long each took.
        self._attempt_started = 0.0
        #: When recovery of the new connection started (declares, consumers, confirm channel):
        #: on a cluster it waits for the broker (a quorum queue electing a leader, say).
        self._restore_started = 0.0
        self._failed_url = ""
        #: Some attempt of the current round failed in a way a TCP probe can see end
        #: (refused TCP, or a node still starting): its backoff wait probes.
        self._round_probes = False
        self._retries: dict[int, _Retry] = {}
        #: Degraded items that came back: when, after how many attempts (see FLAP_WINDOW).
        self._recovered: dict[int, tuple[float, int]] = {}
        #: Consumers moved quietly: when last, how often in a row (see MOVES_BEFORE_BACKOFF).
        self._moves: dict[int, tuple[float, int]] = {}
        #: The connection of the attempt in progress / the link this loop serves (for abort()).
        self._attempting: Any = None
        self._link: Optional[Link] = None
        #: Confirm channels replaced in a row without a culprit, and when the next may be.
        self._publisher_attempt = 0
        self._publisher_due = 0.0
        self._publisher_wanted: Optional[int] = None

    # -- called by the manager -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def retire(self) -> bool:
        """Let a supervisor that did not stop in time finish silently.

        It keeps its own pool and state board (the manager has new ones) and
        posts no more events, so it cannot disturb a manager started again.

        Returns:
            True if the caller is to report the stop (``stopped``); False if
            the loop, ending just now, claimed that first (wait for it with
            :meth:`wait_ended`) or an earlier ``retire()`` did.
        """
        with self._report_lock:
            self._retired = True
            mine = not self._stop_reported
            self._stop_reported = True
        return mine

    def wait_ended(self, timeout: Optional[float]) -> bool:
        """True once the loop's thread ended (within ``timeout``)."""
        return self._thread.wait(timeout)

    def stop(self, timeout: Optional[float]) -> bool:
        """Ask the loop to end; True if it ended within ``timeout``."""
        if timeout is not None:
            self._stop_timeout = max(0.1, timeout / 2)
        self._stopping.set()
        self._inbox.put(Stop())
        return self._thread.wait(timeout)

    def abort(self, why: BaseException) -> None:
        """From stop(), when the loop did not end in time: make it end soon, never block.

        The live connection dies at once (writers and waiters wake up); a
        handshake in progress is cut.  The thread then exits on its own.
        """
        link = self._link
        if link is not None:
            link.abort(why)
        attempting = self._attempting
        if attempting is not None:
            attempting.abort_handshake()

    def on_own_thread(self) -> bool:
        """Called from this supervisor's thread (a setup function runs there)."""
        return self._thread.thread is threading.current_thread()

    def _post(self, event: str, *args: Any) -> None:
        if not self._retired:
            self._bus.post(event, *args)

    # -- posted by link threads ------------------------------------------------------

    def _hooks(self) -> LinkHooks:
        return LinkHooks(
            on_lost=self._on_lost,
            on_blocked=lambda link, reason: self._inbox.put(BlockedNotice(link.generation, reason)),
            on_unblocked=lambda link: self._inbox.put(BlockedNotice(link.generation, None)),
        )

    def _on_lost(self, link: Link, exc: BaseException) -> None:
        """From whichever thread saw it: wake whoever waits, then tell the loop.

        The dead link is hidden by the live connection at once (no lease is
        handed out on it); the loop detaches it and reports the loss.
        """
        self._live.wake()
        self._inbox.put(Lost(link.generation, exc))

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:  # pragma: no cover - a bug; never leave users hanging
            logger.exception("carrot_kombu supervisor crashed")
            self._board.crashed()
            self._live.detach("supervisor crashed", None)
            self._publisher.fail_waiting("the carrot_kombu supervisor crashed")
        finally:
            if self._stopping.is_set():
                with self._report_lock:
                    mine = not self._stop_reported
                    self._stop_reported = True
                if mine:
                    # Posted even if stop() retires us from now on: it then
                    # waits for this thread instead of posting (see retire).
                    self._live.detach("manager stopped", None)
                    self._board.stopped()
                    self._bus.post("stopped")

    def _loop(self) -> None:
        settings = self._settings
        endpoints = len(settings.endpoints)
        delays: Optional[Iterator[float]] = None
        failed_in_row = short_in_row = 0
        while not self._stopping.is_set():
            link = self._attempt(alternates=endpoints > 1)
            if link is None:
                if self._stopping.is_set():
                    return
                failed_in_row += 1
                if failed_in_row % endpoints:
                    # Another broker is still untried in this round: no wait, but
                    # said, so a slow failover shows every step in the log.
                    logger.info("carrot_kombu could not connect to %s in %.2fs (%s); trying %s at once",
                                self._failed_url, self._attempt_took(), self._describe(self._last_failure),
                                settings.endpoints[self._endpoint_index].masked_url)
                    continue
                if delays is None:
                    delays = settings.backoff.delays()
                if not self._after_failure(delays):
                    return
                continue
            started = time.monotonic()
            lost = self._serve(link)
            if lost is None:
                return
            short = time.monotonic() - started < SHORT_LIVED
            delays, failed_in_row = None, 0  # the schedule restarts after a success
            self._round_probes = False
            short_in_row = short_in_row + 1 if short else 0
            if endpoints > 1:
                # Rotate away from the node that just failed: try the next one at once.
                self._endpoint_index = (self._endpoint_index + 1) % endpoints
            # Brokers that accept and then drop every connection: once a whole
            # round of them did, wait before the next round (no spinning).
            if short and short_in_row % endpoints == 0:
                logger.warning("carrot_kombu: the last %d connection(s) were each lost within %.0fs; "
                               "next attempt in %.2fs", endpoints, SHORT_LIVED, settings.backoff.min)
                if not self._wait(settings.backoff.min):
                    return

    def _attempt(self, alternates: bool) -> Optional[Link]:
        settings = self._settings
        endpoint = settings.endpoints[self._endpoint_index]
        self._board.connecting(endpoint.masked_url)
        self._post("connecting")
        self._attempt_started = time.monotonic()
        generation = next(_GENERATIONS)
        timeout = endpoint.connect_timeout
        if alternates:
            timeout = min(timeout, max(ALTERNATE_ATTEMPT_TIMEOUT, float(endpoint.heartbeat)))
        try:
            link = open_link(generation, endpoint, settings, connect_timeout=timeout,
                             on_created=self._set_attempting)
        except Exception as exc:
            self._failed(endpoint, exc)
            return None
        finally:
            self._attempting = None
        if self._stopping.is_set():
            link.close(self._stop_timeout)
            return None
        # The connection's own thread must own the socket before anything else uses it.
        link.start(self._hooks())
        self._restore_started = time.monotonic()
        try:
            degraded = self._recovery.restore(link)
        except Exception as exc:
            # Never report connected half-recovered: this attempt failed.
            self._failed(endpoint, SetupFailed(f"setup failed on {endpoint.masked_url}: {self._describe(exc)}", exc))
            self._recovery.forget(link)
            link.kill(exc)
            return None
        self._retries = {}
        self._degrade(degraded)
        return link

    def _attempt_took(self) -> float:
        return time.monotonic() - self._attempt_started

    def _set_attempting(self, connection: Any) -> None:
        self._attempting = connection
        if self._stopping.is_set():
            connection.abort_handshake()

    def _failed(self, endpoint: Endpoint, exc: BaseException) -> None:
        self._last_failure = exc
        if failed_before_tcp(exc) or is_starting(exc):
            self._round_probes = True
        self._failed_url = endpoint.masked_url
        self._endpoint_index = (self._endpoint_index + 1) % len(self._settings.endpoints)

    def _after_failure(self, delays: Iterator[float]) -> bool:
        """Report the failed attempt and wait; False when the loop must end."""
        exc = self._last_failure
        fatal = is_fatal(exc)
        message = self._describe(exc)
        public = _public(exc, message)
        delay = next(delays, None)
        if delay is not None and fatal:
            delay = max(delay, self._settings.backoff.max)
        if self._stopping.is_set():
            return False  # stop() was called during the attempt: nothing more to report
        if delay is None:
            logger.error("carrot_kombu gave up connecting after %d attempt(s): %s",
                         self._board.current.attempts + 1, message)
            self._board.gave_up(message, fatal)
            self._live.set_down(f"gave up connecting to {self._failed_url}", public)
            self._publisher.fail_waiting(f"the manager gave up connecting ({message})", public)
            self._post("connect_failed", public, None)
            self._stopping.wait()  # stay FAILED until stop()
            return False
        log = logger.error if fatal else logger.warning
        log("carrot_kombu connection attempt failed (%s); next attempt in %.2fs", message, delay)
        self._board.attempt_failed(message, fatal, delay)
        self._live.set_down(f"not connected to {self._failed_url}", public)
        if fatal:
            self._publisher.fail_waiting(f"the broker refused the connection ({message})", public)
        self._post("connect_failed", public, delay)
        # Whichever broker failed last: one that refused TCP or was starting
        # may be ready before the delay is over (the order of a round is chance).
        probes, self._round_probes = self._round_probes, False
        if fatal or not probes:
            return self._wait(delay)
        return self._wait_probing(delay)

    def _wait_probing(self, delay: float) -> bool:
        """Wait ``delay``, ending early when a broker accepts TCP connections again."""
        deadline = Deadline.after(delay)
        while True:
            if deadline.expired():
                return True
            if self._stopping.wait(deadline.within(PROBE_INTERVAL * random.uniform(0.8, 1.2))):
                return False
            if deadline.expired():
                return True
            index = self._probe()
            if index is not None:
                self._endpoint_index = index
                return not self._stopping.is_set()

    def _probe(self) -> Optional[int]:
        """The first broker (from the next one to try) whose port accepts a TCP connection."""
        endpoints = self._settings.endpoints
        for offset in range(len(endpoints)):
            index = (self._endpoint_index + offset) % len(endpoints)
            endpoint = endpoints[index]
            if not endpoint.is_amqp:
                return index
            try:
                with socket.create_connection((endpoint.host, endpoint.port), timeout=0.5):
                    return index
            except OSError:
                continue
        return None

    def _serve(self, link: Link) -> Optional[BaseException]:
        """Run a live link until it is lost (returns why) or stop (returns None)."""
        self._link = link
        try:
            return self._serve_link(link)
        finally:
            self._link = None

    def _serve_link(self, link: Link) -> Optional[BaseException]:
        if self._stopping.is_set():
            # stop() came during recovery (from a setup function, say): never
            # report connected after it.
            link.close(self._stop_timeout)
            return None
        # A replacement deferred on an earlier link is moot: this one's confirm
        # channel was attached by the recovery (else the wake-up below would
        # stay in the past and the loop would spin, found by the peer fuzz).
        self._publisher_wanted = None
        self._live.attach(link)
        self._degrade(self._recovery.attached(link))
        self._board.connected(link.endpoint.masked_url, link.negotiated(), link.server())
        logger.info("carrot_kombu connected to %s in %.2fs (recovery %.2fs)", link.endpoint.masked_url,
                    self._attempt_took(), time.monotonic() - self._restore_started)
        self._post("connected")
        lost = self._pump(link)
        if lost is None:
            self._live.detach("manager stopped", None)
            self._recovery.forget(link)
            link.close(self._stop_timeout)
            return None
        message = self._describe(lost)
        self._live.detach("connection lost", _public(lost, message))
        self._recovery.forget(link)
        link.kill(lost)
        logger.warning("carrot_kombu lost its connection to %s: %s", link.endpoint.masked_url, message)
        self._board.lost(message, None)
        self._post("disconnected", _public(lost, message))
        return lost

    def _pump(self, link: Link) -> Optional[BaseException]:
        interval = link.tick_interval
        next_tick = time.monotonic() + interval
        while True:
            wake = min([next_tick] + [r.due for r in self._retries.values()]
                       + ([self._publisher_due] if self._publisher_wanted == link.generation else []))
            try:
                msg: Optional[Message] = self._inbox.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                msg = None
            if isinstance(msg, Stop):
                return None
            if isinstance(msg, Lost) and msg.generation == link.generation:
                return msg.error
            if isinstance(msg, BlockedNotice) and msg.generation == link.generation:
                self._blocked(msg.reason)
            elif isinstance(msg, ReplacePublisherChannel) and msg.generation == link.generation:
                self._replace_publisher_channel(link, msg.backoff)
            elif isinstance(msg, Resubscribe) and msg.quiet:
                self._move(link, msg.consumer)
            elif isinstance(msg, Resubscribe):
                # The consumer's own text: the broker's reply (a 406's) when it closed the channel.
                why = getattr(msg.consumer, "degraded", None) or "cancelled by the broker"
                self._degrade([Degraded("consumer", msg.consumer, msg.consumer.name, CarrotKombuError(why))],
                              immediate=True)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + interval
                self._pool.reap()
                try:
                    link.tick()
                except Exception as exc:
                    return exc
            self._run_retries(link)
            if self._publisher_wanted == link.generation and time.monotonic() >= self._publisher_due:
                self._replace_publisher_channel(link, False)

    def _replace_publisher_channel(self, link: Link, backoff: bool) -> None:
        """Attach a new confirm channel, at once unless the last ones were closed for no known reason.

        A broker that closes every confirm channel without naming a message
        would otherwise make us rewrite the same messages in a hot loop: such
        replacements wait by the backoff policy.
        """
        now = time.monotonic()
        policy = self._settings.backoff
        if now - self._publisher_due > policy.max:
            self._publisher_attempt = 0  # quiet for a while: the next unexplained close starts over
        if backoff:
            self._publisher_due = max(self._publisher_due, now + policy.nominal(self._publisher_attempt))
            self._publisher_attempt += 1
        if now < self._publisher_due:
            self._publisher_wanted = link.generation
            return
        self._publisher_wanted = None
        self._guarded(link, self._recovery.ensure_publisher)

    def _blocked(self, reason: Optional[str]) -> None:
        self._board.blocked_by_broker(reason)
        self._publisher.blocked(reason, self._settings.blocked_timeout)
        if reason is None:
            logger.info("carrot_kombu connection unblocked")
            self._post("unblocked")
        else:
            logger.warning("carrot_kombu connection blocked by the broker: %s", reason)
            self._post("blocked", reason)

    def _guarded(self, link: Link, action: Any) -> None:
        try:
            action(link)
        except Disconnected:
            pass  # the link is going; the next one restores everything
        except Exception:
            logger.warning("carrot_kombu recovery step failed", exc_info=True)

    # -- degraded entities and consumers -------------------------------------------------------

    def _move(self, link: Link, consumer: Any) -> None:
        """Subscribe again, at once and with no event, a consumer whose shared channel another closed."""
        item = Degraded("consumer", consumer, consumer.name, CarrotKombuError("its channel was closed"))
        key, now = id(consumer), time.monotonic()
        last = self._moves.get(key)
        streak = last[1] + 1 if last is not None and now - last[0] < FLAP_WINDOW else 1
        if len(self._moves) > 1024:  # only the last FLAP_WINDOW matters: the dict never grows past that
            self._moves = {k: v for k, v in self._moves.items() if now - v[0] < FLAP_WINDOW}
        self._moves[key] = (now, streak)
        if streak > MOVES_BEFORE_BACKOFF:
            # Its channels keep being closed under it with nobody to blame
            # (a broker fault, a policy): never resubscribe in a tight loop.
            item.error = CarrotKombuError(
                f"its shared channel was closed by the broker {streak} times within {FLAP_WINDOW:g}s")
            self._degrade([item])
            self._retries[key].due = now + self._settings.backoff.nominal(streak - MOVES_BEFORE_BACKOFF - 1)
            return
        try:
            error = self._recovery.retry(link, item)
        except Exception as exc:
            error = exc  # the connection is probably going: retried (and restored) as degraded
        if error is not None:
            item.error = error
            self._degrade([item])

    def _degrade(self, items: list[Degraded], immediate: bool = False) -> None:
        now = time.monotonic()
        for item in items:
            key = id(item.target)
            known = self._retries.get(key)
            if known is None:
                logger.warning("carrot_kombu: %s is degraded: %s", item.what, self._describe(item.error))
                self._post("degraded", item.what, self._describe(item.error))
            attempt = 0 if known is None else known.attempt
            delay = 0.0 if immediate else self._retry_delay(item.error, attempt)
            flapped = self._recovered.pop(key, None)
            if immediate and flapped is not None and now - flapped[0] < FLAP_WINDOW:
                # Lost again right after it came back (a poison message whose
                # handling makes the broker close the channel, say): back off
                # as for a connection, never resubscribe in a tight loop.
                attempt = flapped[1] + 1
                delay = self._settings.backoff.nominal(attempt - 1)
            self._retries[key] = _Retry(item, now + delay, attempt)
        self._publish_degraded()

    def _retry_delay(self, error: BaseException, attempt: int) -> float:
        backoff = self._settings.backoff
        if not is_unavailable(error) and not isinstance(error, CarrotKombuError):
            return backoff.max  # refused: someone has to change something
        # Unavailable (its node is down...): look again soon, so it comes
        # back within about a second of the broker serving it again.
        return backoff.soon(attempt)

    def _run_retries(self, link: Link) -> None:
        now = time.monotonic()
        for key, retry in list(self._retries.items()):
            if retry.due > now or self._stopping.is_set():
                continue
            try:
                error = self._recovery.retry(link, retry.item)
            except Exception as exc:
                logger.debug("retry of %s failed at the connection level: %r", retry.item.what, exc)
                retry.due = time.monotonic() + 1.0
                continue
            if error is None:
                del self._retries[key]
                now = time.monotonic()
                # Only the last FLAP_WINDOW matters: older entries go (and never grow the dict).
                self._recovered = {k: v for k, v in self._recovered.items() if now - v[0] < FLAP_WINDOW}
                self._recovered[key] = (now, retry.attempt)
                logger.info("carrot_kombu: %s is back", retry.item.what)
                self._post("recovered", retry.item.what)
            else:
                retry.item.error = error
                retry.attempt += 1
                retry.due = time.monotonic() + self._retry_delay(error, retry.attempt)
        self._publish_degraded()

    def _publish_degraded(self) -> None:
        items = {r.item.what: self._describe(r.item.error) for r in self._retries.values()}
        if dict(self._board.current.degraded) != items:
            self._board.set_degraded(items)

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` unless stopped first; True if the loop may go on."""
        return not self._stopping.wait(delay)

    def _describe(self, exc: BaseException) -> str:
        return self._settings.redact(f"{type(exc).__name__}: {exc}")


def _public(exc: BaseException, message: str) -> BaseException:
    """The error users see: the original when its text is clean, else a stand-in.

    A broker refusal keeps its class in the stand-in (``NotAllowed`` for a
    vhost, whose text names the user, which may equal the password): kombu
    and Celery decide by class whether retrying can help.
    """
    if message.endswith(str(exc)):
        return exc
    if isinstance(exc, AMQPError):
        prefix = f"{type(exc).__name__}: "
        text = message[len(prefix):] if message.startswith(prefix) else message
        code = getattr(exc, "reply_code", None)
        if code is not None and f"({code}) " in text:
            text = text.split(f"({code}) ", 1)[1]  # the reply text alone: str() adds method and code again
        try:
            clean: BaseException = type(exc)(text, getattr(exc, "method_sig", None), None, code)
            return clean
        except Exception:  # noqa: BLE001 - an AMQPError subclass with another signature
            pass
    return CarrotKombuError(message)
