"""The socket of one connection, shared by one reader at a time and any number of writers.

After the handshake the socket is switched to non-blocking mode and never
changes mode again.  Nobody ever blocks *inside* a socket (or TLS) call:
threads wait in ``poll()`` outside every lock and then make one
non-blocking call.  Three consequences the rest of the library relies on:

* a TLS record that arrives half and then stops can never hold the TLS lock
  (OpenSSL forbids concurrent reads and writes on one SSL object, so all of
  them take that lock, but only for a call that cannot block);
* :meth:`Wire.kill` (``shutdown()`` of the socket) wakes every waiter at
  once, whatever the peer does;
* writes are *group-committed*: a writer appends its bytes to one outgoing
  buffer; if another thread is already sending, it returns at once and that
  thread sends everything in as few system calls as possible.  Bytes leave
  the buffer only once the kernel took them, so an exception in a writer
  (``KeyboardInterrupt``) never leaves half a frame behind: the next writer
  (or the connection's service thread) carries on where it stopped.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import threading
from collections import deque
from time import monotonic
from typing import Any, Callable, Optional, Union

from amqp.exceptions import UnexpectedFrame

from .._sync import Monitor, raised_by_library as _from_library
from .frames import FrameParser
from .green import Poller, close_socket, is_green, poller, read_fd, shutdown_socket, write_fd

__all__ = ("Wire",)

Chunk = Union[bytes, memoryview]

#: Bytes read per system call.
_RECV_SIZE = 256 * 1024
_RECV_ARGS = (_RECV_SIZE,)
#: Most bytes (and buffers) handed to the kernel in one ``sendmsg``.
_SEND_BYTES = 1 << 20
_SEND_BUFFERS = 512
#: Below this size a batch is joined into one buffer instead of gathered.
_JOIN_BELOW = 64 * 1024
#: Writers wait for the buffer to drain below this before adding more.
HIGH_WATER = 4 << 20
#: Longest single ``poll()``: waits are re-checked at least this often.
_POLL_SLICE = 1.0
#: A wait for the socket shorter than this found its bytes already there (a poll that returns at once).
_AT_ONCE = 20e-6



class _Descriptors:
    """The wake-up pipe and the poll a reader waits on: closed with their last reference.

    ``poll()`` and the pipe's ``os.read``/``os.write`` name descriptors by
    number.  Closed while another thread still waited on them, the numbers
    went to the next connection's socket, and the late reader's drain of
    "its" pipe blocked on (and stole bytes of) that socket's TLS handshake.
    So :meth:`Wire.close` only drops the wire's reference: each thread
    inside a wait holds its own (a local variable, released whatever
    interrupts it), and the last one out closes the pipe (CPython frees an
    object the moment its last reference goes).  The socket itself is
    closed at once: a late reader whose poll sees its reused number only
    wakes, and its ``recv`` on the closed socket object fails without
    touching the descriptor.
    """

    __slots__ = ("wake_r", "wake_w", "rpoll")

    def __init__(self, fd: int, green: bool) -> None:
        self.wake_r = self.wake_w = -1  # what __del__ sees if os.pipe() fails
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        # select.poll on OS threads; a cooperative select under eventlet/gevent (see .green).
        self.rpoll = poller((fd, self.wake_r), green=green)

    def __del__(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Wire:
    """Non-blocking frame I/O on a connected (possibly TLS) socket.

    Args:
        sock: The connected socket (``ssl.SSLSocket`` for TLS); from now on owned here.
        initial: Bytes the handshake had already read past its last frame.
        max_frame: Largest frame payload accepted from the peer.
        on_failed: Called once, from the thread that saw it, when the socket fails.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        initial: bytes = b"",
        max_frame: int = 131072,
        on_failed: Optional[Callable[[BaseException], None]] = None,
    ) -> None:
        self._sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        # OpenSSL's SSL object is not thread-safe: every call on it holds this
        # lock, and every such call is non-blocking, so it is held for microseconds.
        self._tls_lock = threading.Lock()
        sock.setblocking(False)
        self._fd = sock.fileno()
        self._parser = FrameParser(initial, max_frame + 8)
        # -- reader state (the current reader only) --
        #: Chunks the kernel handed over, not yet in the parser.
        self._rx: deque[bytes] = deque()
        #: Frames parsed, not yet dispatched.
        self._todo: deque[tuple[int, int, bytes]] = deque()
        #: A frame is being dispatched: an exception escaping now leaves it half handled.
        self.in_frame = False
        #: The last :meth:`read` found the socket empty on its first try: the
        #: next one waits for it first.  A caller waiting for its reply or
        #: confirm reads right after writing, when the answer cannot be there
        #: yet; the receive it would try first fails with EAGAIN, which costs a
        #: system call and an exception per message (measured: ~3 % of a
        #: confirmed publish's CPU).  Back to receiving first when a wait
        #: ends at once (a stream of deliveries: the bytes are already there).
        self._wait_first = False
        green = is_green(sock)
        #: The wake-up pipe; None once closed (see _Descriptors).
        self._fds: Optional[_Descriptors] = _Descriptors(self._fd, green)
        self._wpoll = poller((self._fd,), write=True, green=green)
        #: Waits on this socket go through a green hub (no event loop may watch it).
        self.green = green
        self._rpeek: Optional[Poller] = None  # readable(): made on first use
        self._on_failed = on_failed
        # -- writer state, behind _wcond --
        self._wcond = Monitor()
        self._out: deque[Chunk] = deque()
        # Byte counters instead of trimming chunks as the kernel takes them:
        # every update is one statement (see _settle), so an exception raised
        # into the flushing thread never leaves them half done.
        self._queued = 0  # bytes ever accepted by enqueue()
        self._sent = 0  # bytes ever taken by the kernel
        self._trimmed = 0  # bytes of the chunks already dropped from _out
        #: What the kernel took in the last send, until added to _sent.
        self._took: deque[int] = deque()
        self._flushing = False
        self._tls_inflight: Optional[bytes] = None
        self._dead: Optional[BaseException] = None
        #: monotonic() of the last byte received / sent.
        self.last_rx = self.last_tx = monotonic()
        #: Since when the current flush has been unable to make progress.
        self.stalled_since: Optional[float] = None
        self.closed = False
        self._batch_bytes = 0

    # -- state ----------------------------------------------------------------------------

    @property
    def dead(self) -> Optional[BaseException]:
        return self._dead

    def set_max_frame(self, size: int) -> None:
        self._parser.max_size = size + 8

    @property
    def pending_output(self) -> int:
        """Bytes accepted from writers that the kernel has not taken yet."""
        return self._queued - self._sent - (self._took[0] if self._took else 0)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued and not yet taken by the kernel (what :meth:`wait_room` compares with ``HIGH_WATER``)."""
        return self._queued - self._sent

    # -- reading (one thread at a time: the connection's current reader) --------------------

    def read(self, timeout: Optional[float], dispatch: Callable[["deque[tuple[int, int, bytes]]"], None]) -> bool:
        """Hand what arrives to ``dispatch``, waiting at most ``timeout`` seconds for something.

        Returns:
            True if frames were dispatched; False on timeout or when
            :meth:`wake_reader` was called.

        Raises:
            OSError: The socket failed or the peer closed it.
            UnexpectedFrame: The stream is not AMQP.
            BaseException: Whatever interrupted this thread (a signal
                handler's exception); the connection is dropped only if that
                happened while bytes were in flight (see :meth:`pump`).
        """
        deadline = None if timeout is None else monotonic() + timeout
        # Bytes left in _rx by an interrupted reader are not in the socket:
        # taken first, whatever the last read found.
        receive = not self._wait_first or bool(self._rx)
        first = True
        while True:
            if self._dead is not None:
                raise _as_oserror(self._dead)
            if self.pump(dispatch, receive):
                return True
            if first and receive:
                self._wait_first = True
            remaining = _POLL_SLICE if deadline is None else min(_POLL_SLICE, deadline - monotonic())
            if remaining <= 0:
                return False
            # Waiting: an exception here (Ctrl-C, a signal handler) loses nothing.
            began = monotonic()
            if self.wait_readable(remaining):
                return False
            if first and not receive and monotonic() - began < _AT_ONCE:
                self._wait_first = False  # the bytes were there already
            receive, first = True, False

    def wait_readable(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for data; True if :meth:`wake_reader` (or :meth:`close`) ended the wait."""
        fds = self._fds  # ours until this frame ends: the descriptors stay open meanwhile
        if fds is None:
            return True
        try:
            events = fds.rpoll.poll(max(1, int(timeout * 1000 + 0.999)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries poll itself
            return False
        woken = False
        for fd, _ in events:
            if fd == fds.wake_r:
                self._drain_wake(fds)
                woken = True
        return woken

    def pump(self, dispatch: Callable[["deque[tuple[int, int, bytes]]"], None], receive: bool = True) -> bool:
        """Take what the socket has now (never waits) and dispatch its complete frames.

        With ``receive`` False, only what was received already (parsed or
        not) is dispatched: the socket is not asked.

        ``dispatch`` handles the frames of the deque it is given, removing
        each once handled, and sets :attr:`in_frame` while handling one.
        Bytes and frames move between the kernel, ``_rx``, the parser and
        ``_todo`` in steps an exception raised into this thread cannot split
        (see :mod:`carrot_kombu._sync`): such an exception (a signal
        handler's; only the main thread gets them) loses nothing and leaves
        the rest to the next reader, unless it comes while a frame is being
        handled: that frame is then half handled, and the connection is
        dropped.

        Returns:
            True if at least one frame was dispatched.
        """
        parser = self._parser
        todo = self._todo
        try:
            if receive and self._recv_into(parser):
                self.last_rx = monotonic()
            parser.frames_into(todo)
            if not todo:
                return False
            dispatch(todo)
            return True
        except BaseException as exc:
            if isinstance(exc, (OSError, UnexpectedFrame)):
                self._failed(exc)
                raise
            if _from_library(exc):
                # Our own (or py-amqp's) dispatch failed on something the broker
                # sent: the connection goes, and the thread reading gets
                # Disconnected like everybody else, not our internal error.
                failure = ConnectionAbortedError(
                    errno.ECONNABORTED, f"could not handle what the broker sent: {type(exc).__name__}: {exc}")
                failure.__cause__ = exc
                self._failed(failure)
                raise failure from exc
            if self.in_frame:
                # A signal handler's exception (it belongs to this thread:
                # Celery's soft time limit, a SIGALRM timeout) inside a frame's
                # handling: the frame is half handled.
                self.in_frame = False
                self._failed(ConnectionAbortedError(
                    errno.ECONNABORTED, f"{type(exc).__name__} interrupted the handling of a frame"))
            raise

    def fileno(self) -> int:
        """The socket's descriptor (to watch it for readability: see :mod:`.loopturn`)."""
        return self._fd

    def readable(self) -> bool:
        """Whether bytes wait unread right now (in the socket, or parsed and not yet dispatched); never waits."""
        if self._todo:
            return True
        if self._rpeek is None:
            self._rpeek = poller((self._fd,), green=self.green)
        return bool(self._rpeek.poll(0))

    def wake_reader(self) -> None:
        """Make a reader waiting in :meth:`read` return now."""
        fds = self._fds
        if fds is None:
            return  # closed: no reader waits here any more
        try:
            write_fd(fds.wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a wake-up is pending anyway

    @staticmethod
    def _drain_wake(fds: _Descriptors) -> None:
        try:
            while read_fd(fds.wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _recv_into(self, parser: FrameParser) -> bool:
        """Feed ``parser`` whatever the socket has now; False if nothing. Raises on EOF or error.

        ``rx.extend(map(sock.recv, ...))`` is one call into C: the bytes the
        kernel hands over are in ``_rx`` before any signal handler can run.
        """
        sock = self._sock
        rx = self._rx
        got = bool(rx)  # left by a reader interrupted before the parser took them
        if not self._tls:
            try:
                rx.extend(map(sock.recv, _RECV_ARGS))
            except (BlockingIOError, InterruptedError):
                pass
            else:
                if not rx[-1]:
                    raise OSError(errno.ECONNRESET, "Server unexpectedly closed connection")
                got = True
            parser.take(rx)
            return got
        with self._tls_lock:
            while True:
                try:
                    rx.extend(map(sock.recv, _RECV_ARGS))
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    rx.append(b"")
                if not rx[-1]:
                    rx.pop()
                    if got:
                        break  # the end is seen by the next read
                    raise OSError(errno.ECONNRESET, "Server unexpectedly closed connection")
                got = True
                if not sock.pending():  # type: ignore[attr-defined]
                    # One more recv would only say "want read": save the call.
                    break
        parser.take(rx)
        return got

    # -- writing (any thread) -----------------------------------------------------------------

    def enqueue(self, chunks: list[Chunk], *, wait_room: bool = True) -> bool:
        """Accept ``chunks`` for sending, in order, whole.

        Returns True when the calling thread should now call :meth:`flush`
        (nobody was sending).  The flusher role is claimed inside
        :meth:`flush`, so a caller interrupted before it gets there leaves
        nothing wedged: the next writer (or the service thread) sends.
        With ``wait_room`` the caller first waits
        while more than ``HIGH_WATER`` bytes are queued (back-pressure from
        a slow peer); the connection's own replies never wait.

        Raises:
            OSError: The connection is dead (nothing was queued).
        """
        size = 0
        for chunk in chunks:
            size += len(chunk)
        with self._wcond.lock:
            if wait_room:
                while self.pending_bytes > HIGH_WATER and self._flushing and self._dead is None:
                    self._wcond.wait(_POLL_SLICE)
            if self._dead is not None:
                raise _as_oserror(self._dead)
            self._queued += size
            self._out.extend(chunks)  # no bytecode boundary since the line above (see _sync)
            return not self._flushing

    def wait_room(self, deadline: Optional[float] = None) -> bool:
        """Wait while the outgoing buffer is over ``HIGH_WATER`` (back-pressure), until it drains or dies.

        Returns:
            False if ``deadline`` (``time.monotonic()``) passed first.
        """
        if self.pending_bytes <= HIGH_WATER:
            return True
        with self._wcond.lock:
            while self.pending_bytes > HIGH_WATER and self._flushing and self._dead is None:
                if deadline is not None and monotonic() >= deadline:
                    return False
                self._wcond.wait(_POLL_SLICE)
        return True

    def holds(self, chunks: list[Chunk]) -> bool:
        """Whether ``chunks`` were queued (the first one is in the outgoing buffer, or was sent)."""
        first = chunks[0] if chunks else None
        with self._wcond.lock:
            return any(item is first for item in self._out)

    def send(self, chunks: list[Chunk]) -> None:
        """Queue ``chunks`` and make sure they are being sent."""
        self.enqueue(chunks)
        self.flush()

    def send_nowait(self, chunks: list[Chunk]) -> None:
        """Queue ``chunks`` without ever blocking (for the reading thread's own replies).

        What the socket does not take at once is sent by the next writer or
        by the connection's service thread (:meth:`flush_pending`).
        """
        self.enqueue(chunks, wait_room=False)
        self.flush(block=False)

    def flush_pending(self, block: bool = False) -> None:
        """Send what earlier writers left behind, if nobody is sending now."""
        if self._queued != self._sent and self._dead is None:
            self.flush(block=block)

    def flush(self, block: bool = True, until: Optional[float] = None) -> None:
        """Send the buffer until it is empty, unless another thread already is sending.

        With ``block=False`` stop at the first would-block and leave the rest;
        with ``until`` (``time.monotonic()``) stop at a would-block after it
        (the service thread's :meth:`flush_pending` sends the rest).

        Raises:
            OSError: The socket failed (the connection is then dead).
        """
        claimed = False
        try:
            # Claimed inside the try: an exception raised into this thread right
            # after the claim still reaches the handler that gives it up.
            with self._wcond.lock:
                if self._flushing:
                    return  # the thread sending now sends ours too
                self._flushing = claimed = True
            while True:
                with self._wcond.lock:
                    self._settle()
                    if self._dead is not None:
                        raise _as_oserror(self._dead)
                    if self._sent == self._queued:
                        # In the same critical section as the check: a writer
                        # that queues after this sees nobody flushing and flushes.
                        self._flushing = claimed = False
                        self._wcond.notify_all()
                        return
                    batch = self._batch()
                sent = self._send(batch, block, until)
                with self._wcond.lock:
                    self._settle()
                    if not sent:
                        self._flushing = claimed = False
                    self._wcond.notify_all()
                if not sent:
                    return
        except BaseException as exc:
            # Whatever interrupted us, what the kernel took is in _took: counted
            # now, so the next flusher goes on exactly where the stream is.
            if claimed:
                with self._wcond.lock:
                    self._settle()
                    self._flushing = False
                    self._wcond.notify_all()
            if isinstance(exc, OSError):
                self._failed(exc)
            raise

    def _batch(self) -> list[Chunk]:
        if self._tls and self._tls_inflight is not None:
            return [self._tls_inflight]
        batch: list[Chunk] = []
        total = 0
        skip = self._sent - self._trimmed  # of the first chunk, already sent
        for chunk in self._out:
            if skip:
                chunk = memoryview(chunk)[skip:]
                skip = 0
            batch.append(chunk)
            total += len(chunk)
            if total >= _SEND_BYTES or len(batch) >= _SEND_BUFFERS:
                break
        self._batch_bytes = total
        if self._tls:
            # OpenSSL must be retried with the very same bytes after "want write".
            self._tls_inflight = b"".join(batch)
            return [self._tls_inflight]
        return batch

    def _settle(self) -> None:
        """Count what the kernel took and drop the chunks it finished (under ``_wcond``).

        Each update is a statement followed by a call with no bytecode
        boundary between them, so whatever interrupts this thread, the
        counters and ``_out`` agree (see :mod:`carrot_kombu._sync`).
        """
        took = self._took
        if took:
            self._sent += took[0]
            self._tls_inflight = None
            took.clear()
        out = self._out
        while out:
            size = len(out[0])
            if self._trimmed + size > self._sent:
                return
            self._trimmed += size
            out.popleft()

    def _send(self, batch: list[Chunk], block: bool, until: Optional[float] = None) -> int:
        """Bytes the kernel took (all of an in-flight TLS buffer, or 0: would block and may not wait).

        What the kernel takes is recorded in ``_took`` by the same call into C
        (``extend(map(send, ...))``): no signal handler can run in between.
        """
        sock = self._sock
        took = self._took
        while True:
            if self._dead is not None:
                raise _as_oserror(self._dead)
            try:
                if self._tls:
                    with self._tls_lock:
                        took.extend(map(sock.send, batch))
                elif len(batch) == 1:
                    took.extend(map(sock.send, batch))
                elif self._batch_bytes <= _JOIN_BELOW:
                    took.extend(map(sock.send, (b"".join(batch),)))  # cheaper than a gather for small writes
                else:
                    took.extend(map(sock.sendmsg, (batch,)))
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                pass
            sent = took[0] if took else 0
            if sent:
                self.last_tx = monotonic()
                self.stalled_since = None
                return sent
            took.clear()
            if self.stalled_since is None:
                self.stalled_since = monotonic()
            if not block or (until is not None and monotonic() >= until):
                return 0
            self._wpoll.poll(int(_POLL_SLICE * 1000))

    # -- teardown ---------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        first = False
        with self._wcond.lock:
            if self._dead is None:
                self._dead = exc
                first = True
            self._wcond.notify_all()
        if first:
            self._shutdown()
            if self._on_failed is not None:
                self._on_failed(exc)

    def fail(self, exc: BaseException) -> None:
        """Declare the connection dead from outside (a missed heartbeat...)."""
        self._failed(exc)

    def kill(self, exc: BaseException) -> None:
        """Dead from now on: wakes every waiter at once; no handshake, never blocks.

        ``on_failed`` is not called (the caller already knows).
        """
        with self._wcond.lock:
            if self._dead is None:
                self._dead = exc
            self._wcond.notify_all()
        self._shutdown()

    def disown(self, exc: BaseException) -> None:
        """In a forked child: dead, without touching the socket the parent still uses."""
        self._dead = exc

    def _shutdown(self) -> None:
        try:
            # On the raw socket, under no lock: a TLS shutdown would need the SSL object.
            shutdown_socket(self._sock)
        except (OSError, ValueError):
            pass
        self.wake_reader()

    def close(self) -> None:
        """Release the socket and the wake-up pipe (after :meth:`kill`).

        At once if no thread is waiting on them, else as the last one leaves
        its wait (a reader woken by :meth:`kill` leaves within its poll).
        """
        if self.closed:
            return
        self.closed = True
        self._fds = None
        try:
            close_socket(self._sock)
        except OSError:
            pass


def _as_oserror(exc: BaseException) -> OSError:
    """A fresh error for each raise (one instance raised in many threads mixes tracebacks)."""
    error = ConnectionAbortedError(errno.ECONNABORTED, f"connection is dead: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def poll_readable(sock: Any, timeout: float) -> bool:
    """True when ``sock`` has something to read within ``timeout`` (tests, probes)."""
    waits = poller((sock.fileno(),), green=not hasattr(select, "poll"))
    return bool(waits.poll(int(timeout * 1000)))
