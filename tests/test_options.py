"""The table of options (carrot_kombu.options.OPTIONS) and everything derived from it agree.

The constructor's keyword arguments, their defaults and docstring, the
checks, the transport options of ``carrot+amqp://``, the Celery settings
of ``from_celery`` and the table of ``docs/configuration.rst`` all come from
(or are checked against) the one table.
"""

from __future__ import annotations

import inspect
import re
import socket
from pathlib import Path
from typing import Any

import kombu
import pytest

from carrot_kombu import Backoff, ConfigurationError, ConnectionManager, transport
from carrot_kombu.options import (
    CELERY_SETTINGS,
    OPTION_NAMES,
    OPTIONS,
    TRANSPORT_MANAGER_OPTIONS,
    URL_QUERY_KEYS,
    defaults,
    rst_table,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "configuration.rst"

#: One bad value per option; the error must name the option.
BAD = {
    "username": 1, "password": b"x", "virtual_host": None, "host": "", "port": 0, "channel_max": -1,
    "frame_max": 100, "heartbeat": -1, "connection_timeout": 0, "backoff": 3, "ssl_options": "yes",
    "client_properties": [("a", 1)], "socket_options": {"SO_NOPE": 1}, "pool_limit": 0,
    "transport_options": "x", "blocked_timeout": float("inf"), "max_pending": 0, "reply_timeout": -1,
    "restart_after_fork": 1, "consumer_threads": 0,
}
#: One good value per option, unlike its default, and what the manager's settings say for it.
GOOD: dict[str, tuple[Any, Any]] = {
    "heartbeat": (0, lambda s: s.endpoints[0].heartbeat == 0),
    "backoff": ({"min": 0.5, "max": 2}, lambda s: s.backoff == Backoff(min=0.5, max=2)),
    "pool_limit": (3, lambda s: s.pool_limit == 3),
    "blocked_timeout": (None, lambda s: s.blocked_timeout is None),
    "max_pending": (7, lambda s: s.max_pending == 7),
    "reply_timeout": (2.5, lambda s: s.reply_timeout == 2.5),
    "consumer_threads": (3, lambda s: s.consumer_threads == 3),
}


def test_the_constructor_takes_the_tables_options_with_its_defaults():
    params = inspect.signature(ConnectionManager.__init__).parameters
    keywords = {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert tuple(keywords) == OPTION_NAMES
    assert keywords == defaults()


def test_the_constructor_documents_every_option():
    doc = inspect.getdoc(ConnectionManager) or ""
    documented = re.findall(r"^    (\w+):", doc.split("Args:", 1)[1].split("Raises:", 1)[0], re.MULTILINE)
    assert documented == ["url", *OPTION_NAMES]


def test_the_default_settings_are_the_tables_defaults():
    settings = ConnectionManager().settings
    endpoint = settings.endpoints[0]
    values = defaults()
    assert (endpoint.userid, endpoint.password, endpoint.virtual_host, endpoint.host, endpoint.port) == (
        values["username"], values["password"], values["virtual_host"], values["host"], values["port"])
    assert (settings.pool_limit, settings.max_pending, settings.reply_timeout, settings.blocked_timeout,
            settings.restart_after_fork) == (values["pool_limit"], values["max_pending"], values["reply_timeout"],
                                             values["blocked_timeout"], values["restart_after_fork"])


@pytest.mark.parametrize("name", OPTION_NAMES)
def test_a_bad_value_is_one_error_naming_the_option(name):
    assert set(BAD) == set(OPTION_NAMES)
    with pytest.raises(ConfigurationError, match=rf"^{name}\b") as info:
        ConnectionManager(**{name: BAD[name]})
    assert info.value.__context__ is None


def test_an_unknown_option_is_a_type_error_as_for_any_call():
    with pytest.raises(TypeError):
        ConnectionManager(heartbeats=3)  # type: ignore[call-arg]


def test_the_docs_table_is_the_tables():
    text = DOCS.read_text()
    assert rst_table() in text, (
        "docs/configuration.rst's options table differs from carrot_kombu.options.OPTIONS; paste the output of "
        "python -c 'from carrot_kombu.options import rst_table; print(rst_table())'"
    )
    for option in OPTIONS:
        assert f"``{option.name}``" in text


def test_the_url_accepts_the_tables_query_parameters_and_no_other():
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager("amqp://h//?hearbeat=3")
    assert str(sorted(URL_QUERY_KEYS)) in str(info.value)
    settings = ConnectionManager("amqp://h//?heartbeat=3&connection_timeout=2&channel_max=20&frame_max=8192").settings
    endpoint = settings.endpoints[0]
    assert (endpoint.heartbeat, endpoint.connect_timeout, endpoint.channel_max, endpoint.frame_max) == (3, 2.0, 20, 8192)


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    yield port
    with transport._registry_lock:
        keys = [key for key in transport._registry if any(f":{port}/" in url for url in key[1])]
        entries = [transport._registry.pop(key) for key in keys]
    for entry in entries:
        entry.manager.stop(timeout=5)


def test_every_manager_transport_option_reaches_the_manager(closed_port):
    assert transport.MANAGER_OPTIONS == TRANSPORT_MANAGER_OPTIONS
    assert set(GOOD) == set(TRANSPORT_MANAGER_OPTIONS)
    conn = kombu.Connection(f"carrot+amqp://guest:guest@127.0.0.1:{closed_port}//",
                            transport_options={name: value for name, (value, _) in GOOD.items()})
    settings = transport.manager_for_connection(conn).settings
    assert "max_pending" not in settings.transport_options  # a manager option, not py-amqp's
    for name, (_, holds) in GOOD.items():
        assert holds(settings), name


def test_from_celery_takes_the_tables_celery_settings():
    celery = pytest.importorskip("celery")
    app = celery.Celery("options", broker="amqp://u:p@h:5680//", set_as_current=False)
    chosen = {"heartbeat": 0, "connection_timeout": 7.0, "pool_limit": 4, "backoff": 9}
    assert set(chosen) == set(CELERY_SETTINGS)
    for option, value in chosen.items():
        app.conf[CELERY_SETTINGS[option].setting] = value
    settings = ConnectionManager.from_celery(app).settings
    endpoint = settings.endpoints[0]
    assert (endpoint.heartbeat, endpoint.connect_timeout, settings.pool_limit, settings.backoff.max_tries) == (
        0, 7.0, 4, 9)
