"""Connection state and the ``status()`` snapshot."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field, replace
from typing import Any, Optional
from ._metrics import Metrics
from ._sync import Monitor

__all__ = ("ConnectionState", "Status", "StateBoard")


class ConnectionState(str, enum.Enum):
    """Where a manager's connection is in its life.

    * ``STOPPED``: not started, or stopped.
    * ``CONNECTING``: an attempt is under way.
    * ``CONNECTED``: leases can be taken.
    * ``DISCONNECTED``: the last attempt failed or the connection was lost;
      waiting for the next attempt.
    * ``FAILED``: the policy gave up (``max_tries``/``max_time``), or the
      broker refused us for a reason a retry will not fix (wrong credentials,
      unknown vhost, bad certificate).  After a fatal error the manager still
      retries, but only every ``Backoff.max`` seconds; ``status().next_attempt_in``
      is ``None`` once it has given up for good.
    """

    STOPPED = "STOPPED"
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"
    FAILED = "FAILED"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class PoolStatus:
    """Channels of the pool: ``leased`` to borrowers, ``idle``, ``verifying``
    (released after a write the broker could still refuse; idle once it
    answered), ``opening`` (being opened for a borrower now), at most ``limit``;
    ``waiting``: callers of ``open_channel()`` waiting for one of them."""

    leased: int = 0
    idle: int = 0
    limit: int = 0
    verifying: int = 0
    opening: int = 0
    waiting: int = 0


@dataclass(frozen=True)
class Status:
    """A consistent snapshot of a manager; :meth:`as_dict` is JSON-ready.

    Times are seconds; ``connected_since`` is a UNIX timestamp.  ``fatal``
    says the last attempt was refused for a reason retrying will not fix;
    ``gave_up`` that the backoff policy ran out (no more attempts until
    ``stop()`` and ``start()``).
    """

    state: ConnectionState = ConnectionState.STOPPED
    broker: Optional[str] = None
    connected_since: Optional[float] = None
    reconnects: int = 0
    attempts: int = 0
    last_error: Optional[str] = None
    fatal: bool = False
    gave_up: bool = False
    next_attempt_in: Optional[float] = None
    blocked: bool = False
    blocked_reason: Optional[str] = None
    pool: PoolStatus = field(default_factory=PoolStatus)
    heartbeat: Optional[float] = None
    frame_max: Optional[int] = None
    channel_max: Optional[int] = None
    server_product: Optional[str] = None
    server_version: Optional[str] = None
    #: What is declared or consumed but cannot be served right now, and why
    #: (``{"queue 'jobs'": "NotFound: ... home node ... is down"}``).
    degraded: tuple[tuple[str, str], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "broker": self.broker,
            "connected_since": self.connected_since,
            "reconnects": self.reconnects,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "fatal": self.fatal,
            "gave_up": self.gave_up,
            "next_attempt_in": self.next_attempt_in,
            "blocked": self.blocked,
            "blocked_reason": self.blocked_reason,
            "pool": {
                "leased": self.pool.leased, "idle": self.pool.idle, "verifying": self.pool.verifying,
                "opening": self.pool.opening, "limit": self.pool.limit, "waiting": self.pool.waiting,
            },
            "heartbeat": self.heartbeat,
            "frame_max": self.frame_max,
            "channel_max": self.channel_max,
            "server": {"product": self.server_product, "version": self.server_version},
            "degraded": dict(self.degraded),
        }


class StateBoard:
    """The one mutable record of a manager's state, behind one condition.

    The supervisor changes it only through the transition methods below
    (one per thing that can happen); readers take :meth:`snapshot` or wait
    for a state with :meth:`wait_for`.
    """

    # -- transitions -------------------------------------------------------------------

    def starting(self) -> None:
        self.update(state=ConnectionState.CONNECTING, next_attempt_at=None)

    def connecting(self, broker: str) -> None:
        self.metrics.connection_attempts += 1  # the supervisor thread only
        self.update(state=ConnectionState.CONNECTING, broker=broker, next_attempt_at=None)

    def connected(self, broker: str, negotiated: dict[str, Any], server: dict[str, Optional[str]]) -> None:
        current = self.current
        self.metrics.reconnects += current.connected_since is not None  # the supervisor thread only
        self.update(
            state=ConnectionState.CONNECTED,
            connected_since=time.time(),
            reconnects=current.reconnects + (1 if current.connected_since is not None else 0),
            broker=broker, fatal=False, gave_up=False, attempts=0, next_attempt_at=None,
            blocked=False, blocked_reason=None,
            heartbeat=negotiated.get("heartbeat"), frame_max=negotiated.get("frame_max"),
            channel_max=negotiated.get("channel_max"),
            server_product=server["product"], server_version=server["version"],
        )

    def attempt_failed(self, message: str, fatal: bool, delay: float) -> None:
        self.update(
            state=ConnectionState.FAILED if fatal else ConnectionState.DISCONNECTED,
            last_error=message, fatal=fatal, attempts=self.current.attempts + 1,
            next_attempt_at=time.monotonic() + delay,
        )

    def gave_up(self, message: str, fatal: bool) -> None:
        self.update(
            state=ConnectionState.FAILED, last_error=message, fatal=fatal,
            gave_up=True, attempts=self.current.attempts + 1, next_attempt_at=None,
        )

    def lost(self, message: str, next_attempt_in: Optional[float]) -> None:
        self.update(
            state=ConnectionState.DISCONNECTED, last_error=message, blocked=False, blocked_reason=None,
            next_attempt_at=None if next_attempt_in is None else time.monotonic() + next_attempt_in,
        )

    def lost_if_live(self, message: str, live: Any) -> bool:
        """From any thread: DISCONNECTED now, if still CONNECTED and ``live()`` holds."""
        return self.update_if(
            lambda status: status.state is ConnectionState.CONNECTED and live(),
            state=ConnectionState.DISCONNECTED, last_error=message,
        )

    def blocked_by_broker(self, reason: Optional[str]) -> None:
        self.update(blocked=reason is not None, blocked_reason=reason)

    def set_degraded(self, items: dict[str, str]) -> None:
        self.update(degraded=tuple(sorted(items.items())))

    def stopped(self) -> None:
        self.update(state=ConnectionState.STOPPED, next_attempt_at=None, blocked=False, blocked_reason=None)

    def crashed(self) -> None:
        self.update(state=ConnectionState.FAILED, last_error="supervisor crashed", next_attempt_at=None)

    # -- plumbing ------------------------------------------------------------------------

    def __init__(self, broker: str, metrics: Optional[Metrics] = None) -> None:
        self.metrics = metrics or Metrics()
        self._cond = Monitor()
        self._status = Status(broker=broker)
        self._next_attempt_at: Optional[float] = None

    @property
    def state(self) -> ConnectionState:
        return self._status.state

    @property
    def current(self) -> Status:
        """The latest status (without pool figures)."""
        return self._status

    def update(self, *, next_attempt_at: Any = ..., **changes: Any) -> Status:
        with self._cond.lock:
            if next_attempt_at is not ...:
                self._next_attempt_at = next_attempt_at
            self._status = replace(self._status, **changes)
            self._cond.notify_all()
            return self._status

    def update_if(self, predicate: Any, **changes: Any) -> bool:
        """Apply ``changes`` only if ``predicate(status)`` holds, atomically."""
        with self._cond.lock:
            if not predicate(self._status):
                return False
            self._status = replace(self._status, **changes)
            self._cond.notify_all()
            return True

    def snapshot(self, pool: PoolStatus) -> Status:
        with self._cond.lock:
            status, at = self._status, self._next_attempt_at
        remaining = None if at is None else max(0.0, round(at - time.monotonic(), 3))
        return replace(status, pool=pool, next_attempt_in=remaining)

    def wait_for(self, predicate: Any, timeout: Optional[float]) -> bool:
        with self._cond.lock:
            return bool(self._cond.wait_for(lambda: predicate(self._status), timeout))
