"""Raise an exception into the calling thread at chosen points, the way a signal handler does.

A raising signal handler (Ctrl-C, ``SIGALRM``, Celery's soft time limit) runs
when CPython checks its "eval breaker": on entering a Python function (or resuming a
generator after a ``yield``), on a backward jump, and right after a call
returns.  :class:`InterruptAt` raises
:class:`Interrupt` at the ``n``-th such point reached in the given source
files (by ``sys.settrace`` opcode events, in the calling thread only), so a
test can walk ``n = 1, 2, ...`` and interrupt a call at *every* place a real
signal could, deterministically, instead of hoping a timer hits the one bad
bytecode (the signal storm found a leaked lock that way, 3 runs in 16).

CPython attributes an interrupt "after a call" to the call instruction, so
the ``try``/``with`` handlers around the call handle it.  A trace function
can only raise before the *next* instruction: where that one lies under a
different handler (the call was the last thing in a ``with`` block, e.g.
``return f()`` inside ``with lock:``), raising there would skip the block's
``__exit__``, which a real signal cannot do, so such points are skipped
(:attr:`InterruptAt.skipped`).  The point right after a ``with`` statement's
own ``__exit__`` call is a real one: the lock is free again, but the code
after the block has not run (a ``cancel()`` lost its cleanup there).
"""

from __future__ import annotations

import dis
import sys
from types import FrameType
from typing import Any, Optional

__all__ = ("Interrupt", "InterruptAt")

_CALLS = {dis.opmap[name] for name in ("CALL", "CALL_FUNCTION_EX") if name in dis.opmap}
_BACKWARD = {dis.opmap[name] for name in ("JUMP_BACKWARD", "JUMP_BACKWARD_NO_INTERRUPT") if name in dis.opmap}
_RESUME = dis.opmap["RESUME"]
_NO_INTERRUPT = {dis.opmap[name] for name in ("JUMP_BACKWARD_NO_INTERRUPT",) if name in dis.opmap}


class Interrupt(BaseException):
    """What the simulated signal handler raises (a BaseException, like ``KeyboardInterrupt``)."""


class InterruptAt:
    """``with InterruptAt(n, files) as spot:`` raises :class:`Interrupt` at the ``n``-th point.

    ``files``: parts of the source paths whose code is interrupted
    (``"carrot_kombu/_pyamqp/reader.py"``, or ``"/carrot_kombu/"`` for all of it).

    Attributes:
        points: How many interrupt points the block passed (all of them if
            ``fired`` is False: walking ``n`` past it is pointless).
        fired: Whether the interrupt was raised.
        where: ``function:line`` where it was raised.
        skipped: Points after a call that a trace function cannot model (see the module doc).
    """

    def __init__(self, n: int, files: tuple[str, ...]) -> None:
        self.n = n
        self.files = files
        self.points = 0
        self.fired = False
        self.where = ""
        self._after_call: dict[int, Optional[int]] = {}
        self.skipped = 0
        self._previous: Any = None

    def __enter__(self) -> "InterruptAt":
        self._previous = sys.gettrace()
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc: Any) -> None:
        sys.settrace(self._previous)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Optional[Any]:
        filename = frame.f_code.co_filename
        if event != "call" or not any(part in filename for part in self.files):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        self._after_call[id(frame)] = None
        code = frame.f_code
        if frame.f_lasti > 0 and code.co_code[frame.f_lasti] == _RESUME and code.co_code[frame.f_lasti + 1] != 0:
            # A generator resumed (``with`` leaving a @contextmanager block):
            # CPython checks at RESUME after a plain yield, inside the frame's
            # try blocks, but an exception from the trace's call event would
            # skip them; raised at the next instruction instead, like a call's.
            if code.co_code[frame.f_lasti + 1] == 1:
                self._after_call[id(frame)] = frame.f_lasti
            return self._local
        if self._point(frame, "entry"):
            raise Interrupt(self.where)
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Optional[Any]:
        if event == "return":
            self._after_call.pop(id(frame), None)
            return None
        if event != "opcode":
            return self._local
        code = frame.f_code
        offset = frame.f_lasti
        op = code.co_code[offset]
        key = id(frame)
        call = self._after_call.get(key)
        self._after_call[key] = offset if op in _CALLS else None
        if call is not None:
            if _handler(code, call) != _handler(code, offset):
                self.skipped += 1  # a real interrupt here goes to the call's handler: see the module doc
            elif self._point(frame, "after call"):
                raise Interrupt(self.where)
        elif op in _BACKWARD and op not in _NO_INTERRUPT and self._point(frame, "loop"):
            raise Interrupt(self.where)
        return self._local

    def _point(self, frame: FrameType, kind: str) -> bool:
        if self.fired:
            return False
        self.points += 1
        if self.points != self.n:
            return False
        self.fired = True
        self.where = f"{frame.f_code.co_name}:{frame.f_lineno} ({kind})"
        return True


def _handler(code: Any, offset: int) -> Optional[int]:
    """The exception handler (target offset) covering ``offset``; None outside every ``try``/``with``."""
    table = _TABLES.get(code)
    if table is None:
        table = _TABLES[code] = [(e.start, e.end, e.target) for e in dis._parse_exception_table(code)]  # type: ignore[attr-defined]
    for start, end, target in table:
        if start <= offset < end:
            return target
    return None


_TABLES: dict[Any, list[tuple[int, int, int]]] = {}
