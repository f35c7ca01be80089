"""The code stays ruff-clean and type-checks with mypy (both as configured in pyproject)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from timeouts import timeout

REPO = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout(300))


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install '.[test]')")
    result = run(sys.executable, "-m", "ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy", reason="mypy is not installed (pip install '.[test]')")
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr
