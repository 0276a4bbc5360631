from __future__ import annotations

import ast
import inspect
import logging
import math
import socket
import ssl

import pytest

import carrot_kombu.config as config_module
import carrot_kombu.options as options_module
import carrot_kombu.urls as urls_module
from carrot_kombu import ConfigurationError, ConnectionManager
from carrot_kombu.config import build_settings


def endpoint(manager, i=0):
    return manager.settings.endpoints[i]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"backoff": {"min": 0}}, "Backoff.min"),
        ({"backoff": {"min": 5, "max": 1}}, "Backoff.max"),
        ({"backoff": 3}, "backoff"),
        ({"pool_limit": 0}, "pool_limit"),
        ({"pool_limit": True}, "pool_limit"),
        ({"heartbeat": -1}, "heartbeat"),
        ({"heartbeat": "10"}, "heartbeat"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"host": ""}, "host"),
        ({"connection_timeout": 0}, "connection_timeout"),
        ({"channel_max": -1}, "channel_max"),
        ({"frame_max": 100}, "frame_max"),
        ({"channel_max": 5, "pool_limit": 6}, "pool_limit"),
        ({"url": "redis://localhost"}, "unknown URL scheme"),
        ({"url": "localhost:5672"}, "no scheme"),
        ({"url": "amqp://h:99999//"}, "port"),
        ({"url": "amqp://h//?heartbeat=x"}, "heartbeat"),
        ({"url": "amqp://h//?bogus=1"}, "bogus"),
        ({"url": "amqp://h//?heartbeat="}, "'heartbeat' has an empty value"),
        ({"url": "amqp://h//?frame_max="}, "'frame_max' has an empty value"),
        ({"url": "amqp://h//?frame_max"}, "'frame_max' has an empty value"),
        ({"url": "amqp://h//?ssl=&heartbeat=5"}, "'ssl' has an empty value"),
        ({"url": "amqp://h//?bogus="}, "bogus"),
        ({"url": "memory://?heartbeat="}, "no query parameters"),
        ({"url": "amqp://h//?ssl=maybe"}, "ssl"),
        ({"url": "amqp://h//?ssl_ca_certs=/x"}, "ssl_"),
        ({"url": ""}, "url"),
        ({"url": 42}, "url"),
        ({"url": "amqp://h//;memory://"}, "same transport"),
        ({"ssl_options": {"ca_certs": "/nonexistent/ca.pem"}}, "ca_certs"),
        ({"ssl_options": "yes"}, "ssl_options"),
        ({"ssl_options": {"cafile": "/etc/hosts"}}, "'cafile'"),
        ({"ssl_options": {"cacertfile": "/nonexistent/ca.pem"}}, "cacertfile"),
        ({"ssl_options": {"verify": "verify_maybe"}}, "verify"),
        ({"ssl_options": {"verify": ssl.CERT_OPTIONAL}}, "verify"),
        ({"ssl_options": {"cert_reqs": "CERT_REQUIRED"}}, "cert_reqs"),
        ({"ssl_options": {"server_name_indication": "disable"}}, "server_name_indication"),
        ({"ssl_options": {"server_hostname": 42}}, "server_hostname"),
        ({"ssl_options": {"server_side": "no"}}, "server_side"),
        ({"ssl_options": {1: True}}, "ssl_options"),
        ({"ssl_options": {"context": ssl.create_default_context()}}, "context"),
        ({"ssl_options": {"context": {"ca_certs": "/etc/hosts"}}}, "'ca_certs'"),
        ({"ssl_options": {"session": None}}, "session"),
        ({"socket_options": {"TCP_NODELAY": "1"}}, "TCP_NODELAY"),
        ({"socket_options": {"TCP_NODELAY": 2**40}}, "TCP_NODELAY"),
        ({"socket_options": {"TCP_NO_DELAY": 1}}, "TCP_NO_DELAY"),
        ({"socket_options": {"SO_RCVBUF": 65536}}, "SO_RCVBUF"),
        ({"socket_options": {"SO_KEEPALIVE": 0}}, "SO_KEEPALIVE"),
        ({"socket_options": {-1: 1}}, "socket_options"),
        ({"socket_options": {1.5: 1}}, "socket_options"),
        ({"socket_options": {True: 1}}, "socket_options"),
        ({"socket_options": [1]}, "socket_options"),
        ({"client_properties": [1]}, "client_properties"),
        ({"transport_options": "x"}, "transport_options"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, needle):
    with pytest.raises(ConfigurationError, match=needle) as info:
        ConnectionManager(**kwargs)
    assert isinstance(info.value, ValueError)


def test_unreadable_ssl_file_is_rejected(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    ca.chmod(0)
    import os

    if os.access(ca, os.R_OK):  # root reads anything: use a directory instead
        ca = tmp_path
    with pytest.raises(ConfigurationError, match="ca_certs"):
        ConnectionManager(ssl_options={"ca_certs": str(ca)})


def test_url_overrides_what_it_expresses_and_options_fill_the_rest():
    m = ConnectionManager(
        "amqp://alice:pw@broker.example:5999/prod?heartbeat=3&connect_timeout=2.5",
        username="bob", password="other", virtual_host="/", host="ignored",
        port=1234, heartbeat=30, connection_timeout=9, frame_max=8192,
    )
    e = endpoint(m)
    assert (e.host, e.port, e.userid, e.password, e.virtual_host) == ("broker.example", 5999, "alice", "pw", "prod")
    assert (e.heartbeat, e.connect_timeout, e.frame_max) == (3, 2.5, 8192)


def test_options_apply_where_the_url_is_silent():
    e = endpoint(ConnectionManager("amqp://broker", username="bob", password="pw", virtual_host="v", port=5673, heartbeat=2.2))
    assert (e.host, e.port, e.userid, e.password, e.virtual_host, e.heartbeat) == ("broker", 5673, "bob", "pw", "v", 3)
    assert endpoint(ConnectionManager("amqp://broker//")).virtual_host == "/"


def test_no_url_uses_the_options():
    e = endpoint(ConnectionManager(host="h", port=5679, username="u", password="p", virtual_host="vh"))
    assert (e.host, e.port, e.userid, e.virtual_host, e.ssl) == ("h", 5679, "u", "vh", False)


def test_failover_urls_string_and_list():
    m = ConnectionManager("amqp://a:1//;amqp://b:2//")
    assert [(e.host, e.port) for e in m.settings.endpoints] == [("a", 1), ("b", 2)]
    m = ConnectionManager(["amqp://a:1//", "amqp://b:2//"])
    assert [(e.host, e.port) for e in m.settings.endpoints] == [("a", 1), ("b", 2)]


def test_amqps_verifies_certificates_by_default():
    e = endpoint(ConnectionManager("amqps://broker.example//"))
    assert e.port == 5671
    opts = e.ssl_for_connection()
    assert opts["server_hostname"] == "broker.example"
    assert opts.get("cert_reqs", ssl.CERT_REQUIRED) == ssl.CERT_REQUIRED


def test_ssl_dict_is_fresh_per_connection():
    e = endpoint(ConnectionManager("amqps://h//"))
    first = e.ssl_for_connection()
    first["server_hostname"] = "mutated"
    assert e.ssl_for_connection()["server_hostname"] == "h"


def test_disabling_verification_is_never_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="carrot_kombu"):
        ConnectionManager("amqps://h//?ssl_cert_reqs=CERT_NONE")
    assert "verification is disabled" in caplog.text


def test_password_never_in_repr_settings_or_errors():
    secret = "s3cr3t-Pw"
    m = ConnectionManager(f"amqp://user:{secret}@h//")
    assert secret not in repr(m)
    assert secret not in repr(m.settings)
    assert secret not in str(m.status().as_dict())
    assert "user:**@h" in m.status().broker
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(f"amqp://user:{secret}@h:99999//")
    assert secret not in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(f"amqp://user:{secret}@h//?nope=1")
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    "url, secret",
    [
        ("amqp://app:S3cr#t9x@rabbit//", "S3cr"),
        ("amqp://app:hunter/2@rabbit//", "hunter"),
        ("amqp://app:2024/Winter!@rabbit:5672//", "Winter"),
        ("amqp://app:zq9?x@rabbit//", "zq9"),
    ],
)
def test_unencoded_passwords_are_rejected_without_showing_them(url, secret):
    with pytest.raises(ConfigurationError, match="percent-encode|not a valid URL") as info:
        ConnectionManager(url)
    assert secret not in str(info.value)


def test_tcp_user_timeout_outlasts_heartbeats_and_blocked_timeout():
    import socket
    import sys

    from carrot_kombu._pyamqp.link import _socket_settings

    if not (sys.platform.startswith("linux") and hasattr(socket, "TCP_USER_TIMEOUT")):
        pytest.skip("TCP_USER_TIMEOUT is Linux-only")
    m = ConnectionManager(heartbeat=10, blocked_timeout=30)
    opts = _socket_settings(m.settings.endpoints[0], m.settings)
    assert opts[socket.TCP_USER_TIMEOUT] >= 30_000  # py-amqp's default is 1000 ms
    m = ConnectionManager(heartbeat=60, blocked_timeout=None, socket_options={socket.TCP_NODELAY: 1})
    opts = _socket_settings(m.settings.endpoints[0], m.settings)
    assert opts[socket.TCP_USER_TIMEOUT] >= 120_000 and opts[socket.TCP_NODELAY] == 1
    m = ConnectionManager(socket_options={socket.TCP_USER_TIMEOUT: 5000})
    assert _socket_settings(m.settings.endpoints[0], m.settings)[socket.TCP_USER_TIMEOUT] == 5000


def test_cert_none_does_not_force_a_hostname_check():
    e = ConnectionManager("amqps://h//?ssl_cert_reqs=CERT_NONE").settings.endpoints[0]
    assert "server_hostname" not in e.ssl_for_connection()


def _build(url=None, **overrides):
    options = dict(
        username="guest", password="guest", virtual_host="/", host="localhost", port=5672,
        channel_max=0, frame_max=0, heartbeat=10, connection_timeout=60.0, backoff=None,
        ssl_options=None, client_properties=None, socket_options=None, pool_limit=10,
        transport_options=None,
    )
    options.update(overrides)
    return build_settings(url, **options)


def test_reply_timeout_defaults_to_ten_seconds_and_is_kept():
    assert _build().reply_timeout == 10.0
    settings = _build(reply_timeout=2)
    assert settings.reply_timeout == 2.0 and isinstance(settings.reply_timeout, float)
    assert "reply_timeout=2.0" in repr(settings)


@pytest.mark.parametrize("value", [0, -1, math.inf, math.nan, True, "10", None])
def test_reply_timeout_must_be_a_finite_positive_number(value):
    with pytest.raises(ConfigurationError, match="reply_timeout"):
        _build(reply_timeout=value)


def test_carrot_ssl_option_names_are_aliases(tmp_path, caplog):
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in paths.values():
        path.write_text("x")
    opts = endpoint(ConnectionManager(ssl_options={
        "cacertfile": str(paths["ca"]),
        "certfile": str(paths["cert"]),
        "keyfile": str(paths["key"]),
        "verify": "verify_peer",
        "server_name_indication": "broker.example",
    })).ssl
    assert opts == {
        "ca_certs": str(paths["ca"]), "certfile": str(paths["cert"]), "keyfile": str(paths["key"]),
        "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "broker.example",
    }
    assert endpoint(ConnectionManager(ssl_options={"verify": ssl.CERT_REQUIRED})).ssl == {"cert_reqs": ssl.CERT_REQUIRED}
    with caplog.at_level(logging.WARNING, logger="carrot_kombu"):
        e = endpoint(ConnectionManager(ssl_options={"verify": "verify_none"}))
    assert e.ssl == {"cert_reqs": ssl.CERT_NONE} and "verification is disabled" in caplog.text


def test_alias_and_py_amqp_name_may_repeat_a_value_but_not_contradict_it():
    same = endpoint(ConnectionManager(ssl_options={"verify": "verify_none", "cert_reqs": ssl.CERT_NONE}))
    assert same.ssl == {"cert_reqs": ssl.CERT_NONE}
    with pytest.raises(ConfigurationError, match="'server_name_indication' and 'server_hostname'"):
        ConnectionManager(ssl_options={"server_name_indication": "a", "server_hostname": "b"})
    with pytest.raises(ConfigurationError, match="'verify' and 'cert_reqs'"):
        ConnectionManager(ssl_options={"verify": "verify_peer", "cert_reqs": ssl.CERT_NONE})


def test_unknown_ssl_option_is_named_with_everything_accepted():
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(ssl_options={"cafile": "/etc/hosts"})
    message = str(info.value)
    assert "ssl_options" in message and "'cafile'" in message and "inside 'context'" in message
    for name in (
        "ca_certs", "cert_reqs", "certfile", "ciphers", "context", "do_handshake_on_connect", "keyfile",
        "server_hostname", "server_side", "ssl_version", "suppress_ragged_eofs", "session",
        "cacertfile", "verify", "server_name_indication", *options_module._PYAMQP_SSL_KEYS,
    ):
        assert name in message


def test_every_py_amqp_ssl_option_is_accepted(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    sni = {
        "ca_certs": str(ca), "certfile": str(ca), "keyfile": str(ca), "cert_reqs": ssl.CERT_OPTIONAL,
        "server_hostname": "h", "server_side": False, "do_handshake_on_connect": False,
        "suppress_ragged_eofs": True, "ciphers": "ECDHE+AESGCM", "ssl_version": ssl.PROTOCOL_TLS_CLIENT,
    }
    if "tls_minimum_version" in options_module._PYAMQP_SSL_KEYS:  # amqp >= 5.4
        sni.update(tls_minimum_version=ssl.TLSVersion.TLSv1_2, tls_maximum_version=ssl.TLSVersion.TLSv1_3)
    assert endpoint(ConnectionManager(ssl_options=sni)).ssl == sni
    contextual = {
        "context": {"cafile": str(ca), "capath": str(tmp_path), "cadata": None, "check_hostname": True,
                    "purpose": ssl.Purpose.SERVER_AUTH},
        "server_hostname": "h", "server_side": False, "do_handshake_on_connect": False,
        "suppress_ragged_eofs": True, "session": None,
    }
    assert endpoint(ConnectionManager(ssl_options=contextual)).ssl == contextual


def test_ssl_option_names_match_the_installed_py_amqp():
    """The accepted names are read off py-amqp's signatures: fail loudly when they change."""
    from amqp.transport import SSLTransport

    def params(function, *skip):
        return set(inspect.signature(function).parameters) - {"self", "sock", *skip}

    assert params(SSLTransport._wrap_socket_sni) == options_module._PYAMQP_SSL_KEYS
    assert params(SSLTransport._wrap_socket, "sslopts") == {"context"}
    assert params(SSLTransport._wrap_context, "sslopts", "ctx_options") | params(
        ssl.create_default_context
    ) == options_module._PYAMQP_CONTEXT_KEYS
    wrap_socket = params(ssl.SSLContext.wrap_socket)
    assert options_module._PYAMQP_CONTEXT_WRAP_KEYS == wrap_socket


def test_context_keeps_py_amqp_s_split_between_context_and_wrap_socket(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    with pytest.raises(ConfigurationError, match="cannot be combined with 'context'"):
        ConnectionManager(ssl_options={"context": {"cafile": str(ca)}, "ca_certs": str(ca)})
    with pytest.raises(ConfigurationError, match=r"\['context'\]\['cafile'\]"):
        ConnectionManager(ssl_options={"context": {"cafile": str(tmp_path / "missing.pem")}})


def test_ssl_query_parameters_still_merge_over_ssl_options(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    e = endpoint(ConnectionManager(f"amqps://h//?ssl_ca_certs={ca}", ssl_options={"verify": "verify_peer"}))
    assert e.ssl == {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": str(ca)}


def test_socket_option_names_resolve_to_numbers():
    m = ConnectionManager(socket_options={
        "TCP_NODELAY": 1, "TCP_KEEPIDLE": 30, socket.TCP_KEEPINTVL: 5, "TCP_CONGESTION": b"cubic",
        "SO_KEEPALIVE": 1,  # py-amqp enables it on every socket: nothing to add
    })
    assert m.settings.socket_options == {
        socket.TCP_NODELAY: 1, socket.TCP_KEEPIDLE: 30, socket.TCP_KEEPINTVL: 5, socket.TCP_CONGESTION: b"cubic",
    }
    assert ConnectionManager(socket_options={"SO_KEEPALIVE": True}).settings.socket_options is None
    assert ConnectionManager(socket_options={"TCP_NODELAY": True}).settings.socket_options == {socket.TCP_NODELAY: 1}


def test_socket_option_given_by_name_and_number_must_agree():
    same = ConnectionManager(socket_options={"TCP_NODELAY": 1, socket.TCP_NODELAY: 1})
    assert same.settings.socket_options == {socket.TCP_NODELAY: 1}
    with pytest.raises(ConfigurationError, match="socket_options"):
        ConnectionManager(socket_options={"TCP_NODELAY": 1, socket.TCP_NODELAY: 0})


def test_unknown_socket_option_is_named_with_what_is_accepted():
    with pytest.raises(ConfigurationError) as info:
        ConnectionManager(socket_options={"TCP_NO_DELAY": 1})
    message = str(info.value)
    assert "'TCP_NO_DELAY'" in message and "TCP_NODELAY" in message and "TCP_KEEPIDLE" in message


def test_socket_option_names_reach_py_amqp():
    from carrot_kombu._pyamqp.link import _socket_settings

    m = ConnectionManager(socket_options={"TCP_NODELAY": 1})
    assert _socket_settings(m.settings.endpoints[0], m.settings)[socket.TCP_NODELAY] == 1


def _complexity(function: ast.AST) -> int:
    """McCabe complexity, counted as radon does."""
    count = 1
    todo = list(ast.iter_child_nodes(function))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.If, ast.IfExp, ast.For, ast.While, ast.ExceptHandler, ast.Assert)):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
        todo.extend(ast.iter_child_nodes(node))
    return count


@pytest.mark.parametrize("module", [config_module, options_module, urls_module])
def test_config_functions_stay_small(module):
    tree = ast.parse(inspect.getsource(module))
    complex_ = {
        node.name: _complexity(node)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and _complexity(node) > 10
    }
    assert not complex_


def test_tls_without_a_port_uses_the_tls_port(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    tls = {"ca_certs": str(ca)}
    assert endpoint(ConnectionManager("amqps://h//", ssl_options=tls)).port == 5671
    assert endpoint(ConnectionManager(ssl_options=tls)).port == 5671
    assert endpoint(ConnectionManager("amqp://h//?ssl=true", ssl_options=tls)).port == 5671
    assert endpoint(ConnectionManager("amqps://h:5680//", ssl_options=tls)).port == 5680
    assert endpoint(ConnectionManager("amqps://h//", port=5690, ssl_options=tls)).port == 5690
    assert endpoint(ConnectionManager("amqp://h//")).port == 5672
