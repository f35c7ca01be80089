"""bench/bench_store_size.py runs in its quick mode and prints its table: the store keeps
only a bounded number of batch records while keys flow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from timeouts import timeout

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_store_size.py"


def test_quick_mode_prints_the_store_size_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH)], capture_output=True, text=True, timeout=timeout(300)
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines[1].split()
    assert header[:4] == ["keys", "site", "bytes", "B/key"] and "used" in header
    last = dict(zip(header, lines[-1].split(), strict=True))
    assert int(last["keys"].replace(",", "")) >= 20_000
    assert int(last["batch"].replace(",", "")) <= 4  # decided batches are forgotten
    assert int(last["bytes"].replace(",", "")) > 0
