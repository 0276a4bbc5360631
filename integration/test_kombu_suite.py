"""kombu's own py-amqp integration suite, run over ``carrot+amqp://``.

The suite ships in kombu's sdist (``t/integration/test_py_amqp.py``); it is
downloaded once (pip, into ``build/kombu-sdist``), copied twice into a temp
dir (once as it is, once with ``pyamqp://`` replaced by ``carrot+amqp://``)
and both copies run against the shared broker in this session.  Every test
that passes over plain py-amqp must pass over carrot_kombu (kombu leaves
``transport+scheme://`` URLs unparsed; ``import carrot_kombu`` parses ours into
the connection's fields as kombu does for ``pyamqp://``, so its failover test
passes too).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import kombu
import pytest

from .figures import record

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "build" / "kombu-sdist"

#: Queues the suite leaves behind (it never deletes them); cleared before each run
#: so that both runs start from the same broker state.
LEFTOVER_QUEUES = ("priority_test", "priority_requeue_test")


def _sdist() -> Path:
    version = kombu.__version__
    archive = CACHE / f"kombu-{version}.tar.gz"
    if not archive.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"kombu=={version}", "-d", str(CACHE)],
            check=True, timeout=300,
        )
    return archive


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kombu-suite")
    target = root / "t" / "integration"
    target.mkdir(parents=True)
    (root / "t" / "__init__.py").write_text("")
    prefix = f"kombu-{kombu.__version__}/t/integration/"
    with tarfile.open(_sdist()) as tar:
        for name in ("__init__.py", "common.py", "test_py_amqp.py"):
            member = tar.extractfile(prefix + name)
            assert member is not None, f"{prefix + name} not in kombu's sdist"
            (target / name).write_bytes(member.read())
    original = (target / "test_py_amqp.py").read_text()
    assert "pyamqp://" in original
    (target / "test_carrot_amqp.py").write_text(original.replace("pyamqp://", "carrot+amqp://"))
    (root / "pytest.ini").write_text("[pytest]\npython_classes = test_*\n")
    (root / "conftest.py").write_text("import carrot_kombu  # registers the carrot+amqp:// transport\n")
    return root


def _clear_leftovers() -> None:
    with kombu.Connection("pyamqp://guest:guest@127.0.0.1:5672//") as conn:
        channel = conn.channel()
        for name in LEFTOVER_QUEUES:
            channel.queue_delete(name)
        channel.close()


def _run(suite: Path, test_file: str) -> dict[str, str]:
    """Outcome per test (``passed``/``failed``/``skipped``), from a JUnit report."""
    _clear_leftovers()
    report = suite / f"{test_file}.xml"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run(
        [sys.executable, "-m", "pytest", f"t/integration/{test_file}", "-q", "-p", "no:cacheprovider",
         "-W", "ignore", f"--junitxml={report}"],
        cwd=suite, env=env, timeout=600, capture_output=True,
    )
    outcomes: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            outcomes[name] = "failed"
        elif case.find("skipped") is not None:
            outcomes[name] = "skipped"
        else:
            outcomes[name] = "passed"
    return outcomes


def test_kombu_py_amqp_suite_passes_over_carrot_amqp(suite: Path) -> None:
    plain = _run(suite, "test_py_amqp.py")
    ours = _run(suite, "test_carrot_amqp.py")
    passed_plain = {t for t, o in plain.items() if o == "passed"}
    passed_ours = {t for t, o in ours.items() if o == "passed"}
    record("kombu_suite", tests=len(plain), passed_pyamqp=len(passed_plain), passed_carrot=len(passed_ours),
           failed_carrot=sorted(set(ours) - passed_ours))
    assert len(plain) > 40 and set(plain) == set(ours), "the suite did not run completely"
    regressions = sorted(passed_plain - passed_ours)
    assert not regressions, f"pass over pyamqp:// but fail over carrot+amqp://: {regressions}"
    assert len(passed_ours) >= len(passed_plain)
