"""Checks of declare arguments before anything is sent: py-amqp's own encoder is the judge.

Used when an entity is *registered* (``manager.declare``, ``consume``): a
name or an argument table that cannot go on the wire would otherwise fail on
every later connection, where nobody can report it to the caller.
"""

from __future__ import annotations

from typing import Any, Mapping

from amqp.serialization import dumps

from .._sync import raised_by_library
from .frames import _check_table, _shortstr

__all__ = ("check_shortstr", "check_table")


def check_shortstr(name: str, value: Any) -> None:
    """``value`` is a ``str`` of at most 255 UTF-8 bytes (an AMQP short string).

    Raises:
        TypeError: Not a ``str``; the message names ``name``.
        ValueError: Longer than 255 bytes; the message names ``name``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    _shortstr(name, value)


def check_table(name: str, table: Any) -> None:
    """``table`` (or ``None``) can be sent as an AMQP field table, and RabbitMQ accepts its values.

    First our own check (it names the key, and refuses what py-amqp encodes
    but RabbitMQ closes the channel for: NaN, a pre-1970 timestamp), then
    py-amqp's table encoder itself, so that nothing passes here that the
    declare would fail to encode.

    Raises:
        TypeError: Not a mapping, a key that is not a ``str``, a value of a
            type AMQP has no field for; the message names ``name`` and the key.
        ValueError: A value out of range; the message names ``name`` and the key.
    """
    if table is None:
        return
    if not isinstance(table, Mapping):
        raise TypeError(f"{name} must be a mapping, got {type(table).__name__}")
    _check_table(name, table)
    try:
        dumps("F", (table,))
    except Exception as exc:  # py-amqp raises FrameSyntaxError, struct.error, TypeError...
        if not raised_by_library(exc):
            raise  # a signal handler's, for the caller
        raise ValueError(f"{name} cannot be encoded as an AMQP field table: {type(exc).__name__}: {exc}") from None
