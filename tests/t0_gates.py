"""Layer 0: the gates, so the house stays as it is: ``ruff check``, ``ruff format --check``
and ``mypy`` (their settings in pyproject.toml) over the whole checkout.  They run first:
a style or type slip is the lowest layer that can break."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO

GATES = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "--no-cache", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
    "mypy": [sys.executable, "-m", "mypy"],
}


@pytest.mark.parametrize("gate", sorted(GATES))
def test_gate(gate):
    p = subprocess.run(GATES[gate], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{gate} failed:\n{p.stdout[-6000:]}{p.stderr[-2000:]}"
