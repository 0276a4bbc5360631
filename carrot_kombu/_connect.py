"""Which link a broker URL gets: the one place that knows every transport."""

from __future__ import annotations

from typing import Any, Callable, Optional

from . import _memory
from ._link import Link
from ._pyamqp import link as _amqp
from .config import Endpoint, Settings

__all__ = ("open_link",)


def open_link(generation: int, endpoint: Endpoint, settings: Settings, connect_timeout: Optional[float] = None,
              on_created: Optional[Callable[[Any], None]] = None) -> Link:
    """Connect once to ``endpoint`` (blocking, bounded by ``connect_timeout``).

    Raises:
        Exception: Whatever the transport raised; the caller classifies it.
    """
    # Both imported with the package, not here: an import on the supervisor's
    # thread waits for the import lock of a caller that starts the manager
    # while being imported itself, and without bytecode files
    # (PYTHONDONTWRITEBYTECODE) the compile's scratch memory stays in that
    # thread's malloc arena (measured: +1.8 MB RSS of an idle manager).
    connect = _amqp.connect if endpoint.is_amqp else _memory.connect
    return connect(generation, endpoint, settings, connect_timeout, on_created)
