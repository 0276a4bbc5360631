"""Issue 17, items 2, 3 and 8 with a real ``celery worker``, next to plain ``amqp://``.

* 2: ``.delay()`` called *inside a task* while the broker refuses fails per
  Celery's publish retry policy, as on ``amqp://`` (it blocked until the broker
  was back: 23 s of a 25 s outage).
* 3: ``rpc://`` results the worker publishes right after a connection blip
  reach the caller (8 of 12 were lost; ``amqp://``: 0 in the issue's run; in
  this harsher one, a cut while the tasks run, it drops some).
* 8: a worker's warm shutdown (SIGTERM) ends cleanly: exit 0, no traceback,
  no "Exception ignored", no ResourceWarning in its log, as on ``amqp://``.
* F1 (red team): a solo worker whose connection is cut while deliveries wait
  in it runs only the task that was running twice (Celery writes its ack
  after the task, on both transports); ``amqp://`` runs up to the waiting
  ones twice as well.

Each runs a worker subprocess (threads pool) through the fault proxy on the
shared broker; the worker, the proxy and the queues are always removed.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

import carrot_kombu  # noqa: F401 - registers carrot+amqp:// in this (producer) process

from .broker import unique
from .celery_apps import AppModule, celery_worker, wait_for
from .test_transport_celery import SharedBroker, proxy_to, shared  # noqa: F401 - the fixture

#: Ours in the default run; plain amqp://, the baseline run the same way, in ``make test-slow``
#: (each is a worker subprocess and a fault proxy: ~20-60 s).
SCHEMES = ["carrot+amqp", pytest.param("amqp", marks=pytest.mark.slow)]

APP = """\
import json
import os
import time

from celery import Celery

MARKS = {marks!r}

app = Celery({name!r})
app.conf.update({config!r})


@app.task(name="echo", shared=False)  # not added to every later app of the test process
def echo(x, sleep=0.0):
    time.sleep(sleep)
    return x


@app.task(name="record", shared=False)
def record(x, sleep=0.0):
    # One line per run (O_APPEND: whole lines), then the work; the test counts runs per task.
    fd = os.open(os.path.join(MARKS, "ran.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, ("%d\\n" % x).encode())
    finally:
        os.close(fd)
    time.sleep(sleep)


@app.task(name="spawn", shared=False)
def spawn(x, wait_for_file):
    # Say it runs, wait (bounded) until the test says the outage has begun, then publish from inside the task.
    open(os.path.join(MARKS, "started-%d" % x), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(wait_for_file) and time.monotonic() < deadline:
        time.sleep(0.01)
    began = time.monotonic()
    try:
        echo.delay(x)
        outcome = "sent"
    except Exception as exc:
        outcome = type(exc).__name__ + ": " + str(exc)[:200]
    with open(os.path.join(MARKS, "spawn-%d" % x), "w") as out:
        json.dump({{"outcome": outcome, "seconds": time.monotonic() - began}}, out)
"""


def write(where: Path, broker_url: str, **config: Any) -> AppModule:
    name = unique("ckw").replace("-", "_")
    queue = unique("ck-worker-q")
    settings = dict(broker_url=broker_url, result_backend="rpc://", task_default_queue=queue,
                    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)
    settings.update(config)
    directory = where / name
    (directory / "marks").mkdir(parents=True)
    (directory / f"{name}.py").write_text(APP.format(name=name, config=settings, marks=str(directory / "marks")))
    return AppModule(directory, name, queue)


@pytest.fixture
def app_module() -> Iterator[Callable[[AppModule], Any]]:
    """Import an app module in this process (the producer side); forgotten again afterwards."""
    imported: list[str] = []

    def load(app: AppModule) -> Any:
        sys.path.insert(0, str(app.dir))
        imported.append(app.name)
        return importlib.import_module(app.name)

    yield load
    for name in imported:
        module = sys.modules.pop(name, None)
        if module is not None:
            # The rpc:// result consumer's connection is not closed by app.close(): its
            # channel would stay leased from the process's shared manager for later tests.
            try:
                module.app.backend.result_consumer.stop()
            except Exception:  # noqa: BLE001 - never started (no .get()), or already gone
                pass
            module.app.close()
    sys.path[:] = [p for p in sys.path if "ckw_" not in p]


def started(worker: Any, module: Any, timeout: float = 60) -> None:
    """The worker consumes: a task's result comes back."""
    assert module.echo.delay("ready").get(timeout=timeout) == "ready", worker.output()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_delay_inside_a_task_during_an_outage_fails_per_the_retry_policy(scheme, tmp_path, shared, amqp_url,
                                                                          app_module):
    with proxy_to(amqp_url) as proxy:
        url = proxy.url().replace("amqp://", f"{scheme}://", 1)
        app = shared.owns(write(tmp_path, url))
        module = app_module(app)
        with celery_worker(app, "threads", 2) as worker:
            started(worker, module)
            go = app.dir / "outage-began"
            module.spawn.delay(1, str(go))
            # The task is running (it waits for the file); then the outage.
            assert wait_for((app.dir / "marks" / "started-1").exists, 30), worker.output()
            proxy.cut()
            proxy.refuse()
            go.write_text("now")
            mark = app.dir / "marks" / "spawn-1"
            assert wait_for(mark.exists, 60), worker.output()
            result = json.loads(mark.read_text())
            proxy.heal()
    print(f"\nFIGURE delay-in-task-{scheme}: {json.dumps(result)}")
    assert result["outcome"] != "sent", result  # the broker refused for the whole call
    # Celery's policy: 3 retries 0-0.2 s apart, each a failed connect: about a second; it blocked 23 s.
    assert result["seconds"] < 6.0, result


@pytest.mark.parametrize("scheme", SCHEMES)
def test_rpc_results_published_right_after_a_blip_reach_the_caller(scheme, tmp_path, shared, amqp_url, app_module):
    """Only the worker goes through the proxy: the caller's reply queue (auto-delete) lives on, so a
    result lost is one the worker's connection dropped after the blip (item 3), not rpc://'s own window."""
    with proxy_to(amqp_url) as proxy:
        url = proxy.url().replace("amqp://", f"{scheme}://", 1)
        app = shared.owns(write(tmp_path, url))
        module = app_module(app)
        module.app.conf.broker_url = amqp_url.replace("amqp://", f"{scheme}://", 1)  # this process: direct
        with celery_worker(app, "threads", 4) as worker:
            started(worker, module)
            lost: list[int] = []
            for cut in range(2):
                # Four tasks running for 0.3 s each; the cut falls while they run,
                # so their results are published right after it.
                results = [module.echo.delay(cut * 10 + i, sleep=0.3) for i in range(4)]
                time.sleep(0.15)
                proxy.cut()
                for i, result in enumerate(results):
                    try:
                        assert result.get(timeout=20) == cut * 10 + i
                    except Exception:  # noqa: BLE001 - counted: a lost result
                        lost.append(cut * 10 + i)
    print(f"\nFIGURE rpc-after-blip-{scheme}: lost={lost}")
    if scheme == "carrot+amqp":
        assert lost == [], (lost, worker.output())
    else:
        # The baseline, run the same way (py-amqp's worker drops some: measured
        # 2-5 of 12 here); what it delivered must be right.
        assert len(lost) < 8, (lost, worker.output())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_workers_warm_shutdown_is_clean(scheme, tmp_path, shared, amqp_url, app_module):
    app = shared.owns(write(tmp_path, amqp_url.replace("amqp://", f"{scheme}://", 1)))
    module = app_module(app)
    with celery_worker(app, "threads", 2) as worker:
        started(worker, module)
        assert [module.echo.delay(i).get(timeout=20) for i in range(5)] == list(range(5))
        worker.proc.send_signal(15)  # SIGTERM: Celery's warm shutdown
        code = worker.proc.wait(30)
        log = worker.output(100_000)
    print(f"\nFIGURE warm-shutdown-{scheme}: exit={code}")
    assert code == 0, log
    for bad in ("Traceback", "Exception ignored", "ResourceWarning", "Unclosed", "ERROR"):
        assert bad not in log, log


def runs(app: AppModule) -> list[int]:
    try:
        return [int(line) for line in (app.dir / "marks" / "ran.log").read_text().split()]
    except OSError:
        return []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_cut_runs_no_waiting_delivery_twice(scheme, tmp_path, shared, amqp_url, app_module):
    """Issue 17 F1: per cut, only the task that was running runs again (``amqp://``: up to all 4).

    A solo worker with a prefetch of 4 gets 4 tasks of 0.5 s; the cut falls
    while the first runs and the other 3 wait in the worker.  Celery acks
    (``acks_late`` off) on its event loop's next turn, i.e. after the task:
    the running task's ack is lost with the connection on any transport, and
    the broker redelivers it.  The 3 waiting ones were run when Celery
    cancelled its consumer after the loss (their acks failed, Celery ran them
    anyway): 4 twice per cut.  py-amqp runs what it read before the cut too
    (measured 6-7 of 12 twice here): at-least-once either way.
    """
    cycles, per_cycle = 3, 4
    with proxy_to(amqp_url) as proxy:
        url = proxy.url().replace("amqp://", f"{scheme}://", 1)
        app = shared.owns(write(tmp_path, url, worker_prefetch_multiplier=per_cycle, task_ignore_result=True,
                                broker_transport_options={"confirm_publish": True}))
        module = app_module(app)
        module.app.conf.broker_url = amqp_url  # this process sends directly (pyamqp)
        module.app.conf.broker_transport_options = {}
        with celery_worker(app, "solo", 1) as worker:
            for cycle in range(cycles):
                first = cycle * per_cycle
                for x in range(first, first + per_cycle):
                    module.record.delay(x, sleep=0.5)
                assert wait_for(lambda: first in runs(app), 60), worker.output()
                time.sleep(0.15)  # the other three are in the worker by now (one round trip)
                assert proxy.cut() >= 1, worker.output()  # amqp:// has a second connection (pidbox)
                # Every task of the cycle ran (the redelivered ones too), then nothing more for a while.
                assert wait_for(lambda: set(range(first + per_cycle)) <= set(runs(app)), 60), worker.output()
                settled = len(runs(app))
                while wait_for(lambda: len(runs(app)) > settled, 1.5):
                    settled = len(runs(app))
    ran = runs(app)
    twice = sorted(x for x in set(ran) if ran.count(x) > 1)
    print(f"\nFIGURE cut-runs-twice-{scheme}: cuts={cycles} tasks={cycles * per_cycle} twice={twice}")
    assert set(ran) == set(range(cycles * per_cycle))
    if scheme == "carrot+amqp":
        # At most the task running at each cut (measured: exactly those); before the fix 3 more per cut.
        assert len(ran) - len(set(ran)) <= cycles, (ran, worker.output(20_000))
    else:
        # The baseline, run the same way: py-amqp runs what it had read before the cut as well
        # (measured: 7 and 6 of 12 twice, 4 in one cut); its figure is printed above, nothing to assert.
        assert len(ran) - len(set(ran)) <= cycles * per_cycle, (ran, worker.output(20_000))
