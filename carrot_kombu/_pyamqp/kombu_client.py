"""The kombu private names the transport needs, fenced here with py-amqp's (checked at import by ``_compat``)."""

from __future__ import annotations

from typing import Any

__all__ = ("forget_default_channel",)


def forget_default_channel(client: Any, chan: Any) -> None:
    """``chan`` closed: kombu's ``Connection.default_channel`` opens a new one next time.

    py-amqp reopens a channel the broker closed; kombu's default_channel
    relies on that (one 404 on it and every later use would fail).
    """
    if getattr(client, "_default_channel", None) is chan:
        client._default_channel = None
