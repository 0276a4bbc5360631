"""Compatibility re-exports: the connection and channel state now live in their own modules.

:mod:`.replies` (Waiter, Reply, ConnHooks), :mod:`.callbacks` (EventQueue),
:mod:`.reader` (leader/follower reading, the service thread, liveness),
:mod:`.connstate` (ConnState) and :mod:`.chanstate` (ChanState).
"""

from __future__ import annotations

from .callbacks import EventQueue
from .chanstate import ChannelPhase, ChanState
from .connstate import ConnState
from .reader import GRACE
from .replies import ConnHooks, Reply, ReplyPhase, Waiter

__all__ = (
    "GRACE", "ChanState", "ChannelPhase", "ConnHooks", "ConnState", "EventQueue", "Reply", "ReplyPhase", "Waiter",
)
