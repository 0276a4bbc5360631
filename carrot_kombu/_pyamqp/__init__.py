"""The fenced py-amqp layer: the only code that touches py-amqp's private API.

Everything carrot_kombu adds to py-amqp objects lives in one object of ours
per py-amqp object (``conn.carrot``, ``channel.carrot``).  At import, every
private py-amqp name this package relies on is checked (``_compat``); a
py-amqp release that renamed one fails here, with the installed version in
the message, instead of deep inside a connection.
"""

from ._compat import check_pyamqp

check_pyamqp()

from .callbacks import EventQueue  # noqa: E402
from .channel import SupervisedChannel  # noqa: E402
from .chanstate import ChannelPhase, ChanState  # noqa: E402
from .connection import LinkOptions, SupervisedConnection, SupervisedTransport  # noqa: E402
from .connstate import ConnState  # noqa: E402
from .messages import SafeMessage  # noqa: E402
from .replies import ConnHooks, Reply, ReplyPhase, Waiter  # noqa: E402

__all__ = (
    "ChanState",
    "ChannelPhase",
    "ConnHooks",
    "ConnState",
    "EventQueue",
    "LinkOptions",
    "Reply",
    "ReplyPhase",
    "SafeMessage",
    "SupervisedChannel",
    "SupervisedConnection",
    "SupervisedTransport",
    "Waiter",
    "check_pyamqp",
)
