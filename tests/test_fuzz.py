"""Bad input fuzz: any options give a manager or one ConfigurationError, never anything else.

Construction only touches no network; managers on ``memory://`` are also
started and stopped.  Hosts are drawn from loopback names so that no test
ever resolves or contacts another machine.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carrot_kombu import ConfigurationError, ConnectionManager

numbers = st.one_of(
    st.integers(min_value=-10, max_value=100_000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just(True),
    st.text(max_size=3),
    st.none(),
)
schemes = st.sampled_from(["amqp", "amqps", "pyamqp", "memory", "redis", "http", "", "AMQP", "amqp+x"])
hosts = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "", "local host", "127.0.0.1:", "h:h"])
users = st.text(alphabet="ab:@/%?#;!", max_size=6)
paths = st.text(alphabet="ab/%2F", max_size=5)
queries = st.lists(
    st.tuples(
        st.sampled_from(["heartbeat", "ssl", "frame_max", "channel_max", "connect_timeout", "bogus", "ssl_cert_reqs"]),
        st.text(alphabet="0123456789.-xyzCERT_NOE", max_size=6),
    ),
    max_size=3,
)


@st.composite
def urls(draw):
    scheme = draw(schemes)
    auth = draw(users)
    host = draw(hosts)
    port = draw(st.one_of(st.none(), st.integers(min_value=-5, max_value=70_000)))
    url = f"{scheme}://"
    if auth:
        url += auth + "@"
    url += host
    if port is not None:
        url += f":{port}"
    url += "/" + draw(paths)
    query = draw(queries)
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query)
    return url


options = st.fixed_dictionaries(
    {},
    optional={
        "heartbeat": numbers,
        "port": numbers,
        "pool_limit": numbers,
        "channel_max": numbers,
        "frame_max": numbers,
        "connection_timeout": numbers,
        "blocked_timeout": numbers,
        "backoff": st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["min", "max", "jitter", "max_tries", "max_time", "nope"]), numbers, max_size=4
            ),
        ),
        "ssl_options": st.one_of(st.none(), st.booleans(), st.just({"ca_certs": "/nonexistent"}), st.just("x")),
        "host": st.one_of(hosts, numbers),
        "username": st.one_of(st.text(max_size=4), numbers),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(url=st.one_of(st.none(), urls(), st.lists(urls(), max_size=3)), opts=options)
def test_any_input_gives_a_manager_or_a_configuration_error(url, opts):
    try:
        manager = ConnectionManager(url, **opts)
    except ConfigurationError as exc:
        assert str(exc)  # one clear message
        return
    settings_ = manager.settings
    for endpoint in settings_.endpoints:
        assert 1 <= endpoint.port <= 65535
        assert endpoint.heartbeat >= 0 and endpoint.connect_timeout > 0
        assert math.isfinite(endpoint.connect_timeout)
    assert settings_.pool_limit >= 1
    repr(manager)
    manager.status().as_dict()
    if all(not e.is_amqp for e in settings_.endpoints):
        manager.start()
        manager.stop(timeout=5)
