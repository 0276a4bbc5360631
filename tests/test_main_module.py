"""``python -m carrot_kombu`` is the ``carrot-kombu`` command."""

from __future__ import annotations

import runpy

import pytest


def test_python_dash_m_runs_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["python -m carrot_kombu", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("carrot_kombu", run_name="__main__", alter_sys=True)
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "check" in out and "demo" in out
