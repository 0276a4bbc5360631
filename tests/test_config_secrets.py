"""Passwords never show: not in errors (nor their chains), reprs or masked URLs.

The property tests call a password fragment *leaked* when it shows in our
output although it could not have come from anywhere but the password.  So
that the property cannot fail on text that merely looks like the password,
fragments that also occur in public text are not counted:

* the URL with the password removed (host, user, query...);
* the literal text of ``carrot_kombu/config.py`` (the message templates);
* the output for the same URL with the password ``pw`` (``repr`` of the
  settings, masked URLs: field names, numbers, defaults).

Generated passwords have no ``'``, ``"``, ``\\`` or ``*``: ``repr`` quoting and
the ``**`` mask put those next to public text, which would make fragments
such as ``'amq`` or ``**@b`` public.  Explicit cases below cover them.
"""

from __future__ import annotations

import ast
import inspect
import re
from typing import Iterator
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import carrot_kombu.config as config_module
import carrot_kombu.options as options_module
import carrot_kombu.urls as urls_module
from carrot_kombu import ConfigurationError, ConnectionManager
from carrot_kombu.config import build_settings, mask_url

#: The failover separator: a ';' followed by a scheme is not part of a password.
SEPARATOR = re.compile(r";\s*[A-Za-z][A-Za-z0-9+.\-]*://")
SPECIALS = list(";:/@#?% &=+[]!$,~^|<>{}\t\x00") + ["＠", "／", "？", "＃", "：", "ﬀ", "é", "密", "🐇"]
password_chars = st.one_of(st.sampled_from(SPECIALS), st.characters(categories=("L", "N")))
passwords = st.text(password_chars, min_size=1, max_size=20)
#: ``{}`` is where the password goes.
TEMPLATES = [
    "amqp://app:{}@broker.example//",
    "amqps://app:{}@broker.example:5671/prod?heartbeat=5",
    "amqp://spare.example//;amqp://app:{}@broker.example//",
    "amqp://app:{}@broker.example/prod; amqp://spare.example:5673/prod",
]


def _literal_text() -> str:
    """Every string literal of the modules that build configuration errors."""
    trees = [ast.parse(inspect.getsource(module)) for module in (config_module, options_module, urls_module)]
    return "\n".join(
        node.value for tree in trees for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    )


TEMPLATE_TEXT = _literal_text()


def fragments(secret: str, public: str) -> set[str]:
    """Substrings of ``secret`` of length >= 4 that occur nowhere in ``public``."""
    found = {secret[i:j] for i in range(len(secret)) for j in range(i + 4, len(secret) + 1)}
    return {f for f in found if f not in public}


def chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception reachable through ``__cause__``/``__context__``."""
    todo, seen = [exc], []
    while todo:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        yield current
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def outputs(manager: ConnectionManager) -> list[str]:
    """What a manager shows of its configuration."""
    return [repr(manager.settings), *(e.masked_url for e in manager.settings.endpoints)]


def assert_no_leak(secrets: list[str], texts: list[str], public: str) -> None:
    leaked = {f for secret in secrets for f in fragments(secret, public) if any(f in t for t in texts)}
    assert not leaked, (leaked, texts)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(password=passwords, encode=st.booleans(), template=st.sampled_from(TEMPLATES))
@example(password="S3cr;et", encode=False, template=TEMPLATES[0])
@example(password="S3cr#t9x", encode=False, template=TEMPLATES[0])
@example(password="hunter/2", encode=False, template=TEMPLATES[1])
@example(password="2024/Winter!", encode=False, template=TEMPLATES[2])
@example(password="zq9?xyzw", encode=False, template=TEMPLATES[3])
@example(password="pa＠ssword", encode=False, template=TEMPLATES[0])
@example(password="pa[ssword", encode=False, template=TEMPLATES[0])
@example(password="broker.example", encode=False, template=TEMPLATES[0])
@example(password="50%off%zz%41", encode=True, template=TEMPLATES[0])
def test_a_password_in_the_url_never_shows(password, encode, template):
    """Building succeeds (an encoded password round-trips) or raises ConfigurationError; no leak either way."""
    written = quote(password, safe="") if encode else password
    if not encode:
        # By the documented grammar this ';' separates two URLs: the text after
        # it is a URL, its user name is shown.  Such a password must be encoded.
        assume(not SEPARATOR.search(password))
    url = template.replace("{}", written)
    twin = ConnectionManager(template.replace("{}", "pw"))
    public = "\n".join([template.replace("{}", ""), TEMPLATE_TEXT, *outputs(twin)])
    try:
        manager = ConnectionManager(url)
    except ConfigurationError as exc:
        assert not encode, f"a percent-encoded password is always accepted: {exc}"
        assert exc.__context__ is None and exc.__cause__ is None
        texts = [str(e) for e in chain(exc)]
    else:
        (endpoint,) = [e for e in manager.settings.endpoints if e.host == "broker.example"]
        if encode:
            assert endpoint.password == password
        texts = outputs(manager)
    assert_no_leak([password, written], texts, public)


@settings(max_examples=200, deadline=None)
@given(password=st.text(min_size=1, max_size=20), url=st.sampled_from([None, "amqp://app@broker.example//"]))
def test_a_password_option_is_taken_verbatim_and_never_shows(password, url):
    manager = ConnectionManager(url, password=password)
    assert manager.settings.endpoints[0].password == password
    twin = ConnectionManager(url, password="pw")
    assert_no_leak([password], outputs(manager), "\n".join([url or "", *outputs(twin)]))


@settings(max_examples=300, deadline=None)
@given(password=st.text(max_size=20))
def test_mask_url_keeps_only_the_user_name(password):
    assume(not SEPARATOR.search(password))
    assert mask_url(f"amqp://app:{password}@broker.example//") == "amqp://app:**@broker.example//"
    if not password.startswith("//"):  # else 'app://' is a scheme
        assert mask_url(f"app:{password}@broker.example") == "app:**@broker.example"


@given(st.text(max_size=40))
def test_mask_url_takes_any_string(text):
    assert isinstance(mask_url(text), str)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("amqp://app:S3cr3t/x@host//", "amqp://app:**@host//"),
        ("amqp://app:S3cr3t", "amqp://**"),  # user:password or host:port? mask it all
        ("amqp://app:S3cr3t/vhost?x=1", "amqp://**"),
        ("app:S3cr3t@host:5672", "app:**@host:5672"),
        ("amqp://host:5672/v", "amqp://host:5672/v"),
        ("amqp://[::1]:5672//", "amqp://[::1]:5672//"),
        ("amqp://u:p1@a//;amqp://u:p2@b//", "amqp://u:**@a//;amqp://u:**@b//"),
        ("amqp://app:'q\"u*o\\te'@host//", "amqp://app:**@host//"),
        ("", ""),
    ],
)
def test_mask_url_cases(url, shown):
    assert mask_url(url) == shown


def test_semicolon_in_a_password_is_not_a_failover_separator():
    (endpoint,) = ConnectionManager("amqp://app:S3cr;et@host//").settings.endpoints
    assert (endpoint.userid, endpoint.password, endpoint.host) == ("app", "S3cr;et", "host")


@pytest.mark.parametrize(
    "url, hosts",
    [
        ("amqp://a//;amqp://b//", ["a", "b"]),
        ("amqp://a//; amqps://b//", ["a", "b"]),
        ("amqp://a// ;\tamqp://b//;", ["a", "b"]),
        ("amqp://u:x;y@a//;amqp://u:z;w@b//", ["a", "b"]),
        (["amqp://u:x;y@a//", "amqp://b//;amqp://c//"], ["a", "b", "c"]),
    ],
)
def test_failover_urls_split_only_before_a_scheme(url, hosts):
    assert [e.host for e in ConnectionManager(url).settings.endpoints] == hosts


@pytest.mark.parametrize(
    "url, secret",
    [
        ("amqp://app:S3cr;et@host:99999//", "S3cr"),  # once split as 'amqp://app:S3cr'
        ("amqp://app:S3crXet", "S3crXet"),  # port 'S3crXet' in the parser's message
        ("amqp://app:pa＠ssword@host//", "pa＠ssword"),  # NFKC check quotes the netloc
        ("amqp://app:pa[ssword@host//", "pa[ssword"),
        ("amqp://app:it's\"*x@host:99999//", "it's"),
    ],
)
def test_url_errors_quote_no_password_and_chain_nothing(url, secret):
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(url)
    assert info.value.__context__ is None and info.value.__cause__ is None
    for part in (secret, secret[:4], secret[-4:]):
        assert part not in str(info.value)


def test_password_equal_to_the_host_name_is_masked_where_it_is_the_password():
    endpoint = ConnectionManager("amqp://app:rabbit@rabbit//").settings.endpoints[0]
    assert endpoint.masked_url == "amqp://app:**@rabbit:5672//"
    with pytest.raises(ConfigurationError, match=re.escape("'amqp://app:**@rabbit:99999//'")):
        ConnectionManager("amqp://app:rabbit@rabbit:99999//")


def test_empty_password_in_the_url_shows_neither_it_nor_the_option():
    manager = ConnectionManager("amqp://app:@host//", password="hunter22")
    assert "hunter22" not in "".join(outputs(manager))


def _settings(password: str):
    return build_settings(
        None, username="u", password=password, virtual_host="/", host="h", port=5672,
        channel_max=0, frame_max=0, heartbeat=10, connection_timeout=5, backoff=None,
        ssl_options=None, client_properties=None, socket_options=None, pool_limit=1,
        transport_options=None,
    )


def test_redact_scrubs_plain_encoded_and_decoded_forms():
    s = _settings("S3cr;et é+x")
    text = "a S3cr;et é+x b S3cr%3Bet%20%C3%A9%2Bx c S3cr%3bet+%c3%a9%2bx d S3cr;et%20é+x e"
    assert s.redact(text) == "a ** b ** c ** d ** e"
    # A password written encoded is found decoded too.
    assert _settings("p%40ss").redact("login p@ss failed") == "login ** failed"
    assert _settings("").redact("nothing to hide") == "nothing to hide"


@settings(max_examples=200, deadline=None)
@given(password=st.text(password_chars, min_size=4, max_size=20))
def test_redact_leaves_no_fragment_of_any_form(password):
    forms = [password, quote(password), quote(password, safe=""), quote_plus(password)]
    text = " | ".join(["x", *forms, "y"])
    assert_no_leak([password], [_settings(password).redact(text)], "x | y")


def test_settings_repr_masks_secret_looking_option_values():
    from carrot_kombu import ConnectionManager

    manager = ConnectionManager(
        "amqp://u:pw-XYZ@localhost//",
        transport_options={"ssl": {"keyfile_password": "KP-SECRET", "certfile": "client.pem", "keyfile": "k.pem"}},
        client_properties={"api_token": "TOK-SECRET", "connection_name": "visible"},
    )
    text = repr(manager._settings) + repr(manager) + repr(manager.status())
    for secret in ("KP-SECRET", "TOK-SECRET", "pw-XYZ"):
        assert secret not in text
    assert "client.pem" in repr(manager._settings) and "visible" in repr(manager._settings)


@pytest.mark.parametrize("password", ["s3cret", "pa;ss", "p@ss", "sp ace", "p%2Fss", "ünï"])
def test_the_cli_and_the_settings_redact_alike(password):
    """One redactor (carrot_kombu.urls) serves both: every form of the password goes, raw or encoded."""
    from urllib.parse import quote

    from carrot_kombu import cli

    url = f"amqp://app:{quote(password, safe='')}@broker.example//"
    text = f"failed: {password} / {quote(password, safe='')}"
    by_cli = cli.redactor(url)(text)
    assert by_cli == "failed: ** / **"
    assert ConnectionManager(url).settings.redact(text) == by_cli
