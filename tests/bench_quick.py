"""Runs a bench from bench/ in its quick mode, as the bench tests do, and reads the
figures of its tables. A bench that exits with an error fails the calling test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from timeouts import timeout

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"

# One printed figure: digits with thousands separators, maybe a fraction.
FIGURE = r"([\d,]+(?:\.\d+)?)"


def run_quick(bench: str, seconds: float = 300, *, quick: bool = True) -> str:
    """The standard output of ``bench`` (a file name in bench/) run with ``--quick``;
    ``seconds`` only catches a hang and is scaled like every test timeout."""
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / bench), *(["--quick"] if quick else [])],
        capture_output=True,
        text=True,
        timeout=timeout(seconds),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def cells(line: str) -> list[str]:
    """The cells of one markdown table row."""
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def number(text: str) -> float:
    """A printed figure as a number."""
    return float(text.replace(",", ""))
