"""Where and with what the benchmarks ran (the page header)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import amqp
import kombu

import carrot_kombu

from .clients import endpoint, raw


def environment(url: str) -> dict[str, Any]:
    """Machine, versions (the broker's from its own handshake) and the date."""
    ep = endpoint(url)
    with raw(url) as conn:
        props = conn.server_properties or {}
    rabbit = props.get("version", "?")
    product = props.get("product", "broker")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "host": platform.node() or "this machine",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "system": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "carrot_kombu": carrot_kombu.__version__,
        "kombu": kombu.__version__,
        "amqp": amqp.__version__,
        "broker": f"{_text(product)} {_text(rabbit)}",
        "broker_at": f"{ep['hostname']}:{ep['port']}",
        "commit": _commit(),
    }


def _commit() -> str:
    """``abc1234`` (with a note when ``carrot_kombu/`` differs from it), or ``unknown``."""
    root = Path(carrot_kombu.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "carrot_kombu"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head} + uncommitted changes in carrot_kombu/" if dirty else head


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
