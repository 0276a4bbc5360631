"""Smoke run of the benchmarks: ``python -m benchmarks --quick`` on the real broker.

Benchmarks are not tests: nothing here checks a timing or a goal.  It checks
that the benchmarks still run against the broker, print every row, and leave
``docs/benchmarks.rst`` alone in quick mode.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

from benchmarks import ROW_KEYS

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.rst"


def _page() -> Optional[bytes]:
    return PAGE.read_bytes() if PAGE.exists() else None


def test_quick_benchmarks_print_every_row(amqp_url: str) -> None:
    before = _page()
    # The timeout only guards against a hang; the run normally takes ~25 s (it starts
    # no private node: the failover row and the broker-restart recovery say "skipped").
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--url", amqp_url],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    output = f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, output
    lines = result.stdout.splitlines()
    for key in ROW_KEYS:
        printed = [line[len(key) + 3:].strip() for line in lines if line.startswith(f"[{key}] ")]
        assert printed, f"row {key!r} printed nothing\n{output}"
        assert all(printed), f"row {key!r} printed an empty line\n{output}"
        assert not any(": failed: " in text for text in printed), f"row {key!r} failed\n{output}"
    assert _page() == before, "--quick must not write docs/benchmarks.rst"
