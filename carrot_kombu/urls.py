"""Broker URLs as text: split failover lists, mask and redact passwords.

The one place that reads URL *text* (the configuration, the command line,
the Celery settings and the kombu transport all call it), so that a URL is
split, masked and scrubbed the same way everywhere:

* :func:`split_urls`: a ``;`` separates failover URLs only when the next
  URL's ``scheme://`` (or nothing) follows it; generated passwords often
  contain a ``;`` of their own.
* :func:`mask_url`: a URL (or a failover list, with or without schemes) with
  each password replaced by ``**``; safe on any string.
* :func:`passwords_in` and :func:`redactor`: every string of a URL that may
  be a password, and a function that removes them (percent-encoded or not)
  from any text, such as an error message that quotes the URL.

And :func:`adopt_kombu_urls`: a ``kombu.Connection`` over ``carrot+amqp://``
gets its host, port, credentials and virtual host parsed from the URL, as
kombu does for ``pyamqp://`` (kombu leaves ``transport+scheme://`` URLs
unparsed, so the whole URL, password included, would stay its ``hostname``).
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Iterable, Optional
from urllib.parse import parse_qsl, quote, unquote

__all__ = (
    "TRANSPORT_PREFIX",
    "split_urls",
    "strip_transport_prefix",
    "mask_url",
    "passwords_in",
    "redactor",
    "secrets_pattern",
    "adopt_kombu_urls",
    "connection_urls",
)

#: The prefix that selects carrot_kombu's kombu transport (``carrot+amqp://``).
TRANSPORT_PREFIX = "carrot+"
TRANSPORT_PATH = "carrot_kombu.transport:Transport"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
#: A ``;`` separates failover URLs only when the next URL's scheme follows (or
#: nothing does): generated passwords often contain a ``;`` of their own.
URL_SEPARATOR = re.compile(rf";(?=\s*(?:{_SCHEME}|\Z))")
_LEADING_SCHEME = re.compile(rf"\s*{_SCHEME}")
#: ``host``, ``host:port`` or ``[v6]:port``: an authority with nothing secret in it.
_PLAIN_AUTHORITY = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[^:@\[\]]*)(?::[0-9]*)?")

Redact = Callable[[str], str]


# -- splitting -------------------------------------------------------------------


def split_urls(text: str) -> list[str]:
    """The failover URLs in ``text``, stripped, empty ones dropped."""
    return [part.strip() for part in URL_SEPARATOR.split(text) if part.strip()]


def strip_transport_prefix(url: str) -> str:
    """``url`` with the ``carrot+`` of each failover URL dropped (the URL the manager takes).

    Only a scheme's prefix: a password that contains ``carrot+`` is left alone.
    """
    return ";".join(
        part[len(TRANSPORT_PREFIX):] if part.startswith(TRANSPORT_PREFIX) else part for part in split_urls(url)
    )


def authority(rest: str) -> str:
    """The text up to the first ``/``, ``?`` or ``#`` of a URL without its scheme."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


# -- masking ---------------------------------------------------------------------


def mask_url(url: str) -> str:
    """Mask the password of a URL, or of ``;``-separated failover URLs.

    Safe on any string, parsable or not, with or without a scheme.  Before
    the last ``@``, only the text up to the first ``:`` (the user name) is
    kept.  Without an ``@``, an authority that is not ``host[:port]`` may be
    ``user:password``: then all that follows the scheme is masked.
    """
    return ";".join(_mask_one(part) for part in URL_SEPARATOR.split(url))


def _mask_one(url: str) -> str:
    match = _LEADING_SCHEME.match(url)
    head = url[: match.end()] if match else ""
    rest = url[len(head):]
    if "@" in rest:
        # rsplit: a password may contain '@' (unencoded), a host never does.
        userinfo, hostpart = rest.rsplit("@", 1)
        return f"{head}{userinfo.split(':', 1)[0]}:**@{hostpart}"
    if _PLAIN_AUTHORITY.fullmatch(authority(rest)):
        return url
    return f"{head}**"


# -- redacting -------------------------------------------------------------------


def passwords_in(url: str) -> set[str]:
    """Every string of ``url`` that may be a password.

    Generous on purpose: a URL with an unencoded ``@``, ``/`` or ``;`` in its
    password is read differently by different parsers, so each reading counts.
    """
    found: set[str] = set()
    for part in {*split_urls(url), *url.split(";")}:
        rest = part.split("://", 1)[-1]
        for text in (rest, authority(rest)):
            if "@" not in text:
                continue
            for userinfo in (text.rsplit("@", 1)[0], text.split("@", 1)[0]):
                if ":" in userinfo:
                    found.add(userinfo.split(":", 1)[1])
    return {p for p in found if p}


def secrets_pattern(secrets: Iterable[str]) -> Optional["re.Pattern[str]"]:
    """A regex matching any of ``secrets``, raw or percent-decoded, in any percent-encoding.

    ``None`` when there is nothing to match.
    """
    forms = {form for secret in secrets for form in (secret, unquote(secret)) if form}
    if not forms:
        return None
    # Longest first, so that a password containing another one is removed whole.
    return re.compile("|".join(_encodable(form) for form in sorted(forms, key=len, reverse=True)))


def _encodable(secret: str) -> str:
    """A regex matching ``secret`` with any of its characters percent-encoded (``+`` for a space)."""
    pieces = []
    for char in secret:
        encoded = "".join(
            "%" + "".join(f"[{d.upper()}{d.lower()}]" if d.isalpha() else d for d in f"{byte:02X}")
            for byte in char.encode("utf-8", "surrogatepass")
        )
        plus = "|\\+" if char == " " else ""
        pieces.append(f"(?:{re.escape(char)}|{encoded}{plus})")
    return "".join(pieces)


def redactor(secrets: Iterable[str]) -> Redact:
    """A function replacing each of ``secrets`` in a text by ``**`` (see :func:`secrets_pattern`)."""
    pattern = secrets_pattern(secrets)
    if pattern is None:
        return lambda text: text
    return functools.partial(pattern.sub, "**")


# -- kombu connections over carrot+amqp:// -----------------------------------------


def is_carrot_transport(transport: Any) -> bool:
    """Whether a kombu ``transport_cls`` (name, import path or class) is carrot_kombu's transport."""
    if isinstance(transport, str):
        from kombu.transport import TRANSPORT_ALIASES as aliases

        return transport == TRANSPORT_PATH or aliases.get(transport) == TRANSPORT_PATH
    return isinstance(transport, type) and getattr(transport, "driver_name", None) == "carrot_kombu"


def adopt_url(connection: Any) -> None:
    """Parse a carrot_kombu ``kombu.Connection``'s URL into its fields, as kombu does for ``pyamqp://``.

    kombu keeps a ``transport+scheme://`` URL whole as ``hostname`` (and with
    ``can_parse_url`` it never parses it), so ``info()`` -- which Celery's
    ``inspect stats`` shows without the password *field* -- showed the
    password inside ``hostname``, and ``port`` stayed ``None``.  Here the
    URL's host, port, user, password and virtual host (and its
    ``heartbeat``/``connect_timeout``, as kombu reads them) become the
    connection's fields, the URL wins over keyword arguments as on
    ``pyamqp://``, and the URL itself stays in ``alt`` (prefixed, so that a
    kombu failover switch keeps this transport): the manager reads its query
    (``?heartbeat=0``, ``channel_max``...) from there, and ``clone()`` keeps it.
    """
    raw = connection.hostname
    parsed = _url_fields(raw) if is_carrot_transport(connection.transport_cls) else None
    if parsed is None:
        return  # not ours, no URL, or a bad port (the manager's configuration reports it, masked)
    if parsed.pop("ssl", False) and not connection.ssl:
        parsed["ssl"] = True
    for field, value in parsed.items():
        setattr(connection, field, value)
    assert isinstance(raw, str)
    # kombu's switch() to an alternate starts again from the constructor's
    # parameters, which for pyamqp:// include what the first URL said (an
    # alternate without credentials or ?heartbeat= inherits them): the same here.
    from ._pyamqp.kombu_client import update_initial_params

    update_initial_params(connection, parsed)
    # info()['hostname'] is prefixed with uri_prefix: "carrot+localhost" would
    # make clone() unusable; the transport comes from transport_cls anyway.
    connection.uri_prefix = None
    if not connection.alt:
        _keep_in_alt(connection, raw if raw.startswith(TRANSPORT_PREFIX) else TRANSPORT_PREFIX + raw)


def _keep_in_alt(connection: Any, url: str) -> None:
    """Make ``url`` the connection's only alternate, as kombu does for a ``;``-separated list."""
    connection.alt = [url]
    connection.cycle = connection.failover_strategy(connection.alt)
    next(connection.cycle)  # as kombu: the first entry is the current one


def _url_fields(url: object) -> Optional[dict[str, Any]]:
    """kombu ``Connection`` fields of ``url`` that it names (``ssl``: amqps://), or None if not a URL."""
    from kombu.utils.url import url_to_parts

    if not isinstance(url, str) or "://" not in url:
        return None
    try:
        parts = url_to_parts(url)
    except ValueError:
        return None
    query = dict(parse_qsl(url.partition("?")[2]))
    fields: dict[str, Any] = {
        "hostname": parts.hostname or "localhost", "port": parts.port, "userid": parts.username,
        "password": parts.password, "virtual_host": parts.path,
        "heartbeat": _number(query.get("heartbeat")), "connect_timeout": _number(query.get("connect_timeout")),
        "ssl": parts.scheme.rpartition("+")[2] == "amqps" or None,
    }
    return {field: value for field, value in fields.items() if value is not None}


def _number(text: Optional[str]) -> Optional[float]:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None  # the manager's configuration names the bad value


_adopted = False


def adopt_kombu_urls() -> None:
    """Make every ``kombu.Connection`` built for carrot_kombu's transport parse its URL (idempotent).

    Wraps ``kombu.Connection.__init__``: connections of other transports are
    left exactly as kombu made them.
    """
    global _adopted
    if _adopted:
        return
    from kombu.connection import Connection

    original: Callable[..., None] = Connection.__init__

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        adopt_url(self)

    Connection.__init__ = __init__
    _adopted = True


def current_url(connection: Any) -> Optional[str]:
    """The URL of ``alt`` that a carrot_kombu kombu connection is on now (by host and port), if any."""
    from kombu.utils.url import url_to_parts

    for url in connection.alt or ():
        if not isinstance(url, str) or "://" not in url:
            continue
        try:
            parts = url_to_parts(url)
        except ValueError:
            continue
        if (parts.hostname or "localhost") == connection.hostname and (
            parts.port is None or parts.port == connection.port
        ):
            return url
    return None


def connection_urls(client: Any) -> list[str]:
    """The broker URLs of a kombu connection (``alt``, else its fields), without the ``carrot+`` prefix.

    What the transport builds its manager from, and :meth:`ConnectionManager.from_connection`.
    """
    raw = [u for u in (client.alt or []) if isinstance(u, str)] or [client.hostname or "localhost"]
    urls = []
    for url in raw:
        if url.startswith(TRANSPORT_PREFIX):
            url = url[len(TRANSPORT_PREFIX):]
        urls.append(with_connection_credentials(url, client) if "://" in url else _url_of_fields(url, client))
    return urls


def _url_of_fields(host: str, client: Any) -> str:
    """The URL of a kombu connection's fields, on ``host`` (defaults as py-amqp's)."""
    user = client.userid or "guest"
    password = client.password or "guest"
    port = client.port or (5671 if client.ssl else 5672)
    vhost = client.virtual_host or "/"
    return (f"{'amqps' if client.ssl else 'amqp'}://{quote(user, safe='')}:{quote(password, safe='')}"
            f"@{host or 'localhost'}:{port}/{quote(vhost, safe='')}")


def with_connection_credentials(url: str, client: Any) -> str:
    """``url`` with what it leaves out taken from the kombu connection, as kombu does for py-amqp.

    kombu parses a ``pyamqp://`` URL and lets the URL's user, password and
    virtual host win over ``Connection(userid=, password=, virtual_host=)``
    (Celery's ``broker_user``, ``broker_password``, ``broker_vhost``); what
    the URL does not name comes from those arguments.
    """
    scheme, _, rest = url.partition("://")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    netloc, after = rest[:end], rest[end:]
    userinfo, _, host = netloc.rpartition("@")
    raw_user, colon, raw_password = userinfo.partition(":")
    fill_user = not raw_user and bool(client.userid)
    fill_password = not colon and bool(client.password)
    path = _path_with_vhost(after, client.virtual_host)
    if not (fill_user or fill_password or path != after):
        return url
    user = quote(client.userid, safe="") if fill_user else raw_user
    secret = quote(client.password, safe="") if fill_password else raw_password
    return f"{scheme}://{user}:{secret}@{host}{path}"


def _path_with_vhost(after: str, vhost: Optional[str]) -> str:
    """The path and query of a URL (``after`` its authority), with ``vhost`` if it names none.

    "amqp://host", "amqp://host/" and "amqp://host/?query" name no virtual
    host (kombu: "" is none); "/" is kombu's default and is never written.
    """
    slash = after.startswith("/")
    tail = after[1:] if slash else after
    named_vhost, mark, query = tail.partition("?")
    if named_vhost or not vhost or vhost == "/":
        return after
    return "/" + quote(vhost, safe="") + mark + query
