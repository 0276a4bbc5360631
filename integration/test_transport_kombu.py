"""kombu code over ``carrot+amqp://`` in this process, on the shared broker: what Celery's own code does to it.

Each test is a habit of kombu or Celery that plain py-amqp tolerates and that
the transport must tolerate too (found by attacking the transport as a Celery
user would): extra ``publish()`` options, threads sharing one channel, a
channel error on ``default_channel``.
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

import kombu
import pytest
from amqp.exceptions import NotFound

import carrot_kombu  # noqa: F401 - registers the carrot+amqp:// transport

from .broker import unique


@pytest.fixture
def conn(amqp_url: str) -> Iterator[kombu.Connection]:
    connection = kombu.Connection(f"carrot+{amqp_url}", connect_timeout=5)
    connection.ensure_connection(max_retries=3)
    queues: list[str] = []
    connection.test_queues = queues  # type: ignore[attr-defined]
    try:
        yield connection
    finally:
        with kombu.Connection(f"carrot+{amqp_url}") as cleanup:
            for name in queues:
                cleanup.default_channel.queue_delete(name)
        connection.release()


def _queue(conn: kombu.Connection) -> str:
    name = unique("ck-tk")
    conn.default_channel.queue_declare(name, auto_delete=False)
    conn.test_queues.append(name)  # type: ignore[attr-defined]
    return name


def test_options_that_are_not_amqp_properties_are_not_sent_as_py_amqp_does(conn):
    """Celery's ``Task.retry()`` passes its options through to ``publish()``: they must not fail the publish."""
    name = _queue(conn)
    producer = kombu.Producer(conn.default_channel)
    producer.publish({"n": 1}, routing_key=name, retries=2, countdown=None, priority=3, delivery_mode=2)
    message = conn.default_channel.basic_get(name, no_ack=True)
    assert message is not None and message.properties.get("priority") == 3
    assert "retries" not in message.properties and "countdown" not in message.properties


def test_threads_sharing_one_channel_each_get_their_own_reply(conn):
    """Celery's thread pool shares a channel: 8 threads x 25 declares, each answered with its own queue."""
    names = [_queue(conn) for _ in range(8)]
    chan = conn.default_channel
    wrong: list[Any] = []
    errors: list[BaseException] = []

    def declare(name: str) -> None:
        try:
            for _ in range(25):
                answer = chan.queue_declare(name, passive=True)
                if answer.queue != name:
                    wrong.append((name, answer.queue))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=declare, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a thread hung on the shared channel"
    assert not errors and not wrong, (errors[:3], wrong[:3])


def test_default_channel_works_again_after_a_channel_error(conn):
    """py-amqp reopens a channel the broker closed; kombu code relies on default_channel surviving a 404."""
    name = _queue(conn)
    with pytest.raises(NotFound):
        conn.default_channel.queue_declare(unique("ck-missing"), passive=True)
    assert conn.default_channel.queue_declare(name, passive=True).queue == name
    kombu.Producer(conn.default_channel).publish(b"after", routing_key=name)
    message = conn.default_channel.basic_get(name, no_ack=True)
    assert message is not None and message.body == b"after"


@pytest.mark.parametrize("url_tail, kwargs, error", [
    ("//", {"userid": "guest", "password": "wrong-password"}, "AccessRefused"),
    ("", {"virtual_host": "ck-no-such-vhost"}, "NotAllowed"),
])
def test_userid_password_and_virtual_host_arguments_are_used_as_py_amqp_uses_them(amqp_url, url_tail, kwargs, error):
    """Celery's broker_user / broker_password / broker_vhost: they used to be ignored (connected as guest to /)."""
    host = amqp_url.split("@", 1)[1].split("/", 1)[0]
    connection = kombu.Connection(f"carrot+amqp://{host}{url_tail}", connect_timeout=5, **kwargs)
    try:
        with pytest.raises(Exception) as info:
            connection.ensure_connection(max_retries=1)
        assert error in f"{type(info.value).__name__} {info.value!r} {info.value.__cause__!r}", repr(info.value)
        assert "wrong-password" not in str(info.value)
    finally:
        connection.release()


def test_connections_dropped_without_close_give_their_channels_back(amqp_url, conn):
    """A script that forgets close(): with py-amqp the socket closes on collection; here the channels must return.

    Each dropped kombu connection used to keep its channel leased for the
    process's life: after ``pool_limit`` of them every broker call failed.
    """
    import gc

    from carrot_kombu.transport import manager_for_connection

    name = _queue(conn)
    limit = manager_for_connection(conn).status().pool.limit

    def forgetful() -> None:
        kombu.Connection(f"carrot+{amqp_url}").default_channel.queue_declare(name, passive=True)

    for _ in range(limit + 20):
        forgetful()
    gc.collect()
    with kombu.Connection(f"carrot+{amqp_url}") as good:
        kombu.Producer(good.default_channel).publish(b"still works", routing_key=name)
    status = manager_for_connection(conn).status()
    assert status.pool.leased <= 3, status.pool


def test_exclusive_queues_end_with_their_kombu_connection(amqp_url, conn):
    """The per-request reply-queue pattern: with py-amqp each exclusive queue ends with its connection.

    Here the AMQP connection is shared and lives on: close() deletes them
    (they used to stay until the process exited, one per request).
    """
    from amqp.exceptions import NotFound

    names = []
    for _ in range(10):
        with kombu.Connection(f"carrot+{amqp_url}") as per_request:
            names.append(per_request.default_channel.queue_declare("", exclusive=True).queue)
    with kombu.Connection(f"carrot+{amqp_url}") as per_request:
        named = unique("ck-excl")
        per_request.default_channel.queue_declare(named, exclusive=True, auto_delete=False)
    names.append(named)
    for name in names:
        with pytest.raises(NotFound):
            conn.channel().queue_declare(name, passive=True)


@pytest.mark.parametrize("scheme", ["carrot+amqp", "amqp"])
def test_a_consumer_channel_the_broker_closes_is_reported_by_the_next_drain_events(amqp_url, scheme):
    """Red team 17c F1: the broker closing a kombu consumer's channel (connection up) left
    ``drain_events`` timing out for ever on ``carrot+amqp://`` (a Celery worker consumed nothing and
    logged nothing); py-amqp raises the close from the next ``drain_events``, and so must we."""
    from amqp.exceptions import PreconditionFailed

    queue = kombu.Queue(unique("ck-chanclose"), auto_delete=True)
    got: list[int] = []
    with kombu.Connection(amqp_url.replace("amqp", scheme, 1), connect_timeout=5) as connection:
        connection.Producer().publish({"i": 0}, routing_key=queue.name, declare=[queue])
        channel = connection.channel()

        def on_message(body: Any, message: Any) -> None:
            got.append(body["i"])
            message.channel.basic_ack(99999)  # not a delivery of this channel: the broker closes it (406)

        consumer = kombu.Consumer(channel, [queue], callbacks=[on_message], no_ack=True)
        consumer.consume()
        with pytest.raises(PreconditionFailed, match="unknown delivery tag 99999"):
            for _ in range(5):  # the delivery, then the close, each read by one drain_events
                try:
                    connection.drain_events(timeout=2)
                except TimeoutError:
                    pass
        assert got == [0]
        with connection.channel() as other:
            other.queue_delete(queue.name)
