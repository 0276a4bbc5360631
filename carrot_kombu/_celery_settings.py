"""Which of a Celery app's broker settings a manager takes, and how (``from_celery``).

No Celery import at module level: the core package never needs Celery.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from kombu.utils.url import parse_url

from .options import CELERY_SETTINGS
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
    for option, key in CELERY_SETTINGS.items():
        if key.unless_query in query:
            continue  # Celery lets the URL's own query parameter win
        value = conf.get(key.setting)
        if not (value is not None if key.keep_falsy else value):
            continue  # None (or, for most settings, 0): nothing chosen
        if key.take_default or _chosen(conf, key.setting):
            options[option] = key.convert(value)
        elif key.log_default:
            ignored.append(f"{key.setting}={value!r} (Celery's default)")
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
