"""The supervisor: one thread that owns the manager's connection.

It is one loop, easy to follow: connect (one attempt), serve (tick heartbeats,
wait for "lost", "blocked", "stop"), drop, wait the backoff delay, repeat.
Other threads only *post* to its inbox; it only *posts* events to the bus.
"""

from __future__ import annotations

import itertools
import logging
import queue
import ssl
import threading
import time
from typing import Any, Iterator, Optional, Protocol

from amqp.exceptions import AccessRefused, AMQPError, NotAllowed

from ._link import Link, LinkHooks, open_link
from .config import Settings
from .events import EventBus
from .exceptions import CarrotKombuError
from .pool import ChannelPool
from .status import ConnectionState, StateBoard

__all__ = ("Supervisor", "is_fatal")

logger = logging.getLogger("carrot_kombu")

#: Refusals a retry will not fix by itself (someone must change the broker or
#: the configuration): retried only every ``Backoff.max`` seconds.
FATAL_ERRORS = (AccessRefused, NotAllowed, ssl.SSLCertVerificationError)


#: Link generations are unique in the process, across supervisors: a manager
#: started again must never mistake a new link for one it saw before.
_GENERATIONS = itertools.count(1)


class Recovery(Protocol):
    """What the manager re-creates on each new connection (topology, consumers, publisher)."""

    def restore(self, link: Link) -> None:
        """Before leases and ``connected``; raising fails the attempt."""

    def attached(self, link: Link) -> None:
        """Right after leases became available (catch up with late registrations)."""

    def forget(self, link: Link) -> None:
        """The link is lost (from any thread; no I/O)."""


class SetupFailed(CarrotKombuError):
    """Declaring the topology or a setup function failed on a new connection."""


def is_fatal(exc: BaseException) -> bool:
    """Refused for a reason retrying will not fix.

    Besides the broker's refusals, anything that is neither a network error
    nor an AMQP error (a ``ValueError`` from an ssl option, say) is a
    configuration problem: retried slowly, never in a tight loop.
    """
    if isinstance(exc, SetupFailed):
        # A broker answer or a lost connection may pass; a bug in a setup
        # function will not: retry that one slowly.
        return not isinstance(exc.reason, (OSError, AMQPError, CarrotKombuError))
    return isinstance(exc, FATAL_ERRORS) or not isinstance(exc, (OSError, AMQPError))


class Supervisor:
    """Runs the connect/serve/reconnect loop on its own thread."""

    def __init__(
        self, settings: Settings, pool: ChannelPool, bus: EventBus, board: StateBoard, recovery: "Recovery"
    ) -> None:
        self._settings = settings
        self._recovery = recovery
        self._pool = pool
        self._bus = bus
        self._board = board
        self._inbox: "queue.SimpleQueue[tuple[Any, ...]]" = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="carrot-kombu-supervisor", daemon=True)
        self._generation = 0
        self._retired = False
        self._live: Optional[int] = None
        self._endpoint_index = 0
        self._stop_timeout = 5.0
        self._last_failure: BaseException = CarrotKombuError("no attempt yet")
        self._failed_url = ""

    # -- called by the manager -------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def retire(self) -> None:
        """Let a supervisor that did not stop in time finish silently.

        It keeps its own pool and state board (the manager has new ones) and
        posts no more events, so it cannot disturb a manager started again.
        """
        self._retired = True

    def _post(self, event: str, *args: Any) -> None:
        if not self._retired:
            self._bus.post(event, *args)

    def stop(self, timeout: Optional[float]) -> bool:
        """Ask the loop to end; True if it ended within ``timeout``."""
        if timeout is not None:
            self._stop_timeout = max(0.1, timeout / 2)
        self._stopping.set()
        self._inbox.put(("stop",))
        if self._thread is threading.current_thread():
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- posted by link threads ------------------------------------------------------

    def _hooks(self) -> LinkHooks:
        return LinkHooks(
            on_lost=self._on_lost,
            on_blocked=lambda link, reason: self._inbox.put(("blocked", link.generation, reason)),
            on_unblocked=lambda link: self._inbox.put(("unblocked", link.generation)),
        )

    def _on_lost(self, link: Link, exc: BaseException) -> None:
        """From the reader or a writer: stop handing out leases *now*, then tell the loop.

        Waiting for the supervisor to take its turn would let busy threads
        spin on a dead connection that still looks connected.
        """
        message = self._describe(exc)
        self._pool.detach("connection lost", _public(exc, message), link.generation)
        self._recovery.forget(link)
        self._board.update_if(
            lambda status: status.state is ConnectionState.CONNECTED and self._live == link.generation,
            state=ConnectionState.DISCONNECTED, last_error=message,
        )
        self._inbox.put(("lost", link.generation, exc))

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        settings = self._settings
        delays: Optional[Iterator[float]] = None
        try:
            while not self._stopping.is_set():
                link = self._attempt()
                if link is None:
                    if delays is None:
                        delays = settings.backoff.delays()
                    if not self._after_failure(delays):
                        return
                    continue
                delays = None  # the schedule restarts after a success
                lost = self._serve(link)
                if lost is None:
                    return
                # First retry after the first backoff slot: a forced close is
                # recovered in ``Backoff.min``, and a broker that kills every
                # new connection cannot make us spin.
                if not self._wait(settings.backoff.min):
                    return
        except BaseException:  # pragma: no cover - a bug; never leave users hanging
            logger.exception("carrot_kombu supervisor crashed")
            self._board.update(state=ConnectionState.FAILED, last_error="supervisor crashed", next_attempt_at=None)
            self._pool.set_down("supervisor crashed", None)
        finally:
            if self._stopping.is_set():
                self._pool.detach("manager stopped", None)
                self._board.update(state=ConnectionState.STOPPED, next_attempt_at=None, blocked=False, blocked_reason=None)
                self._post("stopped")

    def _attempt(self) -> Optional[Link]:
        settings = self._settings
        endpoint = settings.endpoints[self._endpoint_index]
        self._board.update(state=ConnectionState.CONNECTING, broker=endpoint.masked_url, next_attempt_at=None)
        self._post("connecting")
        self._generation = next(_GENERATIONS)
        try:
            link = open_link(self._generation, endpoint, settings)
        except Exception as exc:
            self._last_failure = exc
            self._failed_url = endpoint.masked_url
            self._endpoint_index = (self._endpoint_index + 1) % len(settings.endpoints)
            return None
        if self._stopping.is_set():
            link.close(self._stop_timeout)
            return None
        # The reader must own the socket before anything else uses it.
        self._live = link.generation
        link.start(self._hooks())
        try:
            self._recovery.restore(link)
        except Exception as exc:
            # Never report connected half-recovered: this attempt failed.
            self._last_failure = SetupFailed(f"setup failed on {endpoint.masked_url}: {self._describe(exc)}", exc)
            self._failed_url = endpoint.masked_url
            self._endpoint_index = (self._endpoint_index + 1) % len(settings.endpoints)
            link.kill(exc)
            return None
        return link


    def _after_failure(self, delays: Iterator[float]) -> bool:
        """Report the failed attempt and wait; False when the loop must end."""
        exc = self._last_failure
        fatal = is_fatal(exc)
        message = self._describe(exc)
        attempts = self._board.current.attempts + 1
        delay = next(delays, None)
        if delay is not None and fatal:
            delay = max(delay, self._settings.backoff.max)
        if delay is None:
            logger.error("carrot_kombu gave up connecting after %d attempt(s): %s", attempts, message)
            self._board.update(
                state=ConnectionState.FAILED, last_error=message, fatal=fatal,
                gave_up=True, attempts=attempts, next_attempt_at=None,
            )
            self._pool.set_down(f"gave up connecting to {self._failed_url}", _public(exc, message))
            self._post("connect_failed", _public(exc, message), None)
            self._stopping.wait()  # stay FAILED until stop()
            return False
        log = logger.error if fatal else logger.warning
        log("carrot_kombu connection attempt failed (%s); next attempt in %.2fs", message, delay)
        self._board.update(
            state=ConnectionState.FAILED if fatal else ConnectionState.DISCONNECTED,
            last_error=message, fatal=fatal, attempts=attempts,
            next_attempt_at=time.monotonic() + delay,
        )
        self._pool.set_down(f"not connected to {self._failed_url}", _public(exc, message))
        self._post("connect_failed", _public(exc, message), delay)
        return self._wait(delay)

    def _serve(self, link: Link) -> Optional[BaseException]:
        """Run a live link until it is lost (returns why) or stop (returns None)."""
        board = self._board
        negotiated = link.negotiated()
        server = link.server()
        self._pool.attach(link, negotiated.get("channel_max"))
        self._recovery.attached(link)
        previous = board.current.connected_since
        board.update(
            state=ConnectionState.CONNECTED,
            connected_since=time.time(),
            reconnects=board.current.reconnects + (1 if previous is not None else 0),
            broker=link.endpoint.masked_url, fatal=False, gave_up=False, attempts=0, next_attempt_at=None,
            blocked=False, blocked_reason=None,
            heartbeat=negotiated.get("heartbeat"), frame_max=negotiated.get("frame_max"),
            channel_max=negotiated.get("channel_max"),
            server_product=server["product"], server_version=server["version"],
        )
        logger.info("carrot_kombu connected to %s", link.endpoint.masked_url)
        self._post("connected")
        lost = self._pump(link)
        if lost is None:
            self._pool.detach("manager stopped", None)
            link.close(self._stop_timeout)
            return None
        message = self._describe(lost)
        self._pool.detach("connection lost", _public(lost, message))
        link.kill(lost)
        logger.warning("carrot_kombu lost its connection to %s: %s", link.endpoint.masked_url, message)
        board.update(
            state=ConnectionState.DISCONNECTED, last_error=message, blocked=False, blocked_reason=None,
            next_attempt_at=time.monotonic() + self._settings.backoff.min,
        )
        self._post("disconnected", _public(lost, message))
        return lost

    def _pump(self, link: Link) -> Optional[BaseException]:
        interval = link.tick_interval
        next_tick = time.monotonic() + interval
        while True:
            try:
                msg = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                msg = None
            if msg is not None:
                kind = msg[0]
                if kind == "stop":
                    return None
                if len(msg) > 1 and msg[1] != link.generation:
                    continue  # news about an earlier connection
                if kind == "lost":
                    return msg[2]  # type: ignore[no-any-return]
                if kind == "blocked":
                    self._board.update(blocked=True, blocked_reason=msg[2])
                    logger.warning("carrot_kombu connection blocked by the broker: %s", msg[2])
                    self._post("blocked", msg[2])
                elif kind == "unblocked":
                    self._board.update(blocked=False, blocked_reason=None)
                    logger.info("carrot_kombu connection unblocked")
                    self._post("unblocked")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + interval
                try:
                    link.tick()
                except Exception as exc:
                    return exc

    def _wait(self, delay: float) -> bool:
        """Sleep ``delay`` unless stopped first; True if the loop may go on."""
        return not self._stopping.wait(delay)

    def _describe(self, exc: BaseException) -> str:
        return self._settings.redact(f"{type(exc).__name__}: {exc}")


def _public(exc: BaseException, message: str) -> BaseException:
    """The error users see: the original when its text is clean, else a stand-in."""
    if message.endswith(str(exc)):
        return exc
    return CarrotKombuError(message)
