"""Import-time check of the py-amqp private API this package builds on.

A py-amqp release that renamed, removed or re-shaped one of these would make
the connection fail in obscure ways at run time (a missing attribute on the
reading thread, a wrong positional argument).  Instead, importing
carrot_kombu fails at once with one message naming the installed version and
what is missing.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

__all__ = ("check_pyamqp", "SUPPORTED", "PyAmqpIncompatible")

#: The py-amqp versions CI runs the suite with (both ends of the range).
SUPPORTED = "amqp>=5.2,<6"


class PyAmqpIncompatible(ImportError):
    """The installed py-amqp lacks a private name carrot_kombu relies on."""


def _params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _problems() -> list[str]:
    import amqp
    from amqp import basic_message, serialization, spec, transport
    from amqp.channel import Channel
    from amqp.connection import Connection

    found: list[str] = []

    def need(owner: Any, name: str, label: str) -> None:
        if not hasattr(owner, name):
            found.append(f"{label}.{name}")

    def params_start(fn: Any, expected: list[str], label: str) -> None:
        try:
            actual = _params(fn)
        except (TypeError, ValueError):
            found.append(f"{label} (no signature)")
            return
        if actual[: len(expected)] != expected:
            found.append(f"{label}{tuple(expected)} (found {tuple(actual)})")

    for name in ("_on_tune", "_on_start", "connect", "drain_events", "channel", "collect", "on_inbound_method",
                 "dispatch_method", "_METHODS", "Transport", "on_inbound_frame", "frame_writer",
                 "_get_free_channel_id", "_claim_channel_id", "send_method", "close"):
        need(Connection, name, "amqp.Connection")
    params_start(Connection._on_tune, ["self", "channel_max", "frame_max", "server_heartbeat"], "amqp.Connection._on_tune")
    params_start(Connection.Transport, ["self", "host", "connect_timeout", "ssl", "read_timeout", "write_timeout"],
                 "amqp.Connection.Transport")
    for name in ("_METHODS", "_basic_publish", "basic_publish", "basic_publish_confirm", "basic_consume",
                 "confirm_select", "collect", "open", "close", "dispatch_method", "send_method", "wait",
                 "_on_close", "_on_basic_deliver", "_on_basic_return", "_on_basic_ack", "_on_basic_nack",
                 "_on_basic_cancel", "_on_basic_cancel_ok", "_on_open_ok", "_on_close_ok", "_on_flow"):
        need(Channel, name, "amqp.Channel")
    params_start(Channel.__init__, ["self", "connection", "channel_id", "auto_decode", "on_open"], "amqp.Channel.__init__")
    params_start(Channel._basic_publish, ["self", "msg", "exchange", "routing_key", "mandatory", "immediate"],
                 "amqp.Channel._basic_publish")
    params_start(Channel.basic_consume, ["self", "queue", "consumer_tag", "no_local", "no_ack", "exclusive", "nowait",
                                         "callback", "arguments", "on_cancel"], "amqp.Channel.basic_consume")
    params_start(Channel.send_method, ["self", "sig", "format", "args", "content", "wait", "callback",
                                       "returns_tuple"], "amqp.Channel.send_method")
    for cls in (transport.TCPTransport, transport.SSLTransport):
        for name in ("_setup_transport", "connect", "close"):
            need(cls, name, f"amqp.transport.{cls.__name__}")
    need(transport.SSLTransport, "_wrap_socket_sni", "amqp.transport.SSLTransport")
    need(basic_message.Message, "_serialize_properties", "amqp.basic_message.Message")
    need(basic_message.Message, "PROPERTIES", "amqp.basic_message.Message")
    for name in ("dumps", "loads"):
        need(serialization, name, "amqp.serialization")
    params_start(serialization.loads, ["format", "buf", "offset"], "amqp.serialization.loads")
    # frames.tolerant_frame_handler and TolerantMessage run copies of these with other globals.
    from amqp import method_framing

    for name in ("pstr_t", "datetime", "_read_item", "decode_properties_basic"):
        need(serialization, name, "amqp.serialization")
    need(serialization.GenericContent, "_load_properties", "amqp.serialization.GenericContent")
    need(method_framing, "frame_handler", "amqp.method_framing")
    handler_code = getattr(getattr(method_framing, "frame_handler", None), "__code__", None)
    inner = [c for c in getattr(handler_code, "co_consts", ()) if inspect.iscode(c)]
    if handler_code is not None and not any("Message" in c.co_names for c in [handler_code, *inner]):
        found.append("amqp.method_framing.frame_handler (no longer builds amqp.basic_message.Message)")
    need(spec, "method", "amqp.spec")
    need(amqp.exceptions, "error_for_code", "amqp.exceptions")
    # Attributes py-amqp only creates in __init__: look at an unconnected instance.
    try:
        probe = Connection()
    except Exception as exc:  # pragma: no cover - a very different py-amqp
        found.append(f"amqp.Connection() ({type(exc).__name__}: {exc})")
    else:
        for name in ("_transport", "channels", "_used_channel_ids", "frame_handler_cls", "frame_writer_cls",
                     "channel_max", "frame_max", "connect_timeout", "confirm_publish", "server_properties"):
            need(probe, name, "amqp.Connection()")
    return found


def ssl_option_names() -> frozenset[str]:
    """The ssl options the installed py-amqp accepts without a ``context``.

    The keyword arguments of ``SSLTransport._wrap_socket_sni``, which receives
    the whole ``ssl`` mapping (amqp 5.4 added ``tls_minimum_version`` and
    ``tls_maximum_version``).
    """
    from amqp.transport import SSLTransport

    return frozenset(_params(SSLTransport._wrap_socket_sni)) - {"self", "sock"}


def check_pyamqp() -> None:
    """Raise :class:`PyAmqpIncompatible` if the installed py-amqp lacks what we use.

    Raises:
        PyAmqpIncompatible: Naming the installed version and every missing name.
    """
    import amqp

    missing = _problems()
    if missing:
        raise PyAmqpIncompatible(
            f"carrot_kombu cannot use the installed py-amqp {amqp.__version__}: it relies on py-amqp "
            f"internals that this version changed: {', '.join(missing)}. Supported: {SUPPORTED}."
        )
