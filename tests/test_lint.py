"""The code as its linter and type checker read it: ruff and mypy, configured in pyproject.toml, find nothing.

They run in the test command (tests/run.sh runs them first, for a quick answer) and here, so that
`pytest -m "not stack"` checks them too.
"""
from __future__ import annotations

import subprocess
import sys

from harness import ROOT


def test_ruff_finds_nothing() -> None:
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "poltergust", "tests", "benchmarks"],
                           capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert found.returncode == 0, found.stdout[-4000:] + found.stderr[-2000:]


def test_mypy_finds_nothing() -> None:
    found = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert found.returncode == 0, found.stdout[-4000:] + found.stderr[-2000:]
