"""The kombu private names the transport needs, fenced here with py-amqp's (checked at import by ``_compat``)."""

from __future__ import annotations

from typing import Any

__all__ = ("default_channel", "forget_default_channel", "update_initial_params")


def update_initial_params(client: Any, fields: dict[str, Any]) -> None:
    """Make kombu's failover ``switch()`` start again from ``fields`` too.

    kombu's switch to an alternate starts again from the constructor's
    parameters (``Connection._initial_params``), which for ``pyamqp://``
    include what the first URL said.
    """
    initial = getattr(client, "_initial_params", None)
    if isinstance(initial, dict):
        initial.update(fields)


def default_channel(client: Any) -> Any:
    """kombu's cached default channel of ``client`` (None if none is open yet)."""
    return getattr(client, "_default_channel", None)


def forget_default_channel(client: Any, chan: Any) -> None:
    """``chan`` closed: kombu's ``Connection.default_channel`` opens a new one next time.

    py-amqp reopens a channel the broker closed; kombu's default_channel
    relies on that (one 404 on it and every later use would fail).
    """
    if getattr(client, "_default_channel", None) is chan:
        client._default_channel = None
