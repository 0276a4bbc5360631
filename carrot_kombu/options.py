"""The table of :class:`~carrot_kombu.ConnectionManager`'s options, and what each accepts.

One row (:class:`Option`) per keyword argument: its name, default, the check
that turns a given value into the one used (or raises a
:class:`~carrot_kombu.ConfigurationError` naming the option), what in a URL,
in ``carrot+amqp://``'s transport options and in a Celery configuration sets
it, and its documentation.  From :data:`OPTIONS` come:

* the validation in :meth:`Settings.from_options <carrot_kombu.config.Settings.from_options>`
  (and so the constructor's; ``tests/test_options.py`` checks that the
  constructor's keyword arguments and defaults are the table's);
* the URL query parameters the configuration accepts (:data:`URL_QUERY_KEYS`),
  and how the numbers among them are read and checked (:data:`URL_NUMBERS`);
* the transport options that configure a ``carrot+amqp://`` manager
  (:data:`TRANSPORT_MANAGER_OPTIONS`) and the Celery settings
  :meth:`~carrot_kombu.ConnectionManager.from_celery` takes (:data:`CELERY_SETTINGS`);
* the options table of ``docs/configuration.rst`` (:func:`rst_table`; a
  test keeps the page equal to it).

Policies as values, after aio-pika's ``PARAMETERS`` table: adding an option
is one row here plus the constructor's keyword and docstring line.
"""

from __future__ import annotations

import logging
import math
import os
import socket as _socket
import ssl as _ssl
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

from ._pyamqp._compat import ssl_option_names
from .exceptions import ConfigurationError
from .retry import Backoff

__all__ = (
    "Option", "CeleryKey", "OPTIONS", "OPTION_NAMES", "URL_NUMBERS", "URL_QUERY_KEYS", "TRANSPORT_MANAGER_OPTIONS",
    "CELERY_SETTINGS", "defaults", "check_options", "rst_table",
)

logger = logging.getLogger("carrot_kombu")

#: URL query parameters of TLS, and the py-amqp ssl option each sets.
TLS_QUERY_KEYS = {
    "ssl_ca_certs": "ca_certs",
    "ssl_certfile": "certfile",
    "ssl_keyfile": "keyfile",
    "ssl_cert_reqs": "cert_reqs",
    "ssl_server_hostname": "server_hostname",
}

CERT_REQS = {
    "CERT_REQUIRED": _ssl.CERT_REQUIRED,
    "CERT_OPTIONAL": _ssl.CERT_OPTIONAL,
    "CERT_NONE": _ssl.CERT_NONE,
}
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




# -- values ----------------------------------------------------------------------------


def heartbeat_seconds(name: str, value: object) -> int:
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


def check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigurationError(f"{name} must be a string, got {type(value).__name__}")


def check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ConfigurationError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")


def check_frame_max(name: str, value: object) -> None:
    check_int(name, value, 0, 2**32 - 1)
    assert isinstance(value, int)
    if value and value < 4096:
        raise ConfigurationError(f"{name} must be 0 (server default) or >= 4096, got {value!r}")


def check_positive(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a finite number of seconds > 0, got {value!r}")


def parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigurationError(f"{name} must be true/false, got {text!r}")


# -- ssl_options and socket_options -----


def check_socket_options(value: Optional[Mapping[Any, Any]]) -> Optional[dict[int, Union[int, bytes]]]:
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


def check_ssl_options(value: SSLOptions, where: str = "ssl_options") -> Union[bool, Mapping[str, Any]]:
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
        if isinstance(value, bool) or not isinstance(value, int) or value not in CERT_REQS.values():
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


# -- the table -------------------------------------------------------------------------


@dataclass(frozen=True)
class CeleryKey:
    """The Celery setting that sets an option in :meth:`~carrot_kombu.ConnectionManager.from_celery`.

    Attributes:
        setting: The Celery setting's name.
        convert: Its value to the option's.
        take_default: Also take Celery's default value (else only a value
            the application set; Celery's default is then logged as ignored).
        keep_falsy: Take a false value too (``broker_heartbeat = 0``: off);
            else a false value is none (``broker_pool_limit = 0``, ``None``).
        unless_query: Not taken when the broker URL has this query parameter
            (Celery lets the URL's win).
        log_default: Log Celery's default value as not taken (it differs
            from carrot_kombu's in a way users should know).
    """

    setting: str
    convert: Callable[[Any], Any]
    take_default: bool = False
    keep_falsy: bool = False
    unless_query: Optional[str] = None
    log_default: bool = True


@dataclass(frozen=True)
class Option:
    """One keyword argument of :class:`~carrot_kombu.ConnectionManager`.

    Attributes:
        name: The keyword.
        default: Its default.
        check: ``check(name, value)``: the value to use, or
            :class:`~carrot_kombu.ConfigurationError` naming ``name``.
        type_doc: The documentation's "Type, default" cell.
        carrot_doc: The documentation's "Carrot equivalent" cell.
        doc: The documentation's "Notes" cell (reStructuredText, one line
            per source line).
        url_query: URL query parameters that override it.
        url_number: For a number in the URL query: ``int`` or ``float``
            (the text's conversion before ``check``).
        endpoint_field: The :class:`~carrot_kombu.config.Endpoint` field a
            URL query parameter sets, if not ``name``.
        transport_option: A ``carrot+amqp://`` transport option that
            configures the process's manager (not py-amqp).
        celery: The Celery setting ``from_celery`` takes for it.
        same_row: Documented in the previous option's row
            (``username`` / ``password``).
    """

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    type_doc: str = ""
    carrot_doc: str = ""
    doc: str = ""
    url_query: tuple[str, ...] = ()
    url_number: Optional[type] = None
    endpoint_field: str = ""
    transport_option: bool = False
    celery: Optional[CeleryKey] = None
    same_row: bool = False


def _string(name: str, value: object) -> str:
    check_str(name, value)
    assert isinstance(value, str)
    return value


def _host(name: str, value: object) -> str:
    host = _string(name, value)
    if not host:
        raise ConfigurationError(f"{name} must not be empty")
    return host


def _int_between(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(name: str, value: object) -> int:
        check_int(name, value, lo, hi)
        assert isinstance(value, int)
        return value

    return check


def _frame_max(name: str, value: object) -> int:
    check_frame_max(name, value)
    assert isinstance(value, int)
    return value


def _seconds(name: str, value: object) -> float:
    check_positive(name, value)
    assert isinstance(value, (int, float))
    return float(value)


def _seconds_or_none(name: str, value: object) -> Optional[float]:
    return None if value is None else _seconds(name, value)


def _mapping(name: str, value: object) -> dict[Any, Any]:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigurationError(f"{name} must be a mapping, got {type(value).__name__}")
    return dict(value or {})


def _socket_options(name: str, value: object) -> Optional[dict[int, Union[int, bytes]]]:
    return check_socket_options(_mapping(name, value))


def _backoff(name: str, value: object) -> Backoff:
    return Backoff.coerce(value)  # type: ignore[arg-type]  # coerce names the bad field itself


def _ssl_mapping(name: str, value: object) -> Union[bool, Mapping[str, Any]]:
    return check_ssl_options(value, name)  # type: ignore[arg-type]  # checked there


def _at_least_one(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be a bool, got {value!r}")
    return value


OPTIONS: tuple[Option, ...] = (
    Option(
        "username", "guest", _string, '``str``, ``"guest"``', "same",
        "No fragment of a password ever appears in a log, ``repr``,\n"
        "``status()``, event, exception (chained ones included) or CLI output.",
    ),
    Option("password", "guest", _string, same_row=True),
    Option("virtual_host", "/", _string, '``str``, ``"/"``', "``virtual_host``"),
    Option("host", "localhost", _host, '``str`` ``"localhost"`` / ``int`` ``5672``', "same",
           "``port`` must be 1–65535."),
    Option("port", 5672, _int_between(1, 65535), same_row=True),
    Option(
        "channel_max", 0, _int_between(0, 65535), "``int``, ``0``", "same",
        "What to ask for; 0 means no preference. The connection uses the\n"
        "smaller of this and the broker's value (AMQP's negotiation).\n"
        "``frame_max`` is 0 or ≥ 4096.",
        url_query=("channel_max",), url_number=int,
    ),
    Option("frame_max", 0, _frame_max, url_query=("frame_max",), url_number=int, same_row=True),
    Option(
        "heartbeat", 10, heartbeat_seconds, "seconds, ``10``", "``heartbeat`` (seconds in Carrot too)",
        "0 disables; rounded up to whole seconds (the protocol's unit). Sent and\n"
        "checked on the connection's own thread, whatever the application does.",
        url_query=("heartbeat",), url_number=float, transport_option=True,
        celery=CeleryKey("broker_heartbeat", lambda value: value, keep_falsy=True, unless_query="heartbeat"),
    ),
    Option(
        "connection_timeout", 60.0, _seconds, "seconds, ``60.0``", "``connection_timeout: 60000`` (ms)",
        "One attempt: TCP, TLS and AMQP handshake together. With several\n"
        "brokers an attempt is bounded by ``min(connection_timeout, max(5,\n"
        "heartbeat))``, so that a frozen node is left quickly.",
        url_query=("connect_timeout", "connection_timeout"), url_number=float, endpoint_field="connect_timeout",
        celery=CeleryKey("broker_connection_timeout", float, take_default=True, unless_query="connect_timeout"),
    ),
    Option(
        "backoff", None, _backoff, ":class:`~carrot_kombu.Backoff` or mapping, ``Backoff()``",
        "``backoff: [min: 1000, max: 30000]`` (ms)",
        "``Backoff(min=1.0, max=30.0, jitter=True, max_tries=None, max_time=None)``.",
        transport_option=True,
        celery=CeleryKey("broker_connection_max_retries", lambda retries: Backoff(max_tries=int(retries))),
    ),
    Option(
        "ssl_options", None, _ssl_mapping, "``True`` or mapping, ``None``", "``ssl_options``",
        "py-amqp's names (``ca_certs``, ``certfile``, ``keyfile``,\n"
        "``cert_reqs``, ``server_hostname``, ``ciphers``, ``context``...) or\n"
        "Carrot's (``cacertfile``, ``certfile``, ``keyfile``, ``verify``:\n"
        "``\"verify_peer\"``/``\"verify_none\"``, ``server_name_indication``);\n"
        "anything else is rejected with the list of accepted names.\n"
        "Certificates and host names are verified by default;\n"
        "``cert_reqs=ssl.CERT_NONE`` (or ``verify=\"verify_none\"``) is honoured\n"
        "but logged as a warning.",
        url_query=("ssl", *TLS_QUERY_KEYS),
    ),
    Option(
        "client_properties", None, _mapping, "mapping, ``None``", "``client_properties``",
        "``connection_name`` defaults to ``carrot_kombu pid=<pid>``.",
    ),
    Option(
        "socket_options", None, _socket_options, "mapping, ``None``", "``socket_options``",
        "py-amqp ``socket_settings``, keyed by option number or by the name of\n"
        "a ``TCP_*`` constant (``{\"TCP_NODELAY\": 1}``); values are ints or bytes.",
    ),
    Option(
        "pool_limit", 10, _int_between(1, 65535), "``int``, ``10``", "(Carrot has no pool)",
        "Most channels leased at once; must fit ``channel_max``. If the broker\n"
        "negotiates a smaller ``channel_max`` the pool shrinks to it (logged).",
        transport_option=True,
        celery=CeleryKey("broker_pool_limit", int, log_default=False),
    ),
    Option(
        "transport_options", None, _mapping, "mapping, ``None``", "—",
        "Extra keyword arguments of the py-amqp connection, e.g.\n"
        "``{\"confirm_publish\": True}`` (every lease publish waits for its\n"
        "confirm). py-amqp's ``on_blocked``/``on_unblocked`` callbacks run on the\n"
        "event thread, like the ``blocked``/``unblocked`` events.",
    ),
    Option(
        "blocked_timeout", 30.0, _seconds_or_none, "seconds or ``None``, ``30.0``", "—",
        "While the broker blocks the connection (resource alarm), a publish or a\n"
        "request waits at most this long for the unblock, then raises\n"
        ":class:`~carrot_kombu.Blocked`; ``None`` waits as long as the broker\n"
        "blocks.",
        transport_option=True,
    ),
    Option(
        "max_pending", 1000, _at_least_one, "``int``, ``1000``", "—",
        "Most messages :meth:`~carrot_kombu.ConnectionManager.publish` keeps\n"
        "waiting for their confirms at once, from all threads; more wait for a\n"
        "slot within their ``timeout``.",
        transport_option=True,
    ),
    Option(
        "consumer_threads", 8, _int_between(1, 1024), "``int``, ``8``", "—",
        "Most threads running :meth:`~carrot_kombu.ConnectionManager.consume`\n"
        "callbacks, for all consumers (started on demand, ended when idle). One\n"
        "consumer's callbacks run in order, one at a time; a slow callback holds\n"
        "one thread. While all are busy, deliveries wait within each consumer's\n"
        "``prefetch_count``.",
        transport_option=True,
    ),
    Option(
        "reply_timeout", 10.0, _seconds, "seconds, ``10.0``", "—",
        "Most seconds any request waits for the broker's reply (declare, get,\n"
        "qos, opening a channel...). Then :class:`~carrot_kombu.ReplyTimeout`\n"
        "and the channel is discarded; the connection is judged by its\n"
        "heartbeats.",
        transport_option=True,
    ),
    Option(
        "restart_after_fork", True, _flag, "``bool``, ``True``", "—",
        "In a forked child, a manager started in the parent starts again at\n"
        "once; ``False`` leaves it stopped until ``start()`` (the\n"
        "``carrot+amqp://`` transport's managers: a prefork child connects when\n"
        "it first needs the broker). The parent's connection is never touched.",
    ),
)

OPTION_NAMES: tuple[str, ...] = tuple(option.name for option in OPTIONS)
#: Options a number in the URL query overrides (the numbers of an endpoint).
URL_NUMBERS: tuple[Option, ...] = tuple(option for option in OPTIONS if option.url_number is not None)
#: The URL query parameters the configuration accepts.
URL_QUERY_KEYS: frozenset[str] = frozenset(key for option in OPTIONS for key in option.url_query)
#: Transport options of ``carrot+amqp://`` that configure the process's manager (not py-amqp).
TRANSPORT_MANAGER_OPTIONS: tuple[str, ...] = tuple(option.name for option in OPTIONS if option.transport_option)
#: The Celery settings ``from_celery`` takes, by option.
CELERY_SETTINGS: dict[str, CeleryKey] = {option.name: option.celery for option in OPTIONS if option.celery}


def defaults() -> dict[str, Any]:
    """Every option's default, by name."""
    return {option.name: option.default for option in OPTIONS}


def check_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's checked value (its default when not given), in the table's order.

    Raises:
        ConfigurationError: Naming the first bad option (in the table's order).
        TypeError: An unknown option name, as for any call.
    """
    unknown = sorted(set(given) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    checked = {
        option.name: option.check(option.name, given.get(option.name, option.default)) for option in OPTIONS
    }
    channel_max, pool_limit = checked["channel_max"], checked["pool_limit"]
    if channel_max and pool_limit > channel_max:
        raise ConfigurationError(f"pool_limit ({pool_limit}) must fit channel_max ({channel_max})")
    return checked


# -- the documentation ----------------------------------------------------------------

_URL_ROW = (
    "``url``",
    "``str`` or list of ``str``, ``None``",
    "``url``",
    "kombu URL. Several, for failover: a list, or one string where ``;``\n"
    "separates URLs. A ``;`` separates only when the next URL's\n"
    "``scheme://`` follows it, so a ``;`` inside a password needs no\n"
    "encoding. See :doc:`clusters`.",
)


def rst_table() -> str:
    """The options table of ``docs/configuration.rst`` (a ``list-table``), from :data:`OPTIONS`."""
    rows: list[tuple[str, str, str, str]] = [_URL_ROW]
    for option in OPTIONS:
        if option.same_row:
            name, type_doc, carrot_doc, doc = rows[-1]
            rows[-1] = (f"{name} / ``{option.name}``", type_doc, carrot_doc, doc)
        else:
            rows.append((f"``{option.name}``", option.type_doc, option.carrot_doc, option.doc))
    lines = [".. list-table::", "   :header-rows: 1", "",
             "   * - Option", "     - Type, default", "     - Carrot equivalent", "     - Notes"]
    for row in rows:
        for i, cell in enumerate(row):
            first, *rest = cell.split("\n") if cell else [""]
            lines.append(("   * - " if i == 0 else "     - ") + first if first else ("   * -" if i == 0 else "     -"))
            lines.extend("       " + more for more in rest)
    return "\n".join(lines) + "\n"
