"""bench/bench_qkd_buffer.py runs in its quick mode and prints its table: every operation
measured with a small and a large buffer. No figure is compared with a speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from timeouts import timeout

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_qkd_buffer.py"
ROWS = (
    "ingest, 1024-key delivery",
    "  of which sealing its frame",
    "qkd_key_count",
    "oldest_qkd_run, 4096 keys",
    "master: run + consume",
    "qkd_run, 4096 keys",
    "slave: run + consume",
)
FIGURE = r"([\d,]+(?:\.\d+)?)"


def test_quick_mode_prints_the_buffer_table() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        capture_output=True,
        text=True,
        timeout=timeout(300),
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.search(r"1,000 buffered\s+20,000 buffered\s+ratio$", lines[1]), done.stdout
    for label in ROWS:
        pattern = rf"^{re.escape(label)}\s+\S+\s+{FIGURE}\s+{FIGURE}\s+{FIGURE}$"
        matches = [m for line in lines if (m := re.match(pattern, line))]
        assert len(matches) == 1, f"no row {label!r} in:\n{done.stdout}"
        small, big, ratio = (float(g.replace(",", "")) for g in matches[0].groups())
        assert small > 0 and big > 0 and ratio > 0, f"{label!r} measured nothing:\n{done.stdout}"
