"""Which of a Celery app's broker settings a manager takes, and how (``from_celery``).

No Celery import at module level: the core package never needs Celery.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from kombu.utils.url import parse_url

from .retry import Backoff
from .urls import split_urls, strip_transport_prefix

__all__ = ("celery_options",)

logger = logging.getLogger("carrot_kombu")


def celery_options(app: Any, url: Optional[str] = None) -> tuple[Any, dict[str, Any]]:
    """The kombu connection to take hosts and credentials from, and manager options.

    See :meth:`ConnectionManager.from_celery` for the precedence rules.
    """
    conf = app.conf
    connection = app.connection_for_write(url) if url else app.connection_for_write()
    query = _query(url or conf.get("broker_write_url") or conf.get("broker_url") or "")
    options: dict[str, Any] = {}
    ignored: list[str] = []
    if "heartbeat" not in query:
        if _chosen(conf, "broker_heartbeat"):
            if conf.get("broker_heartbeat") is not None:
                options["heartbeat"] = conf.get("broker_heartbeat")
        else:
            ignored.append(f"broker_heartbeat={conf.get('broker_heartbeat')!r} (Celery's default)")
    if "connect_timeout" not in query and conf.get("broker_connection_timeout"):
        options["connection_timeout"] = float(conf.get("broker_connection_timeout"))
    if _chosen(conf, "broker_pool_limit") and conf.get("broker_pool_limit"):
        options["pool_limit"] = int(conf.get("broker_pool_limit"))
    retries = conf.get("broker_connection_max_retries")
    if _chosen(conf, "broker_connection_max_retries"):
        if retries:
            options["backoff"] = Backoff(max_tries=int(retries))
    elif retries:
        ignored.append(f"broker_connection_max_retries={retries!r} (Celery's default)")
    if ignored:
        logger.info(
            "carrot_kombu.from_celery: not taking %s; carrot_kombu's defaults apply (heartbeat 10 s, "
            "retry for ever); set them in the app's configuration to choose",
            ", ".join(ignored),
        )
    return connection, options


def _chosen(conf: Any, key: str) -> bool:
    """Whether the application set ``key`` (as opposed to Celery's default value)."""
    try:
        from celery.app.defaults import DEFAULTS
    except ImportError:  # pragma: no cover - from_celery needs Celery anyway
        return True
    changes = getattr(conf, "changes", {}) or {}
    return key in changes or conf.get(key) != DEFAULTS.get(key)


def _query(url: str) -> dict[str, Any]:
    urls = split_urls(strip_transport_prefix(url))
    first = urls[0] if urls else ""
    if "://" not in first:
        return {}
    try:
        parsed = parse_url(first)
    except Exception:
        return {}
    return {k: v for k, v in parsed.items() if k in ("heartbeat", "connect_timeout")}
