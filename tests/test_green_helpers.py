"""carrot_kombu._pyamqp.green in this (unpatched) process: the plain path is unchanged and the green
helpers behave as their docstrings say (the green pools themselves: tests/test_pyamqp_green.py)."""

from __future__ import annotations

import os
import select
import socket
import sys
import types

import pytest

from carrot_kombu._pyamqp import green


def test_a_plain_socket_is_not_green_and_gets_select_poll():
    a, b = socket.socketpair()
    try:
        assert not green.is_green(a)
        polling = green.poller([a.fileno()])
        assert isinstance(polling, type(select.poll()))
        b.send(b"x")
        assert polling.poll(1000) and polling.poll(1000)[0][0] == a.fileno()
    finally:
        a.close()
        b.close()


def test_the_select_poller_waits_like_poll_for_reading_and_writing():
    a, b = socket.socketpair()
    try:
        reading = green.poller([a.fileno()], green=True)
        assert isinstance(reading, green.SelectPoller)
        assert reading.poll(10) == []  # nothing to read: the timeout, in milliseconds
        b.send(b"x")
        assert [fd for fd, _ in reading.poll(1000)] == [a.fileno()]
        writing = green.poller([a.fileno()], write=True, green=True)
        assert [fd for fd, _ in writing.poll(0)] == [a.fileno()]
    finally:
        a.close()
        b.close()


def test_pipes_are_read_and_written_without_a_hub():
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        assert green.write_fd(w, b"abc") == 3
        assert green.read_fd(r, 10) == b"abc"
        with pytest.raises(BlockingIOError):
            green.read_fd(r, 10)  # empty and non-blocking: never a wait
    finally:
        os.close(r)
        os.close(w)


def test_shutdown_and_close_reach_the_c_socket_of_a_wrapper():
    a, b = socket.socketpair()

    class Wrapper:  # as gevent's (its C socket in _sock)
        def __init__(self, sock):
            self._sock = sock

    try:
        green.shutdown_socket(Wrapper(a))
        assert b.recv(1) == b""  # the peer saw the shutdown
        with pytest.raises(OSError):
            green.shutdown_socket(object())  # no C socket under it
        green.close_socket(a)
        assert a.fileno() == -1
    finally:
        a.close()
        b.close()


def test_patched_in_time_passes_here_and_kombu_sleep_is_left_alone():
    green.check_patched_in_time()  # nothing is patched: the locks are the real ones, as _thread's
    assert green.green_kombu_sleep() is False  # kombu's sleep is time.sleep already


def test_kombu_sleep_captured_before_patching_is_rebound(monkeypatch):
    import time

    fake = types.ModuleType("kombu.utils.functional")
    fake.sleep = time.sleep  # the real builtin, as captured before a patcher replaced time.sleep

    def patched_sleep(seconds):
        return None

    monkeypatch.setitem(sys.modules, "kombu.utils.functional", fake)
    monkeypatch.setattr(time, "sleep", patched_sleep)
    assert green.green_kombu_sleep() is True
    assert fake.sleep is patched_sleep
