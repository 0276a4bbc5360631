from __future__ import annotations

import itertools

import pytest

from carrot_kombu import Backoff, ConfigurationError


def take(it, n):
    return list(itertools.islice(it, n))


def test_schedule_without_jitter_is_exact_doubling_capped_at_max():
    assert take(Backoff(min=0.5, max=4.0, jitter=False).delays(), 7) == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]


def test_carrot_defaults_in_seconds():
    policy = Backoff()
    assert (policy.min, policy.max, policy.jitter, policy.max_tries, policy.max_time) == (1.0, 30.0, True, None, None)
    assert take(Backoff(jitter=False).delays(), 7) == [1, 2, 4, 8, 16, 30, 30]


def test_jitter_stays_within_min_and_nominal():
    nominal = take(Backoff(min=0.2, max=3.0, jitter=False).delays(), 12)
    for _ in range(200):
        drawn = take(Backoff(min=0.2, max=3.0, jitter=True).delays(), 12)
        for got, top in zip(drawn, nominal):
            assert 0.2 <= got <= top
    # and it really is random: not every draw equals the nominal value
    draws = {tuple(take(Backoff(min=0.2, max=3.0).delays(), 4)) for _ in range(20)}
    assert len(draws) > 1


def test_each_iterator_restarts_the_schedule():
    policy = Backoff(min=1.0, max=8.0, jitter=False)
    first = policy.delays()
    take(first, 3)
    assert next(policy.delays()) == 1.0
    assert next(first) == 8.0


def test_max_tries_bounds_the_number_of_retries():
    assert take(Backoff(min=0.1, jitter=False, max_tries=4).delays(), 10) == [0.1, 0.2, 0.4]
    assert take(Backoff(min=0.1, max_tries=1).delays(), 10) == []


def test_max_time_stops_and_truncates_with_the_clock():
    now = [100.0]
    it = Backoff(min=1.0, max=10.0, jitter=False, max_time=5.0)._delays(lambda: now[0])
    assert next(it) == 1.0
    now[0] += 1.0
    assert next(it) == 2.0
    now[0] += 2.0
    assert next(it) == 2.0  # 4.0 truncated to the 2.0 s left
    now[0] += 2.0
    assert take(it, 1) == []


def test_mapping_coercion_and_value_semantics():
    assert Backoff.coerce({"min": 0.5, "max": 2}) == Backoff(min=0.5, max=2)
    assert Backoff.coerce(None) == Backoff()
    policy = Backoff(min=2.0)
    assert Backoff.coerce(policy) is policy
    with pytest.raises(AttributeError):
        policy.min = 3.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"min": 0}, "Backoff.min"),
        ({"min": -1}, "Backoff.min"),
        ({"min": float("nan")}, "Backoff.min"),
        ({"min": 2, "max": 1}, "Backoff.max"),
        ({"max": float("inf")}, "Backoff.max"),
        ({"max_tries": 0}, "Backoff.max_tries"),
        ({"max_tries": 1.5}, "Backoff.max_tries"),
        ({"max_time": 0}, "Backoff.max_time"),
        ({"jitter": "yes"}, "Backoff.jitter"),
        ({"min": "1"}, "Backoff.min"),
    ],
)
def test_bad_values_raise_configuration_error_naming_the_field(kwargs, needle):
    with pytest.raises(ConfigurationError, match=needle):
        Backoff(**kwargs)


def test_unknown_mapping_key_is_rejected():
    with pytest.raises(ConfigurationError, match="unknown key"):
        Backoff.coerce({"minimum": 1})
