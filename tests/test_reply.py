"""The hand-over of replies from the reader thread to a waiting thread."""

from __future__ import annotations

import socket
import threading

import pytest

from carrot_kombu._amqp import _Reply


class FakeConn:
    def __init__(self):
        self._carrot_waiters = set()
        self._carrot_reply_lock = threading.Lock()

    def _carrot_blocked_deadline(self):
        return None  # not blocked


class FakeChannel:
    """Its failure appears *while* the waiter checks for one, with a wake-up."""

    def __init__(self):
        self.connection = FakeConn()
        self._carrot_conn = self.connection
        self._carrot_replies = []
        self._pending = {}
        self.calls = 0
        self.reply = None

    def _carrot_failure(self):
        self.calls += 1
        if self.calls == 1:
            self.failure = RuntimeError("channel closed by broker")
            self.reply.event.set()  # the reader wakes the waiter right now
            return None
        return self.failure


def test_a_wakeup_during_the_failure_check_is_not_lost():
    chan = FakeChannel()
    reply = _Reply(chan, [(50, 11)])
    chan.reply = reply
    reply.register()
    outcome = []

    def wait():
        try:
            reply.get(timeout=None)
        except BaseException as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(2)
    reply.unregister()
    assert not waiter.is_alive(), "the wake-up was lost: the waiter sleeps forever"
    assert isinstance(outcome[0], RuntimeError)


def test_a_reply_dispatched_before_the_wait_is_kept_for_it():
    chan = FakeChannel()
    chan._carrot_replies.append(((50, 11), "queue", 0, 0))
    reply = _Reply(chan, [(50, 11)])
    reply.register()
    try:
        assert reply.get(timeout=0) == ((50, 11), "queue", 0, 0)
        assert chan._pending == {}
    finally:
        reply.unregister()


def test_timeout_without_reply():
    chan = FakeChannel()
    chan.failure = None
    chan.calls = 1
    reply = _Reply(chan, [(50, 11)])
    chan.reply = reply
    reply.register()
    try:
        with pytest.raises(socket.timeout):
            reply.get(timeout=0.05)
    finally:
        reply.unregister()
