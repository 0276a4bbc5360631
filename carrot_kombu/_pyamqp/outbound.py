"""One message to publish, encoded once (on the caller's thread), framed per channel."""

from __future__ import annotations

from typing import Any, Optional

from amqp import spec

from .frames import body_bytes, encode_content, encode_method, encode_properties, encode_publish_args

__all__ = ("Outbound",)


class Outbound:
    """A ``basic.publish`` checked and encoded before anything is written.

    Building one raises ``TypeError``/``ValueError`` naming the field that
    AMQP cannot carry; once built, the message can be framed for any channel
    (a reconnect writes it again on another channel).

    Args:
        exchange: Exchange name.
        routing_key: Routing key.
        properties: Basic properties (``application_headers`` for headers).
        body: The serialized body (``str`` is encoded with ``content_encoding``).
        mandatory: Ask the broker to return it if no queue gets it.
    """

    __slots__ = ("exchange", "routing_key", "properties", "body", "user_id", "_args", "_props")

    def __init__(self, exchange: str, routing_key: str, properties: dict[str, Any], body: Any,
                 mandatory: bool = False) -> None:
        self.body = body_bytes(body, properties)
        self._args = encode_publish_args(exchange, routing_key, mandatory, False)
        self._props = encode_properties(properties)
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.user_id: Optional[str] = properties.get("user_id")

    def frames(self, channel_id: int, frame_max: int) -> list[Any]:
        """The method, header and body frames on ``channel_id``."""
        out: list[Any] = [encode_method(channel_id, spec.Basic.Publish, self._args)]
        out += encode_content(channel_id, spec.Basic.CLASS_ID, self._props, self.body, frame_max)
        return out
