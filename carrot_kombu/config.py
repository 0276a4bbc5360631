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
import math
import os
import re
import socket as _socket
import ssl as _ssl
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar, Union
from urllib.parse import parse_qsl, urlsplit

from kombu.utils.url import as_url, url_to_parts

from ._pyamqp._compat import ssl_option_names
from .exceptions import ConfigurationError
from .retry import Backoff
from .urls import authority, mask_url, redactor, split_urls

__all__ = ("Endpoint", "Settings", "AMQP_SCHEMES", "mask_url")

logger = logging.getLogger("carrot_kombu")

#: Schemes served by the py-amqp transport.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})

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

#: The keyword arguments of the installed py-amqp's ``SSLTransport._wrap_socket_sni``
#: (read off its signature in the fenced layer: 5.4 added the tls_*_version
#: ones), which receives the whole ``ssl`` mapping unless it has a ``context``.
_PYAMQP_SSL_KEYS = ssl_option_names()
#: With a ``context``, py-amqp calls ``ssl.create_default_context(**context)``
#: (``check_hostname`` set apart) and passes the other keys to
#: ``SSLContext.wrap_socket``, which takes only these.
_PYAMQP_CONTEXT_WRAP_KEYS = frozenset({
    "do_handshake_on_connect", "server_hostname", "server_side", "session", "suppress_ragged_eofs",
})
_PYAMQP_CONTEXT_KEYS = frozenset({"cadata", "cafile", "capath", "check_hostname", "purpose"})
#: Carrot's (Erlang ``ssl``) option names; ``certfile`` and ``keyfile`` are
#: already spelled alike.
_CARROT_SSL_ALIASES = {
    "cacertfile": "ca_certs",
    "verify": "cert_reqs",
    "server_name_indication": "server_hostname",
}
_CARROT_VERIFY = {"verify_peer": _ssl.CERT_REQUIRED, "verify_none": _ssl.CERT_NONE}
_SSL_PATHS = frozenset({"ca_certs", "certfile", "keyfile"})
_SSL_NAMES = _PYAMQP_SSL_KEYS | _PYAMQP_CONTEXT_WRAP_KEYS | {"context"} | set(_CARROT_SSL_ALIASES)

_C_INT_MIN, _C_INT_MAX = -(2**31), 2**31 - 1
#: py-amqp applies every socket option at the TCP level (``SOL_TCP``), so only
#: ``TCP_*`` names can be resolved.
_TCP_OPTIONS = {
    name: getattr(_socket, name)
    for name in dir(_socket)
    if name.startswith("TCP_") and isinstance(getattr(_socket, name), int)
}

SSLOptions = Union[bool, Mapping[str, Any], None]
_T = TypeVar("_T")


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

    Attributes:
        reply_timeout: Seconds a call waits for the broker's reply.
    """

    endpoints: tuple[Endpoint, ...]
    backoff: Backoff
    pool_limit: int
    client_properties: Mapping[str, Any]
    socket_options: Optional[Mapping[int, Any]]
    transport_options: Mapping[str, Any]
    blocked_timeout: Optional[float] = 30.0
    reply_timeout: float = 10.0

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
    socket_options: Optional[Mapping[Any, Any]],
    pool_limit: int,
    transport_options: Optional[Mapping[str, Any]],
    blocked_timeout: Optional[float] = 30.0,
    reply_timeout: float = 10.0,
) -> Settings:
    """Validate the constructor's options and resolve the URL(s).

    The arguments are :class:`~carrot_kombu.ConnectionManager`'s; the rules
    for some of them live here:

    Args:
        url: One URL, several separated by ``;`` (a ``;`` followed by the next
            URL's ``scheme://``; any other ``;`` belongs to the URL), or a
            list of them.
        ssl_options: ``True`` or a mapping of py-amqp's ssl options, where
            Carrot's names (``cacertfile``, ``verify``,
            ``server_name_indication``) stand for py-amqp's.
        socket_options: TCP options for py-amqp: keys are option numbers or
            names of ``TCP_*`` constants of the :mod:`socket` module
            (``"SO_KEEPALIVE"`` is accepted with a true value: py-amqp always
            sets it); values are ints or bytes.
        reply_timeout: Seconds a call waits for a broker reply (finite, > 0).

    Raises:
        ConfigurationError: Naming the first bad option.
    """
    hb = _check_connection_options(
        username=username, password=password, virtual_host=virtual_host, host=host, port=port,
        channel_max=channel_max, frame_max=frame_max, heartbeat=heartbeat,
        connection_timeout=connection_timeout,
    )
    _check_pool_limit(pool_limit, channel_max)
    if blocked_timeout is not None:
        _check_positive("blocked_timeout", blocked_timeout)
    _check_positive("reply_timeout", reply_timeout)
    policy = Backoff.coerce(backoff)
    _check_mappings(
        client_properties=client_properties,
        socket_options=socket_options,
        transport_options=transport_options,
    )
    sockopts = _socket_options(socket_options)
    tls = _ssl_options(ssl_options)

    defaults = Endpoint(
        scheme="amqps" if tls else "amqp",
        host=host,
        # TLS without a port chosen: the TLS port, like kombu.
        port=5671 if tls and port == 5672 else port,
        userid=username,
        password=password,
        virtual_host=virtual_host,
        ssl=tls,
        heartbeat=hb,
        connect_timeout=float(connection_timeout),
        channel_max=channel_max,
        frame_max=frame_max,
    )
    return Settings(
        endpoints=_endpoints(url, defaults, explicit_port=port != 5672, pool_limit=pool_limit),
        backoff=policy,
        pool_limit=pool_limit,
        client_properties=dict(client_properties or {}),
        socket_options=sockopts,
        transport_options=dict(transport_options or {}),
        blocked_timeout=None if blocked_timeout is None else float(blocked_timeout),
        reply_timeout=float(reply_timeout),
    )


# -- options ---------------------------------------------------------------------


def _check_connection_options(
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
) -> int:
    """Check what the default endpoint is made of; return the whole heartbeat."""
    for name, value in (
        ("username", username), ("password", password), ("virtual_host", virtual_host), ("host", host),
    ):
        _check_str(name, value)
    if not host:
        raise ConfigurationError("host must not be empty")
    _check_int("port", port, 1, 65535)
    _check_int("channel_max", channel_max, 0, 65535)
    _check_frame_max("frame_max", frame_max)
    hb = _heartbeat("heartbeat", heartbeat)
    _check_positive("connection_timeout", connection_timeout)
    return hb


def _check_pool_limit(pool_limit: int, channel_max: int) -> None:
    _check_int("pool_limit", pool_limit, 1, 65535)
    if channel_max and pool_limit > channel_max:
        raise ConfigurationError(
            f"pool_limit ({pool_limit}) must fit channel_max ({channel_max})"
        )


def _check_mappings(**values: object) -> None:
    for name, value in values.items():
        if value is not None and not isinstance(value, Mapping):
            raise ConfigurationError(f"{name} must be a mapping, got {type(value).__name__}")


def _socket_options(value: Optional[Mapping[Any, Any]]) -> Optional[dict[int, Union[int, bytes]]]:
    """Resolve option names to numbers and check the values (None when empty)."""
    opts: dict[int, Union[int, bytes]] = {}
    for key, setting in (value or {}).items():
        resolved = _socket_option(key, setting)
        if resolved is None:
            continue
        number, checked = resolved
        if opts.get(number, checked) != checked:
            raise ConfigurationError(
                f"socket_options: {key!r} sets option {number} again (given by name and by number) "
                "with a different value"
            )
        opts[number] = checked
    return opts or None


def _socket_option(key: object, setting: object) -> Optional[tuple[int, Union[int, bytes]]]:
    """One ``socket_options`` item as py-amqp wants it, or None for a no-op."""
    value = _socket_value(key, setting)
    if key == "SO_KEEPALIVE":
        # py-amqp switches keep-alive on for every socket; resolving the name
        # would instead set option 9 at the TCP level (TCP_DEFER_ACCEPT on Linux).
        if not value:
            raise ConfigurationError(
                "socket_options['SO_KEEPALIVE']: py-amqp always enables TCP keep-alive; it cannot be disabled"
            )
        return None
    if isinstance(key, str) and key in _TCP_OPTIONS:
        return _TCP_OPTIONS[key], value
    if isinstance(key, int) and not isinstance(key, bool) and 0 <= key <= _C_INT_MAX:
        return key, value
    raise ConfigurationError(
        f"socket_options: unknown option {key!r}; keys are TCP option numbers (ints) or the names "
        f"{', '.join(sorted(_TCP_OPTIONS))} (py-amqp sets every option at the TCP level, so SO_* "
        "options other than SO_KEEPALIVE cannot be given here)"
    )


def _socket_value(key: object, value: object) -> Union[int, bytes]:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, bytes) or (isinstance(value, int) and _C_INT_MIN <= value <= _C_INT_MAX):
        return value
    raise ConfigurationError(
        f"socket_options[{key!r}] must be an int (C int range) or bytes, got {value!r}"
    )


def _ssl_options(value: SSLOptions, where: str = "ssl_options") -> Union[bool, Mapping[str, Any]]:
    """Check ``ssl_options`` and translate Carrot's names to py-amqp's."""
    if value is None or value is False:
        return False
    if value is True:
        return True
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "ssl_options must be None, True or a mapping of py-amqp ssl options "
            f"(ca_certs, certfile, keyfile, cert_reqs, server_hostname, ...), got {type(value).__name__}"
        )
    opts: dict[str, Any] = {}
    given: dict[str, str] = {}  # py-amqp name -> the name the caller used
    for key, option in value.items():
        name, checked = _ssl_option(key, option, where)
        if name in opts and opts[name] != checked:
            raise ConfigurationError(
                f"{where}: {given[name]!r} and {key!r} are the same option "
                "(Carrot's and py-amqp's names) with different values"
            )
        opts[name] = checked
        given.setdefault(name, str(key))
    _check_ssl_combination(opts, where)
    if opts.get("cert_reqs") == _ssl.CERT_NONE:
        # Allowed because it was asked for by name, but never silently.
        logger.warning("TLS certificate verification is disabled (ssl_options cert_reqs=CERT_NONE)")
    return opts


def _ssl_option(key: object, value: object, where: str) -> tuple[str, Any]:
    """Return the py-amqp name of one ssl option and its checked value."""
    if not isinstance(key, str) or key not in _SSL_NAMES:
        raise ConfigurationError(f"{where}: unknown option {key!r}; {_ssl_names_hint(key)}")
    label = f"{where}[{key!r}]"
    if key == "verify":
        value = _carrot_verify(label, value)
    elif key == "server_name_indication" and value == "disable":
        raise ConfigurationError(
            f"{label}: 'disable' is not supported: kombu and py-amqp always send the broker's "
            "host name (server_hostname=None means that host name)"
        )
    name = _CARROT_SSL_ALIASES.get(key, key)
    return name, _check_ssl_value(name, value, label)


def _ssl_names_hint(key: object) -> str:
    accepted = sorted(_PYAMQP_SSL_KEYS | {"context"})
    aliases = ", ".join(f"{alias} ({name})" for alias, name in sorted(_CARROT_SSL_ALIASES.items()))
    hint = (
        f"py-amqp accepts {', '.join(accepted)} (and, with context, session); "
        f"Carrot's names are accepted too: {aliases}"
    )
    if key in _PYAMQP_CONTEXT_KEYS:
        hint += f"; {key!r} belongs inside 'context' (ssl.create_default_context arguments)"
    return hint


def _carrot_verify(label: str, value: object) -> object:
    if isinstance(value, str) and value in _CARROT_VERIFY:
        return _CARROT_VERIFY[value]
    if value in (_ssl.CERT_REQUIRED, _ssl.CERT_NONE) and not isinstance(value, bool):
        return value
    raise ConfigurationError(
        f"{label} must be 'verify_peer' or 'verify_none' (or ssl.CERT_REQUIRED, ssl.CERT_NONE), got {value!r}"
    )


def _check_ssl_value(name: str, value: object, label: str) -> Any:
    if name in _SSL_PATHS:
        _check_readable(label, value)
    elif name == "cert_reqs":
        if isinstance(value, bool) or not isinstance(value, int) or value not in _CERT_REQS.values():
            raise ConfigurationError(
                f"{label} must be ssl.CERT_NONE, ssl.CERT_OPTIONAL or ssl.CERT_REQUIRED, got {value!r}"
            )
        return _ssl.VerifyMode(value)
    elif name in ("server_side", "do_handshake_on_connect", "suppress_ragged_eofs"):
        _check_type(label, value, bool, "a bool")
    elif name in ("ciphers", "server_hostname") and value is not None:
        _check_type(label, value, str, "a string")
    elif name == "context":
        _check_ssl_context(label, value)
    return value


def _check_ssl_context(label: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"{label} must be a mapping of ssl.create_default_context() arguments and check_hostname "
            f"({', '.join(sorted(_PYAMQP_CONTEXT_KEYS))}); py-amqp builds the SSLContext itself, "
            f"got {type(value).__name__}"
        )
    for key, option in value.items():
        if key not in _PYAMQP_CONTEXT_KEYS:
            raise ConfigurationError(
                f"{label}: unknown key {key!r}; accepted: {', '.join(sorted(_PYAMQP_CONTEXT_KEYS))}"
            )
        if key == "cafile" and option is not None:
            _check_readable(f"{label}[{key!r}]", option)
        elif key == "capath" and option is not None:
            _check_readable(f"{label}[{key!r}]", option, directory=True)


def _check_ssl_combination(opts: Mapping[str, Any], where: str) -> None:
    """With a ``context``, py-amqp passes the other keys to ``SSLContext.wrap_socket``."""
    if opts.get("context"):
        misplaced = sorted(set(opts) - _PYAMQP_CONTEXT_WRAP_KEYS - {"context"})
        if misplaced:
            raise ConfigurationError(
                f"{where}: {misplaced} cannot be combined with 'context'; with it py-amqp takes only "
                f"{', '.join(sorted(_PYAMQP_CONTEXT_WRAP_KEYS))} beside 'context' "
                f"(CA files go in 'context': {', '.join(sorted(_PYAMQP_CONTEXT_KEYS))})"
            )
    elif "session" in opts:
        raise ConfigurationError(f"{where}['session'] is only accepted together with 'context'")


def _check_readable(label: str, path: object, *, directory: bool = False) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"{label} must be a path, got {path!r}")
    exists = os.path.isdir(path) if directory else os.path.isfile(path)
    if not exists or not os.access(path, os.R_OK):
        what = "directory" if directory else "file"
        raise ConfigurationError(f"{label}: {what} {os.fspath(path)!r} is not readable")


def _check_type(label: str, value: object, kind: type, description: str) -> None:
    if not isinstance(value, kind):
        raise ConfigurationError(f"{label} must be {description}, got {type(value).__name__}")


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
    unknown = {key for key, _ in pairs} - _QUERY_KEYS
    if unknown:
        raise ConfigurationError(
            f"url {shown!r}: unknown query parameter(s) {sorted(unknown)}; "
            f"known: {sorted(_QUERY_KEYS)}"
        )
    for key, value in pairs:
        if not value.strip():
            raise ConfigurationError(f"url {shown!r}: query parameter {key!r} has an empty value")
    return dict(pairs)


def _resolve_tls(
    scheme: str, query: Mapping[str, str], default: Union[bool, Mapping[str, Any]], shown: str
) -> Union[bool, Mapping[str, Any]]:
    tls = _tls_switch(scheme, query, default, shown)
    url_tls = {_TLS_QUERY_KEYS[k]: v for k, v in query.items() if k in _TLS_QUERY_KEYS}
    if not url_tls:
        return tls
    if not tls:
        raise ConfigurationError(f"url {shown!r}: ssl_* parameters need amqps:// or ssl=true")
    base = dict(tls) if isinstance(tls, Mapping) else {}
    return _ssl_options(
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
        tls = (tls or True) if _bool(f"url {shown!r}: ssl", query["ssl"]) else False
    return tls


def _cert_reqs_by_name(url_tls: Mapping[str, str], shown: str) -> dict[str, Any]:
    """``ssl_cert_reqs=CERT_NONE`` etc. as the ``ssl`` module's constants."""
    if "cert_reqs" not in url_tls:
        return dict(url_tls)
    name = url_tls["cert_reqs"].upper()
    if name not in _CERT_REQS:
        raise ConfigurationError(f"url {shown!r}: ssl_cert_reqs must be one of {sorted(_CERT_REQS)}")
    return {**url_tls, "cert_reqs": _CERT_REQS[name]}


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
    _check_int(f"url {shown!r}: port", port, 1, 65535)
    return port


def _apply_numeric_query(endpoint: Endpoint, query: Mapping[str, str], shown: str) -> Endpoint:
    changes: dict[str, Any] = {}
    if "heartbeat" in query:
        changes["heartbeat"] = _heartbeat(
            f"url {shown!r}: heartbeat", _query_value(shown, "heartbeat", query, float, "a number")
        )
    for key in ("connect_timeout", "connection_timeout"):
        if key in query:
            timeout = _query_value(shown, key, query, float, "a number")
            _check_positive(f"url {shown!r}: {key}", timeout)
            changes["connect_timeout"] = timeout
    if "channel_max" in query:
        channel_max = _query_value(shown, "channel_max", query, int, "an integer")
        _check_int(f"url {shown!r}: channel_max", channel_max, 0, 65535)
        changes["channel_max"] = channel_max
    if "frame_max" in query:
        frame_max = _query_value(shown, "frame_max", query, int, "an integer")
        _check_frame_max(f"url {shown!r}: frame_max", frame_max)
        changes["frame_max"] = frame_max
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


# -- values ----------------------------------------------------------------------


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
