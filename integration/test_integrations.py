"""Fork safety and kombu/Celery compatibility on the real broker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import kombu
from kombu.simple import SimpleQueue

from .broker import connection_pids, drain, unique


def test_fork_child_gets_its_own_connection_and_the_parent_keeps_working(rabbit):
    manager, events, _ = rabbit(client_properties={})  # default connection_name carries the pid
    assert manager.wait_connected(10)
    queue = unique("ck-fork")
    with manager.channel() as lease:
        lease.queue_declare(queue, auto_delete=False)
        lease.basic_publish(lease.prepare_message(b"parent-before"), routing_key=queue)
    held = manager.open_channel()  # a lease the child inherits: it must not use the parent's socket
    parent_pid = os.getpid()
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+: fork with threads
        pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(read)
            try:
                held.basic_publish(held.prepare_message(b"via-parent-socket"), routing_key=queue)
                verdict = "inherited lease worked: it wrote to the parent's socket"
            except Exception as exc:
                verdict = f"inherited lease refused: {type(exc).__name__}"
            if manager.wait_connected(10):
                with manager.channel() as lease:
                    lease.basic_publish(lease.prepare_message(b"child"), routing_key=queue)
                names = {n for n in (f"carrot_kombu pid={parent_pid}", f"carrot_kombu pid={os.getpid()}")
                         if connection_pids(n)}
                os.write(write, json.dumps({"verdict": verdict, "names": sorted(names)}).encode())
                code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    report = json.loads(os.read(read, 65536) or b"{}")
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0, report
    assert report["verdict"] == "inherited lease refused: Disconnected"
    assert len(report["names"]) == 2  # the broker saw two connections: parent and child
    # the parent never noticed
    held.basic_publish(held.prepare_message(b"parent-after"), routing_key=queue)
    held.release()
    assert events.count("disconnected") == 0
    with manager.channel() as lease:
        bodies = drain(lease, queue, 3)
        lease.queue_delete(queue)
    assert sorted(bodies) == [b"child", b"parent-after", b"parent-before"]


def test_kombu_producer_consumer_queue_and_simple_queue(rabbit):
    manager, events, _ = rabbit()
    assert manager.wait_connected(10)
    exchange = kombu.Exchange(unique("ck-kx"), type="topic", auto_delete=True)
    queue = kombu.Queue(unique("ck-kq"), exchange, routing_key="a.*", auto_delete=True)
    got = []
    with manager.channel() as lease:
        queue(lease).declare()
        with kombu.Consumer(lease, queues=[queue], callbacks=[lambda body, msg: (got.append(body), msg.ack())]):
            kombu.Producer(lease, exchange=exchange).publish({"k": 1}, routing_key="a.b")
            deadline = time.monotonic() + 10
            while not got and time.monotonic() < deadline:
                try:
                    manager.drain_events(timeout=1)
                except socket.timeout:
                    pass
    assert got == [{"k": 1}]
    name = unique("ck-simple")
    with manager.channel() as lease:
        simple = SimpleQueue(lease, name, queue_opts={"auto_delete": True})
        simple.put({"s": 1})
        assert simple.get(timeout=5).payload == {"s": 1}
        simple.close()


def test_celery_prefork_worker_runs_one_manager_per_child(rabbit, amqp_url):
    """A real `celery worker --pool=prefork`: each child publishes through its own manager."""
    from examples.celery_app import app, report_pid

    queue = unique("ck-celery")
    env = dict(os.environ, CELERY_BROKER_URL=amqp_url, PYTHONPATH=os.getcwd())
    celery_bin = os.path.join(os.path.dirname(sys.executable), "celery")
    task_queue = unique("ck-celery-tasks")
    worker = subprocess.Popen(
        [celery_bin, "-A", "examples.celery_app", "worker", "--pool=prefork", "-c", "2", "-Q", task_queue,
         "-n", f"{task_queue}@%h",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel=WARNING"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    manager, _, _ = rabbit()
    try:
        app.conf.broker_url = amqp_url
        for _ in range(4):
            report_pid.apply_async(args=(queue,), queue=task_queue)
        assert manager.wait_connected(10)
        with manager.channel() as lease:
            lease.queue_declare(queue, auto_delete=False)
            pids = {int(body) for body in drain(lease, queue, 4, timeout=60)}
            lease.queue_delete(queue)
        assert pids and os.getpid() not in pids and worker.pid not in pids  # children did the work
        assert all(len(connection_pids(f"carrot_kombu pid={p}")) == 1 for p in pids)  # one per child
    finally:
        app.pool.force_close_all()
        worker.send_signal(signal.SIGTERM)
        try:
            output, _ = worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            output, _ = worker.communicate()
    assert worker.returncode == 0, output[-3000:]
    deadline = time.monotonic() + 15
    while any(connection_pids(f"carrot_kombu pid={p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(connection_pids(f"carrot_kombu pid={p}") for p in pids)  # stopped at shutdown


def test_kombu_retry_paths_never_open_an_unsupervised_connection(rabbit, amqp_url):
    """Producer.publish(retry=True) works on a live lease and fails fast on a stale one."""
    from urllib.parse import urlparse

    from carrot_kombu import Disconnected

    from .proxy import FaultProxy

    parsed = urlparse(amqp_url)
    with FaultProxy(parsed.hostname or "127.0.0.1", parsed.port or 5672) as proxy:
        manager, events, _ = rabbit(proxy.url())
        assert manager.wait_connected(10)
        queue = unique("ck-retry")
        lease = manager.open_channel()
        lease.queue_declare(queue, auto_delete=True)
        kombu.Producer(lease).publish(b"ok", routing_key=queue, retry=True)
        proxy.cut()
        assert events.wait_count("disconnected", 1, timeout=10)
        started = time.monotonic()
        try:
            kombu.Producer(lease).publish(b"stale", routing_key=queue, retry=True)
            raise AssertionError("a stale lease published")
        except Disconnected:
            pass
        assert time.monotonic() - started < 1
        assert proxy.accepted <= 2  # ours and the manager's own reconnect: kombu opened none
        lease.release()
