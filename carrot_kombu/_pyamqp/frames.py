"""AMQP frames: encode before any byte is written, parse what the socket delivers.

Everything a caller asks to send is turned into bytes here, on the caller's
thread and outside every lock, *before* the connection sees it.  A value the
protocol cannot carry (a header integer of 2**64, a ``set``, a routing key of
300 bytes, an ``int`` expiration) therefore fails in the caller with a
``TypeError``/``ValueError`` naming the field, and the connection never
carries half a frame.  py-amqp's own encoder is used for the work; the
checks here only run when it fails, to name the culprit.
"""

from __future__ import annotations

import calendar
import datetime
import decimal
import logging
import math
from collections import deque
from struct import pack, unpack_from
from typing import Any, Mapping, Optional, Sequence

from amqp import spec
from amqp.basic_message import Message
from amqp.exceptions import UnexpectedFrame
from amqp.serialization import dumps, loads

from .._sync import raised_by_library

logger = logging.getLogger("carrot_kombu")

__all__ = (
    "HEARTBEAT",
    "FrameParser",
    "encode_method",
    "encode_publish_args",
    "encode_properties",
    "encode_content",
    "method_name",
)

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
_FRAME_END = b"\xce"
#: A heartbeat frame: type 8, channel 0, empty payload.
HEARTBEAT = pack(">BHIB", FRAME_HEARTBEAT, 0, 0, FRAME_END)

_I64 = (-(2**63), 2**63 - 1)
_U64 = (0, 2**64 - 1)

#: Basic properties and their AMQP types (py-amqp's ``Message.PROPERTIES``).
_PROPERTY_TYPES = dict(Message.PROPERTIES)
_PROPERTY_NAMES = frozenset(_PROPERTY_TYPES)
_SHORTSTR_PROPERTIES = tuple(name for name, kind in Message.PROPERTIES if kind == "s" and name != "expiration")


def method_name(sig: Any) -> str:
    """``(60, 40)`` -> ``'Basic.Publish'`` (for messages meant for people)."""
    for cls in (spec.Connection, spec.Channel, spec.Exchange, spec.Queue, spec.Basic, spec.Confirm, spec.Tx):
        for name, value in vars(cls).items():
            if value == sig and not name.startswith("_"):
                return f"{cls.__name__}.{name}"
    return repr(sig)


# -- encoding ---------------------------------------------------------------------------


def encode_method(channel_id: int, sig: Any, args: bytes) -> bytes:
    """One method frame."""
    payload = pack(">HH", sig[0], sig[1]) + args
    return pack(">BHI", FRAME_METHOD, channel_id, len(payload)) + payload + _FRAME_END


def encode_args(sig: Any, fmt: Optional[str], values: Sequence[Any]) -> bytes:
    """py-amqp's argument encoding; a value it cannot encode is named in the error.

    Raises:
        TypeError: A value of the wrong type.
        ValueError: A value out of range (e.g. a name over 255 bytes).
    """
    if not fmt:
        return b""
    try:
        return bytes(dumps(fmt, values))
    except Exception as exc:  # py-amqp raises struct.error, TypeError, FrameSyntaxError...
        if not raised_by_library(exc):
            raise  # a signal handler's, for the caller
        failure = _diagnose_args(sig, fmt, values)
        raise failure from None


#: Most entries kept by each encoding cache (then it starts afresh).
_CACHE_SIZE = 512
_ARGS_CACHE: dict[tuple[Any, ...], bytes] = {}
_PROPS_CACHE: dict[tuple[Any, ...], bytes] = {}


def encode_publish_args(exchange: Any, routing_key: Any, mandatory: bool, immediate: bool) -> bytes:
    """``basic.publish`` arguments, checked: ``exchange`` and ``routing_key`` are short strings.

    Cached: an application publishes to a handful of destinations.
    """
    key = (exchange, routing_key, bool(mandatory), bool(immediate))
    if type(exchange) is str and type(routing_key) is str:  # noqa: E721 - exact: bytes and subclasses are checked
        try:
            return _ARGS_CACHE[key]
        except KeyError:
            pass
    _name("exchange", exchange)
    _name("routing_key", routing_key)
    encoded = bytes(dumps("Bssbb", (0, exchange, routing_key, mandatory, immediate)))
    if len(_ARGS_CACHE) >= _CACHE_SIZE:
        _ARGS_CACHE.clear()
    _ARGS_CACHE[key] = encoded
    return encoded


def encode_properties(properties: Mapping[str, Any], strict: bool = True) -> bytes:
    """The property flags and list of a content header.

    Cached when no value is a container (no headers): most messages share
    their content type, encoding and delivery mode.

    Raises:
        TypeError, ValueError: Naming the property (and header key) that
            cannot be encoded.
    """
    if not strict and not _PROPERTY_NAMES.issuperset(properties):
        unknown = set(properties) - _PROPERTY_NAMES
        if unknown:
            # py-amqp's own rule on a channel: what is not an AMQP property is
            # not sent (Celery's Task.retry() passes such options through).
            logger.debug("carrot_kombu: not sending unknown message properties %s", sorted(unknown))
            properties = {k: v for k, v in properties.items() if k not in unknown}
    key: Optional[tuple[Any, ...]] = None
    if "application_headers" not in properties:
        key = tuple(sorted(properties.items()))
        try:
            return _PROPS_CACHE[key]
        except (KeyError, TypeError):
            key = None if isinstance(key, tuple) and _unhashable(key) else key
    # What py-amqp would encode but the broker refuses (closing the channel or
    # the whole connection): checked here, for the caller.
    _check_broker_rules(properties)
    message = Message()
    message.properties = dict(properties)
    try:
        encoded = bytes(message._serialize_properties())
    except Exception as exc:
        if not raised_by_library(exc):
            raise  # a signal handler's, for the caller
        failure = _diagnose_properties(properties)
        raise failure from None
    if key is not None:
        if len(_PROPS_CACHE) >= _CACHE_SIZE:
            _PROPS_CACHE.clear()
        _PROPS_CACHE[key] = encoded
    return encoded


def _check_broker_rules(properties: Mapping[str, Any]) -> None:
    """Values py-amqp encodes but RabbitMQ refuses: headers it cannot hold, rules it enforces."""
    unknown = set(properties) - _PROPERTY_NAMES
    if unknown:
        raise TypeError(
            f"unknown message propert{'y' if len(unknown) == 1 else 'ies'} {sorted(unknown)}; "
            f"AMQP basic properties are {sorted(_PROPERTY_TYPES)}"
        )
    for name in _SHORTSTR_PROPERTIES:  # expiration: its own rules below
        value = properties.get(name)
        if value is not None and not (type(value) is str and len(value) < 64 and value.isascii()):
            _shortstr_property(name, value)
    headers = properties.get("application_headers")
    if headers is not None:
        try:
            _check_value("application_headers", "F", headers)  # NaN/inf floats: 541 for the whole connection
        except RecursionError:
            raise ValueError("application_headers are nested too deeply to encode") from None
    expiration = properties.get("expiration")
    if expiration is not None:
        if not isinstance(expiration, str):
            raise TypeError(
                f"expiration must be a str of milliseconds (e.g. '60000'), got {type(expiration).__name__}"
            )
        if not expiration.isdigit() or not expiration.isascii():
            raise ValueError(f"expiration must be a non-negative integer in milliseconds as a str, got {expiration!r}")
        if int(expiration) > _MAX_EXPIRATION_MS:
            # RabbitMQ refuses it (406), closing the channel: the publisher's, shared.
            raise ValueError(f"expiration must be at most {_MAX_EXPIRATION_MS} ms, got {expiration!r}")
    mode = properties.get("delivery_mode")
    if mode is not None:
        _integer("delivery_mode", mode, 0, 255)
        if mode not in (1, 2):
            raise ValueError(f"delivery_mode must be 1 (transient) or 2 (persistent), got {mode!r}")


#: RabbitMQ's largest per-message TTL (its MAX_EXPIRY_TIMER, 2^32 - 1 ms).
_MAX_EXPIRATION_MS = 4294967295


def _shortstr_property(name: str, value: Any) -> None:
    """A short-string property: UTF-8 text (py-amqp sends any bytes as they are), then :func:`_shortstr`'s rules."""
    try:
        if isinstance(value, (bytes, bytearray)):
            bytes(value).decode("utf-8")
        elif isinstance(value, str):
            value.encode("utf-8")
    except UnicodeError:
        # Sent as is, it would be a message no py-amqp consumer can decode.
        raise ValueError(f"{name} must be UTF-8 text; this {type(value).__name__} is not valid UTF-8") from None
    _shortstr(name, value)  # a str (or bytes) of at most 255 bytes


def _unhashable(key: tuple[Any, ...]) -> bool:
    try:
        hash(key)
    except TypeError:
        return True
    return False


def body_bytes(body: Any, properties: dict[str, Any]) -> bytes:
    """The body as bytes; a ``str`` is encoded with (and records) its content encoding."""
    if isinstance(body, str):
        encoding = properties.setdefault("content_encoding", "utf-8")
        try:
            return body.encode(encoding)
        except LookupError:
            raise ValueError(f"content_encoding: unknown encoding {encoding!r}") from None
    if isinstance(body, (bytes, bytearray, memoryview)):
        # Exactly bytes: a subclass could lie about its length.
        return body if type(body) is bytes else bytes(body)  # noqa: E721
    if body is None:
        return b""
    raise TypeError(f"body must be bytes or str, got {type(body).__name__}")


def encode_content(
    channel_id: int, class_id: int, properties: bytes, body: bytes, frame_max: int
) -> list[bytes]:
    """The header frame and the body frames of one message, split at ``frame_max``.

    Raises:
        ValueError: The properties (headers) do not fit one frame (the broker
            would close the whole connection with a frame error).
    """
    if len(properties) + 12 + 8 > frame_max:
        raise ValueError(
            f"message properties are {len(properties)} bytes (headers included); they must fit one frame: "
            f"the negotiated frame_max is {frame_max} bytes"
        )
    header = pack(">HHQ", class_id, 0, len(body)) + properties
    out = [pack(">BHI", FRAME_HEADER, channel_id, len(header)) + header + _FRAME_END]
    chunk = frame_max - 8
    if len(body) <= chunk:
        if body:
            out.append(pack(">BHI", FRAME_BODY, channel_id, len(body)) + body + _FRAME_END)
        return out
    view = memoryview(body)
    for start in range(0, len(body), chunk):
        part = view[start:start + chunk]
        out.append(pack(">BHI", FRAME_BODY, channel_id, len(part)))
        out.append(bytes(part))
        out.append(_FRAME_END)
    return out


def encode_message(message: Any) -> tuple[bytes, bytes]:
    """A py-amqp ``Message``'s encoded properties and body (``str`` bodies encoded)."""
    props = message.properties
    body = body_bytes(message.body, props)
    return encode_properties(props, strict=False), body


# -- checks that name the culprit -------------------------------------------------------


def _name(name: str, value: Any) -> None:
    """An exchange or routing key: a ``str`` of at most 255 bytes."""
    if type(value) is not str:  # noqa: E721 - the broker names what it refuses in str: keep them str
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    _shortstr(name, value)


def _shortstr(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        size = len(value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        size = len(value)
    else:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if size > 255:
        raise ValueError(f"{name} is {size} bytes long; AMQP allows at most 255")


def _diagnose_args(sig: Any, fmt: str, values: Sequence[Any]) -> Exception:
    where = method_name(sig)
    for index, (kind, value) in enumerate(zip(fmt, values)):
        name = f"{where} argument {index + 1}"
        try:
            _check_value(name, kind, value)
        except (TypeError, ValueError) as exc:
            return exc
    return ValueError(f"{where}: arguments cannot be encoded")


def _diagnose_properties(properties: Mapping[str, Any]) -> Exception:
    for key, value in properties.items():
        if value is None:
            continue
        kind = _PROPERTY_TYPES.get(key)
        if kind is None:
            continue  # py-amqp ignores unknown keys
        try:
            _check_value(key, kind, value)
        except (TypeError, ValueError) as exc:
            return exc
    return ValueError("message properties cannot be encoded")


def _check_value(name: str, kind: str, value: Any) -> None:
    if kind == "s":
        if name == "expiration" and not isinstance(value, str):
            raise TypeError(
                f"expiration must be a str of milliseconds (e.g. '60000'), got {type(value).__name__}"
            )
        _shortstr(name, value)
    elif kind in ("S", "x"):
        if value is not None and not isinstance(value, (str, bytes, bytearray)):
            raise TypeError(f"{name} must be a str or bytes, got {type(value).__name__}")
    elif kind == "o":
        _integer(name, value, 0, 255)
    elif kind == "B":
        _integer(name, value, 0, 65535)
    elif kind == "l":
        _integer(name, value, 0, 2**32 - 1)
    elif kind == "L":
        _integer(name, value, *_U64)
    elif kind == "F":
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"{name} must be a mapping, got {type(value).__name__}")
        _check_table(name, value or {})
    elif kind == "A":
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list, got {type(value).__name__}")
        _check_array(name, value)


def _integer(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}, got {value}")


#: Header values that need no check (the common ones, looked up by exact type).
_PLAIN_VALUES = frozenset({str, bytes, bool, type(None)})


def _check_table(name: str, table: Mapping[Any, Any]) -> None:
    for key, value in table.items():
        # Fast path (this runs on every publish with headers; Celery's have ~15).
        if type(key) is str and len(key) <= 63:
            if type(value) in _PLAIN_VALUES:
                continue
        else:
            if not isinstance(key, (str, bytes)):
                raise TypeError(f"{name}: keys must be str, got {type(key).__name__} {key!r}")
            _shortstr(f"{name} key {key!r}", key)
        _check_item(f"{name}[{key!r}]", value)


def _check_array(name: str, items: Sequence[Any]) -> None:
    for index, value in enumerate(items):
        _check_item(f"{name}[{index}]", value)


def _check_item(name: str, value: Any) -> None:
    if value is None or isinstance(value, (str, bytes, bool, float, decimal.Decimal)):
        if isinstance(value, decimal.Decimal):
            _check_decimal(name, value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}: {value} is not a finite number (RabbitMQ refuses NaN and infinity)")
        return
    if isinstance(value, int):
        if not _I64[0] <= value <= _I64[1]:
            raise ValueError(f"{name}: {value} does not fit a signed 64-bit integer (AMQP field tables)")
        return
    if isinstance(value, datetime.datetime):
        if calendar.timegm(value.utctimetuple()) < 0:
            raise ValueError(f"{name}: {value} is before 1970; AMQP timestamps are unsigned seconds since the epoch")
        return
    if isinstance(value, Mapping):
        _check_table(name, value)
        return
    if isinstance(value, (list, tuple)):
        _check_array(name, value)
        return
    raise TypeError(
        f"{name}: {type(value).__name__} is not an AMQP field value "
        "(use str, bytes, bool, int, float, Decimal, datetime, dict, list or None)"
    )


def _check_decimal(name: str, value: decimal.Decimal) -> None:
    sign, digits, exponent = value.as_tuple()
    if not isinstance(exponent, int) or not 0 <= -exponent <= 255:
        raise ValueError(f"{name}: Decimal {value} has a scale AMQP cannot carry (0-255 decimal places)")
    unscaled = int("".join(map(str, digits)) or "0")
    if unscaled > 2**31 - 1:
        raise ValueError(f"{name}: Decimal {value} does not fit AMQP's 32-bit decimal")


# -- parsing ----------------------------------------------------------------------------


def decode_args(fmt: str, payload: Any) -> list[Any]:
    """py-amqp's argument decoding, tolerant of a cut UTF-8 character in short strings.

    RabbitMQ cuts reply texts at 255 bytes, possibly inside a character; py-amqp
    decodes strictly and would fail the whole connection over a log message.
    """
    try:
        args, _ = loads(fmt, payload, 4)
        return list(args)
    except UnicodeDecodeError:
        return _lenient(fmt, payload, 4)


def _lenient(fmt: str, buf: Any, offset: int) -> list[Any]:
    out: list[Any] = []
    bits = bitcount = 0
    for kind in fmt:
        if kind == "b":
            if not bitcount:
                bits, bitcount = buf[offset], 8
                offset += 1
            out.append(bool(bits & 1))
            bits >>= 1
            bitcount -= 1
            continue
        bitcount = 0
        if kind == "o":
            out.append(buf[offset])
            offset += 1
        elif kind in _FIXED:
            code, size = _FIXED[kind]
            out.append(unpack_from(code, buf, offset)[0])
            offset += size
        elif kind == "s":
            size = buf[offset]
            offset += 1
            out.append(bytes(buf[offset:offset + size]).decode("utf-8", "replace"))
            offset += size
        else:
            raise UnicodeDecodeError("utf-8", b"", 0, 1, f"cannot decode {fmt!r} leniently")
    return out


_FIXED = {"B": (">H", 2), "l": (">I", 4), "L": (">Q", 8)}


class FrameParser:
    """Cuts a byte stream into ``(type, channel, payload)`` frames.

    Owned by whichever thread currently reads the socket (one at a time).
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, initial: bytes = b"", max_size: int = 131072) -> None:
        self._buf = bytearray(initial)
        self._pos = 0
        #: Largest payload accepted; anything bigger is a broken stream.
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buf += data

    def take(self, received: "deque[bytes]") -> None:
        """Move ``received`` chunks into the buffer, each appended before it is removed.

        An exception raised into this thread (a signal handler's) between two
        bytecodes leaves every chunk either still in ``received`` or in the
        buffer, never both nor neither: the append and the ``popleft`` call
        have no bytecode boundary where CPython runs signal handlers.
        """
        while received:
            self._buf += received[0]
            received.popleft()

    def frames(self) -> list[tuple[int, int, bytes]]:
        """Every complete frame buffered so far, in order.

        Raises:
            UnexpectedFrame: The stream is not AMQP (bad frame end, absurd size).
        """
        out: "deque[tuple[int, int, bytes]]" = deque()
        self.frames_into(out)
        return list(out)

    def frames_into(self, into: "deque[tuple[int, int, bytes]]") -> int:
        """Append every complete buffered frame to ``into``; how many.

        The parser's position moves and the frames land in ``into`` together
        (no bytecode boundary between them, see :meth:`take`): an exception
        raised into this thread loses or repeats no frame.

        Raises:
            UnexpectedFrame: The stream is not AMQP (bad frame end, absurd size).
        """
        buf = self._buf
        pos = self._pos
        # Give back what earlier calls consumed (each pair of steps is atomic, as above).
        if pos and pos == len(buf):
            self._pos = 0
            buf.clear()
            pos = 0
        elif pos > 1 << 16:
            del buf[:pos]
            self._pos = 0
            pos = 0
        end_of_data = len(buf)
        out: list[tuple[int, int, bytes]] = []
        while end_of_data - pos >= 8:
            frame_type, channel, size = unpack_from(">BHI", buf, pos)
            if size > self.max_size:
                raise UnexpectedFrame(f"received a frame of {size} bytes; frame_max is {self.max_size}")
            end = pos + 7 + size
            if end >= end_of_data:
                break
            if buf[end] != FRAME_END:
                raise UnexpectedFrame(f"Received frame_end {buf[end]:#04x} while expecting 0xce")
            out.append((frame_type, channel, bytes(buf[pos + 7:end])))
            pos = end + 1
        if out:
            self._pos = pos
            into.extend(out)
        return len(out)

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos


# -- receiving: a message whose properties are not valid UTF-8 ----------------------------------------


def _lenient_str(raw: Any) -> str:
    if isinstance(raw, str):
        return raw  # py-amqp passes its format strings through pstr_t too
    return bytes(raw).decode("utf-8", "replace")


class _OutOfRangeTimestamp(int):
    """A header timestamp no ``datetime`` can hold (2**64 - 1...): kept as its integer."""

    def replace(self, **_: Any) -> int:
        return int(self)


class _LenientDatetime:
    """``datetime`` for py-amqp's decoder: an out-of-range timestamp stays an int."""

    @staticmethod
    def fromtimestamp(value: int, tz: Any = None) -> Any:
        try:
            return datetime.datetime.fromtimestamp(value, tz=tz)
        except (OverflowError, OSError, ValueError):
            return _OutOfRangeTimestamp(value)

    @staticmethod
    def utcfromtimestamp(value: int) -> Any:  # py-amqp < 5.3
        try:
            return datetime.datetime.fromtimestamp(value, tz=datetime.timezone.utc).replace(tzinfo=None)
        except (OverflowError, OSError, ValueError):
            return _OutOfRangeTimestamp(value)


def _lenient_decoders() -> Any:
    """py-amqp's property decoders, run with ``replace`` instead of strict UTF-8 (a copy: nothing global changes)."""
    import types

    from amqp import serialization

    scope = dict(vars(serialization))
    scope["pstr_t"] = _lenient_str
    scope["datetime"] = _LenientDatetime
    for name in ("_read_item", "loads", "decode_properties_basic"):
        fn = getattr(serialization, name)
        scope[name] = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return scope["decode_properties_basic"]


_DECODE_LENIENTLY = _lenient_decoders()


class TolerantMessage(Message):  # type: ignore[misc]
    """The message py-amqp's frame handler builds, decoding properties that are not UTF-8.

    py-amqp raises ``UnicodeDecodeError`` on the reading thread for such a
    message (any client can publish one: ``message_id=b"\\xff"``), which drops
    the connection; a consumer then gets it again on every reconnect, for
    ever.  Here its invalid bytes become U+FFFD and the message is delivered.
    """

    def _load_properties(self, class_id: int, buf: Any, offset: int) -> Any:
        try:
            return super()._load_properties(class_id, buf, offset)
        except Exception as exc:  # noqa: BLE001 - anything a peer can send must not drop the connection
            if class_id != spec.Basic.Publish[0] or not raised_by_library(exc):
                raise
            try:
                self.properties, offset = _DECODE_LENIENTLY(buf, offset)
            except Exception as again:  # noqa: BLE001 - see above
                logger.warning("carrot_kombu: a delivered message's properties cannot be decoded (%s: %s); "
                               "delivered without them", type(again).__name__, again)
                self.properties = {}
            else:
                logger.warning("carrot_kombu: a delivered message's properties are not as AMQP defines them "
                               "(%s: %s); decoded leniently (invalid UTF-8 replaced by U+FFFD, timestamps "
                               "out of range kept as integers)", type(exc).__name__, exc)
            return offset


def tolerant_frame_handler(connection: Any, callback: Any) -> Any:
    """py-amqp's ``frame_handler``, building :class:`TolerantMessage` s (same code, other ``Message``)."""
    import types

    from amqp import method_framing

    scope = dict(vars(method_framing))
    scope["Message"] = TolerantMessage
    fn = method_framing.frame_handler
    handler = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return handler(connection, callback)
