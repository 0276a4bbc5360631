"""Validated settings: constructor options merged with the broker URL(s).

The rule (unlike Carrot, whose ``url`` ignores every other option): a URL
overrides each option it can express (host, port, credentials, vhost and the
query parameters below); options it does not express still apply.

Every mistake is a :class:`~carrot_kombu.ConfigurationError` naming the
option, raised at construction rather than at the first connection attempt.

No error, ``repr`` or masked URL built here shows any part of a password: URLs
are only ever shown through :func:`mask_url`, and errors of the URL parser
(whose messages quote the URL) are never chained to ours: every
``ConfigurationError`` is raised outside the ``except`` block that caught
them, so its ``__context__`` is ``None``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import ssl as _ssl
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import parse_qsl, urlsplit

from kombu.utils.url import as_url, url_to_parts

from .exceptions import ConfigurationError
from .options import (
    CERT_REQS,
    TLS_QUERY_KEYS,
    URL_NUMBERS,
    URL_QUERY_KEYS,
    check_int,
    check_options,
    check_ssl_options,
    parse_bool,
)
from .retry import Backoff
from .urls import authority, mask_url, redactor, split_urls

__all__ = ("Endpoint", "Settings", "AMQP_SCHEMES", "mask_url")

logger = logging.getLogger("carrot_kombu")

_T = TypeVar("_T")
_NUMBER_NAMES = {int: "an integer", float: "a number"}

#: Schemes served by the py-amqp transport.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


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
        """The endpoint as a URL with the password replaced by ``**``.

        Built from the resolved fields, never from the URL text, so it cannot
        carry a password that the URL parser took for something else.
        """
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


#: Option keys whose values are never shown (repr, logs): passwords, tokens, keys.
_SECRET_KEY = re.compile(r"pass|secret|token|credential|key|login_response", re.IGNORECASE)


def _mask_secret_values(value: Any) -> Any:
    """``value`` with every secret-looking key's value replaced by ``'**'`` (mappings, recursively)."""
    if isinstance(value, Mapping):
        return {
            k: "**" if isinstance(k, str) and _SECRET_KEY.search(k) and not k.endswith("file")
            else _mask_secret_values(v)
            for k, v in value.items()
        }
    return value


@dataclass(frozen=True)
class Settings:
    """Everything a :class:`~carrot_kombu.ConnectionManager` was configured with.

    Built by :meth:`from_options` from the constructor's keyword arguments
    (checked by the table :data:`carrot_kombu.options.OPTIONS`) and URL(s).

    Attributes:
        reply_timeout: Seconds a call waits for the broker's reply.
        max_pending: Most messages waiting for their confirms at once.
        consumer_threads: Most threads running consumer callbacks.
        restart_after_fork: A forked child starts the manager again at once.
    """

    endpoints: tuple[Endpoint, ...]
    backoff: Backoff
    pool_limit: int
    client_properties: Mapping[str, Any]
    socket_options: Optional[Mapping[int, Any]]
    transport_options: Mapping[str, Any]
    blocked_timeout: Optional[float] = 30.0
    reply_timeout: float = 10.0
    max_pending: int = 1000
    restart_after_fork: bool = True
    consumer_threads: int = 8

    @classmethod
    def from_options(cls, url: Union[str, Sequence[str], None] = None, **options: Any) -> "Settings":
        """Validate :class:`~carrot_kombu.ConnectionManager`'s options and resolve the URL(s).

        Args:
            url: One URL, several separated by ``;`` (a ``;`` followed by the
                next URL's ``scheme://``; any other ``;`` belongs to the
                URL), or a list of them.
            **options: The constructor's keyword arguments (the table
                :data:`carrot_kombu.options.OPTIONS`: what each accepts);
                those not given take their defaults.

        Raises:
            ConfigurationError: Naming the first bad option.
            TypeError: An unknown option.
        """
        checked = check_options(options)
        tls = checked["ssl_options"]
        port = checked["port"]
        defaults = Endpoint(
            scheme="amqps" if tls else "amqp",
            host=checked["host"],
            # TLS without a port chosen: the TLS port, like kombu.
            port=5671 if tls and port == 5672 else port,
            userid=checked["username"],
            password=checked["password"],
            virtual_host=checked["virtual_host"],
            ssl=tls,
            heartbeat=checked["heartbeat"],
            connect_timeout=checked["connection_timeout"],
            channel_max=checked["channel_max"],
            frame_max=checked["frame_max"],
        )
        return cls(
            endpoints=_endpoints(url, defaults, explicit_port=port != 5672, pool_limit=checked["pool_limit"]),
            backoff=checked["backoff"],
            pool_limit=checked["pool_limit"],
            client_properties=checked["client_properties"],
            socket_options=checked["socket_options"],
            transport_options=checked["transport_options"],
            blocked_timeout=checked["blocked_timeout"],
            reply_timeout=checked["reply_timeout"],
            max_pending=checked["max_pending"],
            restart_after_fork=checked["restart_after_fork"],
            consumer_threads=checked["consumer_threads"],
        )

    def __repr__(self) -> str:
        # Options may hold secrets (an ssl key password, a token in
        # client_properties): shown with their values masked.
        fields = ", ".join(
            f"{f.name}={_mask_secret_values(getattr(self, f.name))!r}" for f in dataclasses.fields(self)
        )
        return f"Settings({fields})"

    @property
    def secrets(self) -> tuple[str, ...]:
        """Passwords to scrub from any text we log or raise."""
        return tuple({e.password for e in self.endpoints if e.password})

    def redact(self, text: str) -> str:
        """Replace every configured password in ``text`` by ``**``.

        A password is also found percent-encoded (any mix of encoded and plain
        characters, hex digits in either case, ``+`` for a space) and
        percent-decoded: the forms in which it appears in URLs and in errors
        that quote them.
        """
        return redactor(self.secrets)(text)


def build_settings(url: Union[str, Sequence[str], None], **options: Any) -> Settings:
    """Same as :meth:`Settings.from_options`."""
    return Settings.from_options(url, **options)


# -- URLs ------------------------------------------------------------------------


def _endpoints(
    url: Union[str, Sequence[str], None], defaults: Endpoint, *, explicit_port: bool, pool_limit: int
) -> tuple[Endpoint, ...]:
    endpoints = tuple(_endpoint(u, defaults, explicit_port=explicit_port) for u in _split_urls(url))
    if not endpoints:
        return (defaults,)
    if len({e.is_amqp for e in endpoints}) > 1:
        raise ConfigurationError("url: failover URLs must all use the same transport")
    for e in endpoints:
        if e.channel_max and pool_limit > e.channel_max:
            raise ConfigurationError(
                f"pool_limit ({pool_limit}) must fit channel_max ({e.channel_max}) "
                f"of {e.masked_url}"
            )
    return endpoints


def _split_urls(url: Union[str, Sequence[str], None]) -> list[str]:
    if url is None:
        return []
    parts = [p for text in _url_texts(url) for p in split_urls(text)]
    if not parts:
        raise ConfigurationError("url must not be empty")
    return parts


def _url_texts(url: object) -> list[str]:
    if isinstance(url, str):
        return [url]
    if isinstance(url, Sequence) and all(isinstance(u, str) for u in url):
        return list(url)
    raise ConfigurationError("url must be a string or a list of strings")


def _endpoint(url: str, defaults: Endpoint, *, explicit_port: bool) -> Endpoint:
    shown = mask_url(url)
    _require_scheme(url, shown)
    _check_userinfo(url, shown)
    parts, pairs = _parse(url, shown)
    scheme = _check_transport(parts.scheme.lower(), shown)
    if scheme not in AMQP_SCHEMES:
        return _memory_endpoint(scheme, parts, pairs, defaults, shown)
    query = _check_query(pairs, shown)
    tls = _resolve_tls(scheme, query, defaults.ssl, shown)
    endpoint = replace(
        defaults,
        scheme="amqps" if tls else "amqp",
        host=parts.hostname or defaults.host,
        port=_resolve_port(parts.port, tls, defaults, explicit_port=explicit_port, shown=shown),
        userid=defaults.userid if parts.username is None else parts.username,
        password=defaults.password if parts.password is None else parts.password,
        virtual_host=parts.path or defaults.virtual_host,
        ssl=tls,
    )
    return _apply_numeric_query(endpoint, query, shown)


def _require_scheme(url: str, shown: str) -> None:
    if "://" not in url:
        raise ConfigurationError(f"url {shown!r} has no scheme (expected amqp://, amqps:// or memory://)")


def _check_userinfo(url: str, shown: str) -> None:
    rest = url.split("://", 1)[1]
    if "@" in rest[len(authority(rest)):]:
        # e.g. a password with an unencoded '/', '#' or '?': the parser would take
        # part of the password for the path or the query, and show it.
        raise ConfigurationError(
            f"url {shown!r}: '@' after the host part; percent-encode special characters "
            "in the user name and password (%2F for /, %23 for #, %40 for @, %3F for ?)"
        )


def _parse(url: str, shown: str) -> tuple[Any, list[tuple[str, str]]]:
    """kombu's parse of ``url``, and its query with blank values kept."""
    parts: Any = None
    query = ""
    try:
        parts = url_to_parts(url)
        # The same split kombu makes, for the raw query: kombu drops blank values.
        query = urlsplit("http://" + url[len(parts.scheme) + 3:]).query
    except ValueError:
        pass  # its message can quote part of the password: never show or chain it
    if parts is None:
        raise ConfigurationError(f"url {shown!r}: not a valid URL (check the host and the port)")
    return parts, parse_qsl(query, keep_blank_values=True)


def _check_transport(scheme: str, shown: str) -> str:
    if scheme not in AMQP_SCHEMES and not _is_memory_transport(scheme):
        raise ConfigurationError(
            f"url {shown!r}: unknown URL scheme {scheme!r} "
            "(carrot_kombu drives py-amqp: use amqp:// or amqps://; memory:// for tests)"
        )
    return scheme


def _memory_endpoint(
    scheme: str, parts: Any, pairs: Sequence[tuple[str, str]], defaults: Endpoint, shown: str
) -> Endpoint:
    if pairs:
        raise ConfigurationError(f"url {shown!r}: {scheme}:// takes no query parameters")
    return replace(
        defaults, scheme=scheme, host=parts.hostname or "localhost", userid="", password="",
        virtual_host="/", ssl=False, heartbeat=0,
    )


def _check_query(pairs: Sequence[tuple[str, str]], shown: str) -> dict[str, str]:
    unknown = {key for key, _ in pairs} - URL_QUERY_KEYS
    if unknown:
        raise ConfigurationError(
            f"url {shown!r}: unknown query parameter(s) {sorted(unknown)}; "
            f"known: {sorted(URL_QUERY_KEYS)}"
        )
    for key, value in pairs:
        if not value.strip():
            raise ConfigurationError(f"url {shown!r}: query parameter {key!r} has an empty value")
    return dict(pairs)


def _resolve_tls(
    scheme: str, query: Mapping[str, str], default: Union[bool, Mapping[str, Any]], shown: str
) -> Union[bool, Mapping[str, Any]]:
    tls = _tls_switch(scheme, query, default, shown)
    url_tls = {TLS_QUERY_KEYS[k]: v for k, v in query.items() if k in TLS_QUERY_KEYS}
    if not url_tls:
        return tls
    if not tls:
        raise ConfigurationError(f"url {shown!r}: ssl_* parameters need amqps:// or ssl=true")
    base = dict(tls) if isinstance(tls, Mapping) else {}
    return check_ssl_options(
        {**base, **_cert_reqs_by_name(url_tls, shown)}, f"url {shown!r}: ssl_* parameters with ssl_options"
    )


def _tls_switch(
    scheme: str, query: Mapping[str, str], default: Union[bool, Mapping[str, Any]], shown: str
) -> Union[bool, Mapping[str, Any]]:
    """TLS on or off, as amqps:// and ``?ssl=`` say; on keeps ssl_options' mapping."""
    tls = default
    if scheme == "amqps":
        tls = tls or True
    if "ssl" in query:
        tls = (tls or True) if parse_bool(f"url {shown!r}: ssl", query["ssl"]) else False
    return tls


def _cert_reqs_by_name(url_tls: Mapping[str, str], shown: str) -> dict[str, Any]:
    """``ssl_cert_reqs=CERT_NONE`` etc. as the ``ssl`` module's constants."""
    if "cert_reqs" not in url_tls:
        return dict(url_tls)
    name = url_tls["cert_reqs"].upper()
    if name not in CERT_REQS:
        raise ConfigurationError(f"url {shown!r}: ssl_cert_reqs must be one of {sorted(CERT_REQS)}")
    return {**url_tls, "cert_reqs": CERT_REQS[name]}


def _resolve_port(
    parsed: Optional[int],
    tls: Union[bool, Mapping[str, Any]],
    defaults: Endpoint,
    *,
    explicit_port: bool,
    shown: str,
) -> int:
    if parsed is not None:
        port = parsed
    elif tls and not explicit_port:
        port = 5671  # amqps:// (or ssl) without a port: the TLS port, like kombu
    else:
        port = defaults.port
    check_int(f"url {shown!r}: port", port, 1, 65535)
    return port


def _apply_numeric_query(endpoint: Endpoint, query: Mapping[str, str], shown: str) -> Endpoint:
    """``endpoint`` with the numbers of the URL query (the table's ``url_number`` options), checked."""
    changes: dict[str, Any] = {}
    for option in URL_NUMBERS:
        assert option.url_number is not None
        for key in option.url_query:
            if key in query:
                text = _NUMBER_NAMES[option.url_number]
                value = _query_value(shown, key, query, option.url_number, text)
                changes[option.endpoint_field or option.name] = option.check(f"url {shown!r}: {key}", value)
    return replace(endpoint, **changes)


def _query_value(
    shown: str, key: str, query: Mapping[str, str], convert: Callable[[str], _T], description: str
) -> _T:
    text = query[key]
    value: Optional[_T] = None
    try:
        value = convert(text)
    except ValueError:
        pass  # raised below, outside this block, so that nothing is chained
    if value is None:
        raise ConfigurationError(f"url {shown!r}: {key} must be {description}, got {text!r}")
    return value


def _is_memory_transport(scheme: str) -> bool:
    from kombu.transport import resolve_transport
    from kombu.transport.memory import Transport as MemoryTransport

    try:
        cls = resolve_transport(scheme)
    except Exception:
        return False
    return isinstance(cls, type) and issubclass(cls, MemoryTransport)


