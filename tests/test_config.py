from __future__ import annotations

import logging
import ssl

import pytest

from carrot_kombu import ConfigurationError, ConnectionManager


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
        ({"url": "amqp://h//?ssl=maybe"}, "ssl"),
        ({"url": "amqp://h//?ssl_ca_certs=/x"}, "ssl_"),
        ({"url": ""}, "url"),
        ({"url": 42}, "url"),
        ({"url": "amqp://h//;memory://"}, "same transport"),
        ({"ssl_options": {"ca_certs": "/nonexistent/ca.pem"}}, "ca_certs"),
        ({"ssl_options": "yes"}, "ssl_options"),
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

    from carrot_kombu._link import _socket_settings

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
