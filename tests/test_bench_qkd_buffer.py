"""bench/bench_qkd_buffer.py runs in its quick mode and prints its table: every operation
measured with a small and a large buffer. No figure is compared with a speed."""

from __future__ import annotations

import re

from bench_quick import FIGURE, run_quick

ROWS = (
    "ingest, 1024-key delivery",
    "  of which sealing its frame",
    "qkd_key_count",
    "oldest_qkd_run, 4096 keys",
    "master: run + consume",
    "qkd_run, 4096 keys",
    "slave: run + consume",
)


def test_quick_mode_prints_the_buffer_table() -> None:
    stdout = run_quick("bench_qkd_buffer.py", 300)
    lines = stdout.splitlines()
    assert re.search(r"1,000 buffered\s+20,000 buffered\s+ratio$", lines[1]), stdout
    for label in ROWS:
        pattern = rf"^{re.escape(label)}\s+\S+\s+{FIGURE}\s+{FIGURE}\s+{FIGURE}$"
        matches = [m for line in lines if (m := re.match(pattern, line))]
        assert len(matches) == 1, f"no row {label!r} in:\n{stdout}"
        small, big, ratio = (float(g.replace(",", "")) for g in matches[0].groups())
        assert small > 0 and big > 0 and ratio > 0, f"{label!r} measured nothing:\n{stdout}"
