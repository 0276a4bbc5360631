"""One :class:`~carrot_kombu.ConnectionManager` per Celery worker process.

Optional: needs the ``celery`` extra (``pip install carrot_kombu[celery]``).
The core package never imports this module.

.. code-block:: python

    from celery import Celery
    from carrot_kombu.celery import install, manager_for

    app = Celery("proj", broker="amqp://guest:guest@localhost//")
    install(app)                        # one started manager per worker process

    @app.task
    def notify(payload):
        with manager_for(app).channel() as lease:
            lease.basic_publish(lease.prepare_message(payload), routing_key="events")

The manager is built with :meth:`ConnectionManager.from_celery` from the app's
broker settings.  It starts when the worker starts (in every prefork child,
``worker_process_init``; in the main process for the solo/threads pools,
``worker_init``) and stops at shutdown.  Used outside a worker (a web process
that shares the app), :func:`manager_for` starts it on first use.  A forked
child never reuses its parent's connection (see the fork-safety docs).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from celery import signals

from .manager import ConnectionManager, _is_carrot_transport

__all__ = ("install", "manager_for", "uninstall")

_lock = threading.Lock()
_installed: dict[int, "_Installation"] = {}


class _Installation:
    def __init__(self, app: Any, options: dict[str, Any]) -> None:
        self.app = app
        connection = app.connection_for_write()
        if not options and _is_carrot_transport(connection.transport_cls):
            # broker_url = "carrot+amqp://...": share the manager that carries
            # Celery's own connections in this process (one AMQP connection).
            from .transport import manager_for_connection

            self.manager = manager_for_connection(connection)
        else:
            self.manager = ConnectionManager.from_celery(app, **options)

    # signal receivers (Celery passes keyword arguments)

    def on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", self.app) is not self.app:
            return
        pool = getattr(sender, "pool_cls", None)
        name = f"{getattr(pool, '__module__', '')}.{getattr(pool, '__name__', pool)}"
        if "prefork" not in name:  # prefork: the children connect, not the parent
            self.manager.start()

    def on_process_init(self, **_: Any) -> None:
        self.manager.start()

    def on_shutdown(self, **_: Any) -> None:
        self.manager.stop(timeout=10)


def install(app: Any, **options: Any) -> ConnectionManager:
    """Give each worker process of ``app`` its own started manager.

    Args:
        app: The Celery application.
        **options: Overrides for :meth:`ConnectionManager.from_celery`.

    Returns:
        The manager (not started yet in the calling process).
    """
    with _lock:
        existing = _installed.get(id(app))
        if existing is not None:
            return existing.manager
        inst = _installed[id(app)] = _Installation(app, options)
    signals.worker_init.connect(inst.on_worker_init, weak=False)
    signals.worker_process_init.connect(inst.on_process_init, weak=False)
    signals.worker_process_shutdown.connect(inst.on_shutdown, weak=False)
    signals.worker_shutdown.connect(inst.on_shutdown, weak=False)
    return inst.manager


def manager_for(app: Any) -> ConnectionManager:
    """The manager of ``app`` in this process, started if it was not.

    Raises:
        RuntimeError: If :func:`install` was not called for ``app``.
    """
    inst: Optional[_Installation] = _installed.get(id(app))
    if inst is None:
        raise RuntimeError("carrot_kombu.celery.install(app) was not called for this app")
    return inst.manager.start()


def uninstall(app: Any) -> None:
    """Disconnect the signals and stop the manager (tests, reconfiguration)."""
    with _lock:
        inst = _installed.pop(id(app), None)
    if inst is None:
        return
    signals.worker_init.disconnect(inst.on_worker_init)
    signals.worker_process_init.disconnect(inst.on_process_init)
    signals.worker_process_shutdown.disconnect(inst.on_shutdown)
    signals.worker_shutdown.disconnect(inst.on_shutdown)
    inst.manager.stop(timeout=10)


def _command() -> Any:
    """``celery carrot-kombu``: check the app's broker through carrot_kombu.

    Registered as a ``celery.commands`` entry point, so the ``celery`` command
    imports carrot_kombu at start: ``broker_url = "carrot+amqp://..."`` then
    works in ``celery worker`` even if the app module never imports it.
    """
    import click

    @click.command("carrot-kombu", help="Connect once to the app's broker through carrot_kombu and report.")
    @click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait.")
    @click.option("--json", "as_json", is_flag=True, help="One JSON object.")
    @click.pass_context
    def carrot_kombu(ctx: Any, timeout: float, as_json: bool) -> None:
        from .cli import check

        from .transport import _urls

        app = ctx.obj.app
        # The app's own connection settings, as its producers get them:
        # broker_user / broker_password / broker_vhost fill what the URL
        # leaves out, and broker_use_ssl applies.
        connection = app.connection_for_write()
        try:
            url = ";".join(_urls(connection))
            ssl = connection.ssl
        finally:
            connection.release()
        ssl_options = (dict(ssl) if isinstance(ssl, dict) else True) if ssl else None
        ctx.exit(check(url, timeout, as_json, ssl_options=ssl_options))

    return carrot_kombu


carrot_kombu_command = _command()
