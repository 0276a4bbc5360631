"""File-descriptor waits and socket teardown that also work under eventlet and gevent.

Celery's ``-P eventlet`` and ``-P gevent`` monkey-patch the standard library
before the app (and carrot_kombu) is imported: threads become green threads,
``socket.socket`` a green wrapper class, and every blocking call must yield to
the hub.  What that breaks in the connection's I/O, and what this module does
instead:

* eventlet *deletes* ``select.poll`` (gevent replaces it): a wait on a green
  socket uses ``select.select``, which both libraries make cooperative.
* eventlet's ``os.read`` first waits until the descriptor is readable, even
  on a non-blocking pipe, so draining a wake-up pipe to the end would block
  the green thread until the next wake-up: pipes are read and written with
  the C functions of ``posix``, which nobody patches.
* A green socket is not a ``_socket.socket``: the raw shutdown (which must
  not touch a TLS object another thread may be using) goes to the C socket it
  wraps, and eventlet's wrapper class has no ``close`` of its own.

Threading primitives need nothing here: :mod:`carrot_kombu._sync` takes its
locks from ``_thread`` and ``threading`` when it is imported, which under
both pools is after patching, so they are green locks.

Without monkey-patching nothing changes: a wire waits in ``select.poll``
exactly as before (the green path is chosen once per socket).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from typing import Any, Protocol, Sequence

import _socket

#: The C module behind ``os``: monkey-patchers replace ``os`` functions, not these.
_raw_os: Any = sys.modules.get("posix", os)

__all__ = (
    "PatchedTooLate",
    "Poller",
    "SelectPoller",
    "check_patched_in_time",
    "close_socket",
    "is_green",
    "poller",
    "read_fd",
    "green_kombu_sleep",
    "shutdown_socket",
    "write_fd",
)

_POLLIN = select.POLLIN | select.POLLPRI if hasattr(select, "POLLIN") else 1
_POLLOUT = select.POLLOUT if hasattr(select, "POLLOUT") else 4


class PatchedTooLate(RuntimeError):
    """carrot_kombu was imported before eventlet or gevent monkey-patched the standard library."""


def is_green(sock: Any) -> bool:
    """Whether waits on ``sock`` must go through a green hub (the socket or ``select`` is monkey-patched).

    Raises:
        PatchedTooLate: Green, but carrot_kombu's locks were made before the
            patching: they would block the whole process, so refuse.
    """
    green = not isinstance(sock, _socket.socket) or not hasattr(select, "poll")
    if green:
        check_patched_in_time()
        green_kombu_sleep()
    return green


def green_kombu_sleep() -> bool:
    """Make kombu's retry loop sleep cooperatively if it captured the real ``time.sleep``; True if it did.

    ``celery -P gevent`` imports ``kombu.utils.functional`` (``from time
    import sleep``) *before* gevent patches ``time``, and gevent, unlike
    eventlet, does not rebind names bound earlier.  The worker's reconnect
    loop (``retry_over_time``: "Trying again in 2.00 seconds...") then
    freezes the whole process in one-second real sleeps, and our
    supervisor, a green thread, never gets to reconnect while Celery waits
    for it.  Only done when the process is green (the caller checks).
    """
    functional: Any = sys.modules.get("kombu.utils.functional")
    slept = getattr(functional, "sleep", None)
    patched = time.sleep
    if functional is None or slept is None or slept is patched or not _is_builtin(slept):
        return False
    functional.sleep = patched
    return True


def _is_builtin(fn: Any) -> bool:
    return type(fn).__name__ == "builtin_function_or_method" and getattr(fn, "__module__", "") == "time"


def check_patched_in_time() -> None:
    """Refuse when ``_thread`` is green now but was not when :mod:`carrot_kombu._sync` took its lock factory.

    Raises:
        PatchedTooLate: Naming the fix (patch first) and the alternative (a prefork or threads pool).
    """
    import _thread

    from .. import _sync

    if vars(_sync)["allocate_lock"] is not _thread.allocate_lock:  # bound when _sync was imported
        raise PatchedTooLate(
            "carrot_kombu was imported before eventlet/gevent monkey-patched the standard library, so its "
            "locks would block every green thread: call eventlet.monkey_patch() or gevent.monkey.patch_all() "
            "before importing carrot_kombu, kombu or celery (`celery worker -P eventlet|gevent` does it by "
            "itself), or run the worker with -P prefork or -P threads")


class Poller(Protocol):
    """What a wire waits with: ``select.poll``'s ``poll(milliseconds)`` -> ``[(fd, events), ...]``."""

    def poll(self, timeout: int) -> list[tuple[int, int]]: ...


class SelectPoller:
    """A ``select.poll`` look-alike over ``select.select``, which eventlet and gevent make cooperative.

    Args:
        fds: The descriptors to watch.
        write: Wait for writability instead of readability.
    """

    __slots__ = ("_fds", "_write")

    def __init__(self, fds: Sequence[int], write: bool = False) -> None:
        self._fds = list(fds)
        self._write = write

    def poll(self, timeout: int) -> list[tuple[int, int]]:
        """The ready descriptors within ``timeout`` milliseconds (as ``select.poll().poll``)."""
        seconds = max(0.0, timeout / 1000)
        if self._write:
            _, ready, _ = select.select([], self._fds, [], seconds)
            return [(fd, _POLLOUT) for fd in ready]
        ready, _, _ = select.select(self._fds, [], [], seconds)
        return [(fd, _POLLIN) for fd in ready]


def poller(fds: Sequence[int], *, write: bool = False, green: bool = False) -> Poller:
    """A reusable wait until one of ``fds`` is readable (or writable, with ``write``).

    Plain threads get a ``select.poll`` object, as before green support;
    green threads a :class:`SelectPoller` on the same descriptors.
    """
    if green:
        return SelectPoller(fds, write)
    polling = select.poll()
    for fd in fds:
        polling.register(fd, _POLLOUT if write else _POLLIN)
    return polling


def read_fd(fd: int, size: int) -> bytes:
    """``os.read`` that never waits in a hub (the caller made ``fd`` non-blocking)."""
    data: bytes = _raw_os.read(fd, size)
    return data


def write_fd(fd: int, data: bytes) -> int:
    """``os.write`` that never waits in a hub (the caller made ``fd`` non-blocking)."""
    written: int = _raw_os.write(fd, data)
    return written


def _c_socket(sock: Any) -> Any:
    """The ``_socket.socket`` under ``sock`` (itself, gevent's ``_sock``, eventlet's ``fd``); None if none."""
    if isinstance(sock, _socket.socket):
        return sock
    for name in ("_sock", "fd"):
        inner = getattr(sock, name, None)
        if isinstance(inner, _socket.socket):
            return inner
    return None


def shutdown_socket(sock: Any) -> None:
    """``shutdown(SHUT_RDWR)`` on the C socket: never touches a TLS object, wakes every waiter.

    Raises:
        OSError: Not connected (any more), or no C socket found.
    """
    raw = _c_socket(sock)
    if raw is None:
        raise OSError("no socket to shut down")
    _socket.socket.shutdown(raw, socket.SHUT_RDWR)


def close_socket(sock: Any) -> None:
    """Close ``sock`` without a TLS close (``socket.socket.close``, or eventlet's instance ``close``)."""
    close = getattr(socket.socket, "close", None)
    if close is not None and isinstance(sock, socket.socket):
        close(sock)
    else:
        sock.close()
