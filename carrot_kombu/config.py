"""Validated settings: constructor options merged with the broker URL(s).

The rule (unlike Carrot, whose ``url`` ignores every other option): a URL
overrides each option it can express (host, port, credentials, vhost and the
query parameters below); options it does not express still apply.
"""

from __future__ import annotations

import logging
import math
import os
import ssl as _ssl
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

from kombu.utils.url import as_url, url_to_parts

from .exceptions import ConfigurationError
from .retry import Backoff

__all__ = ("Endpoint", "Settings", "AMQP_SCHEMES", "mask_url")

logger = logging.getLogger("carrot_kombu")

#: Schemes served by the py-amqp transport.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})
#: In-process transports accepted for tests (kombu ``memory://`` and subclasses).
_TLS_QUERY_KEYS = {
    "ssl_ca_certs": "ca_certs",
    "ssl_certfile": "certfile",
    "ssl_keyfile": "keyfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_server_hostname": "server_hostname",
}
_CERT_REQS = {
    "CERT_REQUIRED": _ssl.CERT_REQUIRED,
    "CERT_OPTIONAL": _ssl.CERT_OPTIONAL,
    "CERT_NONE": _ssl.CERT_NONE,
}
_QUERY_KEYS = frozenset(
    {"heartbeat", "connect_timeout", "connection_timeout", "channel_max", "frame_max", "ssl"}
    | set(_TLS_QUERY_KEYS)
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}

SSLOptions = Union[bool, Mapping[str, Any], None]


@dataclass(frozen=True)
class Endpoint:
    """One broker to connect to, everything resolved.

    ``password`` is excluded from ``repr``; use :attr:`masked_url` to show it.
    """

    scheme: str
    host: str
    port: int
    userid: str
    password: str = field(repr=False)
    virtual_host: str
    ssl: Union[bool, Mapping[str, Any]]
    heartbeat: int
    connect_timeout: float
    channel_max: int
    frame_max: int

    @property
    def is_amqp(self) -> bool:
        return self.scheme in AMQP_SCHEMES

    @property
    def masked_url(self) -> str:
        """The endpoint as a URL with the password replaced by ``**``."""
        if not self.is_amqp:
            return f"{self.scheme}://"
        scheme = "amqps" if self.ssl else "amqp"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return str(as_url(
            scheme, host, self.port, self.userid, self.password, self.virtual_host or "/",
            sanitize=True,
        ))

    def ssl_for_connection(self) -> Union[bool, dict[str, Any]]:
        """A fresh ssl mapping for py-amqp (kombu mutates shared dicts on failover)."""
        if not self.ssl:
            return False
        opts = dict(self.ssl) if isinstance(self.ssl, Mapping) else {}
        if opts.get("cert_reqs") != _ssl.CERT_NONE:
            # A server_hostname makes py-amqp check the host name, which an
            # explicit CERT_NONE cannot be combined with.
            opts.setdefault("server_hostname", self.host)
        return opts


@dataclass(frozen=True)
class Settings:
    """Everything a :class:`~carrot_kombu.ConnectionManager` was configured with."""

    endpoints: tuple[Endpoint, ...]
    backoff: Backoff
    pool_limit: int
    client_properties: Mapping[str, Any]
    socket_options: Optional[Mapping[int, Any]]
    transport_options: Mapping[str, Any]
    blocked_timeout: Optional[float] = 30.0

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords to scrub from any text we log or raise."""
        return tuple({e.password for e in self.endpoints if e.password})

    def redact(self, text: str) -> str:
        """Replace every configured password in ``text`` by ``**``."""
        for secret in self.secrets:
            text = text.replace(secret, "**")
        return text


def build_settings(
    url: Union[str, Sequence[str], None],
    *,
    username: str,
    password: str,
    virtual_host: str,
    host: str,
    port: int,
    channel_max: int,
    frame_max: int,
    heartbeat: float,
    connection_timeout: float,
    backoff: Union[Backoff, Mapping[str, Any], None],
    ssl_options: SSLOptions,
    client_properties: Optional[Mapping[str, Any]],
    socket_options: Optional[Mapping[int, Any]],
    pool_limit: int,
    transport_options: Optional[Mapping[str, Any]],
    blocked_timeout: Optional[float] = 30.0,
) -> Settings:
    """Validate the constructor's options and resolve the URL(s).

    Raises:
        ConfigurationError: Naming the first bad option.
    """
    _check_str("username", username)
    _check_str("password", password)
    _check_str("virtual_host", virtual_host)
    _check_str("host", host)
    if not host:
        raise ConfigurationError("host must not be empty")
    _check_int("port", port, 1, 65535)
    _check_int("channel_max", channel_max, 0, 65535)
    _check_frame_max("frame_max", frame_max)
    hb = _heartbeat("heartbeat", heartbeat)
    _check_positive("connection_timeout", connection_timeout)
    _check_int("pool_limit", pool_limit, 1, 65535)
    if channel_max and pool_limit > channel_max:
        raise ConfigurationError(
            f"pool_limit ({pool_limit}) must fit channel_max ({channel_max})"
        )
    if blocked_timeout is not None:
        _check_positive("blocked_timeout", blocked_timeout)
    policy = Backoff.coerce(backoff)
    for name, value in (
        ("client_properties", client_properties),
        ("socket_options", socket_options),
        ("transport_options", transport_options),
    ):
        if value is not None and not isinstance(value, Mapping):
            raise ConfigurationError(f"{name} must be a mapping, got {type(value).__name__}")
    tls = _ssl_options(ssl_options)

    defaults = Endpoint(
        scheme="amqps" if tls else "amqp",
        host=host,
        port=port,
        userid=username,
        password=password,
        virtual_host=virtual_host,
        ssl=tls,
        heartbeat=hb,
        connect_timeout=float(connection_timeout),
        channel_max=channel_max,
        frame_max=frame_max,
    )
    urls = _split_urls(url)
    endpoints = tuple(_endpoint(u, defaults, explicit_port=port != 5672) for u in urls) or (
        defaults,
    )
    kinds = {e.is_amqp for e in endpoints}
    if len(kinds) > 1:
        raise ConfigurationError("url: failover URLs must all use the same transport")
    for e in endpoints:
        if e.channel_max and pool_limit > e.channel_max:
            raise ConfigurationError(
                f"pool_limit ({pool_limit}) must fit channel_max ({e.channel_max}) "
                f"of {e.masked_url}"
            )
    return Settings(
        endpoints=endpoints,
        backoff=policy,
        pool_limit=pool_limit,
        client_properties=dict(client_properties or {}),
        socket_options=dict(socket_options) if socket_options else None,
        transport_options=dict(transport_options or {}),
        blocked_timeout=None if blocked_timeout is None else float(blocked_timeout),
    )


def mask_url(url: str) -> str:
    """Mask the password of any URL, even one we could not parse."""
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    if "@" in rest:
        userinfo, hostpart = rest.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:**@{hostpart}"
    return url


def _split_urls(url: Union[str, Sequence[str], None]) -> list[str]:
    if url is None:
        return []
    if isinstance(url, str):
        parts = [u.strip() for u in url.split(";")]
    elif isinstance(url, Sequence) and all(isinstance(u, str) for u in url):
        parts = [p.strip() for u in url for p in u.split(";")]
    else:
        raise ConfigurationError("url must be a string or a list of strings")
    parts = [p for p in parts if p]
    if not parts:
        raise ConfigurationError("url must not be empty")
    return parts


def _endpoint(url: str, defaults: Endpoint, *, explicit_port: bool) -> Endpoint:
    shown = mask_url(url)
    if "://" not in url:
        raise ConfigurationError(f"url {shown!r} has no scheme (expected amqp://, amqps:// or memory://)")
    rest = url.split("://", 1)[1]
    authority_end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    if "@" in rest[authority_end:]:
        # e.g. a password with an unencoded '/', '#' or '@': the parser would take
        # part of the password for the host or the path, and show it.
        raise ConfigurationError(
            f"url {shown!r}: '@' after the host part; percent-encode special characters "
            "in the user name and password (%2F for /, %23 for #, %40 for @, %3F for ?)"
        )
    try:
        parts = url_to_parts(url)
    except ValueError:
        # The parser's message can quote part of the password: never show it.
        raise ConfigurationError(f"url {shown!r}: not a valid URL (check the host and the port)") from None
    scheme = parts.scheme.lower()
    if scheme not in AMQP_SCHEMES:
        if not _is_memory_transport(scheme):
            raise ConfigurationError(
                f"url {shown!r}: unknown URL scheme {scheme!r} "
                "(carrot_kombu drives py-amqp: use amqp:// or amqps://; memory:// for tests)"
            )
        if parts.query:
            raise ConfigurationError(f"url {shown!r}: {scheme}:// takes no query parameters")
        return Endpoint(
            scheme=scheme, host=parts.hostname or "localhost", port=defaults.port, userid="", password="",
            virtual_host="/", ssl=False, heartbeat=0,
            connect_timeout=defaults.connect_timeout, channel_max=defaults.channel_max,
            frame_max=defaults.frame_max,
        )

    query = dict(parts.query)
    unknown = set(query) - _QUERY_KEYS
    if unknown:
        raise ConfigurationError(
            f"url {shown!r}: unknown query parameter(s) {sorted(unknown)}; "
            f"known: {sorted(_QUERY_KEYS)}"
        )
    tls: Union[bool, Mapping[str, Any]] = defaults.ssl
    if scheme == "amqps":
        tls = tls or True
    if "ssl" in query:
        tls = (tls or True) if _bool(f"url {shown!r}: ssl", query["ssl"]) else False
    url_tls = {_TLS_QUERY_KEYS[k]: v for k, v in query.items() if k in _TLS_QUERY_KEYS}
    if url_tls:
        if not tls:
            raise ConfigurationError(f"url {shown!r}: ssl_* parameters need amqps:// or ssl=true")
        if "cert_reqs" in url_tls:
            name = str(url_tls["cert_reqs"]).upper()
            if name not in _CERT_REQS:
                raise ConfigurationError(
                    f"url {shown!r}: ssl_cert_reqs must be one of {sorted(_CERT_REQS)}"
                )
            url_tls["cert_reqs"] = _CERT_REQS[name]
        base = dict(tls) if isinstance(tls, Mapping) else {}
        tls = _ssl_options({**base, **url_tls})

    if parts.port is not None:
        port = parts.port
    elif tls and not defaults.ssl and not explicit_port:
        port = 5671  # amqps:// without a port: the TLS port, like kombu
    else:
        port = defaults.port
    _check_int(f"url {shown!r}: port", port, 1, 65535)
    vhost = parts.path if parts.path else defaults.virtual_host

    heartbeat = defaults.heartbeat
    if "heartbeat" in query:
        heartbeat = _heartbeat(f"url {shown!r}: heartbeat", _number(shown, "heartbeat", query["heartbeat"]))
    timeout = defaults.connect_timeout
    for key in ("connect_timeout", "connection_timeout"):
        if key in query:
            timeout = _number(shown, key, query[key])
            _check_positive(f"url {shown!r}: {key}", timeout)
    channel_max = defaults.channel_max
    if "channel_max" in query:
        channel_max = _integer(shown, "channel_max", query["channel_max"])
        _check_int(f"url {shown!r}: channel_max", channel_max, 0, 65535)
    frame_max = defaults.frame_max
    if "frame_max" in query:
        frame_max = _integer(shown, "frame_max", query["frame_max"])
        _check_frame_max(f"url {shown!r}: frame_max", frame_max)

    return Endpoint(
        scheme="amqps" if tls else "amqp",
        host=parts.hostname or defaults.host,
        port=port,
        userid=parts.username if parts.username is not None else defaults.userid,
        password=parts.password if parts.password is not None else defaults.password,
        virtual_host=vhost,
        ssl=tls,
        heartbeat=heartbeat,
        connect_timeout=float(timeout),
        channel_max=channel_max,
        frame_max=frame_max,
    )


def _is_memory_transport(scheme: str) -> bool:
    from kombu.transport import resolve_transport
    from kombu.transport.memory import Transport as MemoryTransport

    try:
        cls = resolve_transport(scheme)
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, MemoryTransport)


def _ssl_options(value: SSLOptions) -> Union[bool, Mapping[str, Any]]:
    if value is None or value is False:
        return False
    if value is True:
        return True
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "ssl_options must be None, True or a mapping of py-amqp ssl options "
            f"(ca_certs, certfile, keyfile, cert_reqs, server_hostname, ...), got {type(value).__name__}"
        )
    opts = dict(value)
    for key in ("ca_certs", "certfile", "keyfile"):
        path = opts.get(key)
        if path is None:
            continue
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigurationError(f"ssl_options[{key!r}] must be a path, got {path!r}")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigurationError(f"ssl_options[{key!r}]: file {os.fspath(path)!r} is not readable")
    if opts.get("cert_reqs") == _ssl.CERT_NONE:
        # Allowed because it was asked for by name, but never silently.
        logger.warning("TLS certificate verification is disabled (ssl_options cert_reqs=CERT_NONE)")
    return opts


def _heartbeat(name: str, value: object) -> int:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
        or value > 65535
    ):
        raise ConfigurationError(f"{name} must be a number of seconds between 0 and 65535, got {value!r}")
    # The protocol negotiates whole seconds; round up so we never ask for less.
    return int(math.ceil(value))


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigurationError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")


def _check_frame_max(name: str, value: object) -> None:
    _check_int(name, value, 0, 2**32 - 1)
    assert isinstance(value, int)
    if value and value < 4096:
        raise ConfigurationError(f"{name} must be 0 (server default) or >= 4096, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def _bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true/false, got {text!r}")


def _number(shown: str, key: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigurationError(f"url {shown!r}: {key} must be a number, got {text!r}") from None
    return value


def _integer(shown: str, key: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigurationError(f"url {shown!r}: {key} must be an integer, got {text!r}") from None
