"""Which link a broker URL gets: the one place that knows every transport."""

from __future__ import annotations

from typing import Any, Callable, Optional

from ._link import Link
from .config import Endpoint, Settings

__all__ = ("open_link",)


def open_link(generation: int, endpoint: Endpoint, settings: Settings, connect_timeout: Optional[float] = None,
              on_created: Optional[Callable[[Any], None]] = None) -> Link:
    """Connect once to ``endpoint`` (blocking, bounded by ``connect_timeout``).

    Raises:
        Exception: Whatever the transport raised; the caller classifies it.
    """
    if endpoint.is_amqp:
        from ._pyamqp.link import connect
    else:
        from ._memory import connect  # type: ignore[assignment]
    return connect(generation, endpoint, settings, connect_timeout, on_created)
