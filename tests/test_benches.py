"""Every benchmark in bench/ runs in its quick mode and prints its table with measured
figures: a bench that crashes, or that measures nothing (a zero where a rate or a time
should be), fails here. No figure is compared with a speed."""

from __future__ import annotations

import re

import pytest
from bench_quick import BENCH_DIR, run_quick

# For each bench, rows its table must print; the group "figure" of each is a measurement
# (a rate, a time or a count) that must be positive.
EXPECTED_ROWS: dict[str, tuple[str, ...]] = {
    "bench_peer.py": (
        r"^cryptography\s+bootstrap\s+tcp\s+(?P<figure>[\d.]+)\s",  # p50 ms
        r"^cryptography\s+psk\s+sans-io\s+(?P<figure>[\d.]+)\s",  # p50 ms
        # Markdown rows: | part | backend | batch | runs | keys | seconds | keys/s | ...
        r"^\| sans-IO \| cryptography \| 1024 \| \d+ \| [\d,]+ \| [\d.]+ \| (?P<figure>[\d,]+) \|",
        r"^\| sans-IO \| cryptography \| 4096 \| \d+ \| [\d,]+ \| [\d.]+ \| (?P<figure>[\d,]+) \|",
        r"^\| sans-IO \| cryptography \| 4096 \| \d+ \| (?P<figure>[\d,]+) \|",  # keys agreed
        r"^\| daemons over TCP \| cryptography \| 4096 \| \d+ \| (?P<figure>[\d,]+) \|",
        r"^\| daemons over TCP \| cryptography \| 4096 \| \d+ \| [\d,]+ \| [\d.]+ \| "
        r"(?P<figure>[\d,]+) \|",
        r"^\| (?P<figure>[\d.]+) \| [\d.]+% \| \d+ \| `",  # the profile's own seconds
    ),
    "bench_etsi014.py": (
        r"^enc_keys x1\s+1\s+(?P<figure>\d+)\s",  # req/s
        r"^enc_keys x100\s+64\s+(?P<figure>\d+)\s",
        r"^dec_keys x1\s+8\s+(?P<figure>\d+)\s",
        r"^dec_keys x100\s+64\s+(?P<figure>\d+)\s",
        # 1-key enc_keys with few and with many keys held: p50 ms of each
        r"^\s+1\s+(?P<figure>[\d.]+)\s+[\d.]+\s+[\d.]+\s",
        r"^\s+8\s+[\d.]+\s+(?P<figure>[\d.]+)\s+[\d.]+\s",
    ),
    "bench_messages.py": (
        r"^\s*64\s+1\s.*\s(?P<figure>\d+)$",  # messages received
        r"^\s*65536\s+8\s.*\s(?P<figure>\d+)$",
        r"^\s*64 otp\s+1\s.*\s(?P<figure>\d+)$",
        r"^floor \(ETSI Status round trip, same socket\): (?P<figure>\d+) req/s",
    ),
    "bench_driver.py": (
        r"^floor: raw pty bytes\s+\S+ MB/s\s+(?P<figure>[\d,]+)\s",  # keys/s
        r"^SerialDevice keys\s+\S+ MB/s\s+(?P<figure>[\d,]+)\s",
        r"^\(no I/O\) host decode\s+-\s+(?P<figure>[\d,]+)\s",
    ),
    "bench_primitives.py": (
        r"^ML-KEM-768 encapsulate\s+(?P<figure>[\d.]+)\s",  # µs/op
        r"^ML-DSA-65 sign \(256 B\)\s+(?P<figure>[\d.]+)\s",
        r"^X25519 keygen \+ exchange\s+(?P<figure>[\d.]+)\s",
    ),
}


def test_every_bench_is_covered() -> None:
    benches = {path.name for path in BENCH_DIR.glob("bench_*.py")}
    own_tests = {
        "bench_qkd_buffer.py",
        "bench_emulator.py",
        "bench_store_size.py",
        "bench_footprint.py",
        "bench_end_to_end.py",
        "bench_relay.py",
    }  # tests/test_bench_*.py
    assert benches - own_tests == set(EXPECTED_ROWS)


@pytest.mark.parametrize("bench", sorted(EXPECTED_ROWS))
def test_quick_mode_prints_measured_figures(bench: str) -> None:
    stdout = run_quick(bench)
    lines = stdout.splitlines()
    for pattern in EXPECTED_ROWS[bench]:
        figures = [
            float(match["figure"].replace(",", ""))
            for line in lines
            if (match := re.search(pattern, line))
        ]
        assert figures, f"no row matching {pattern!r} in:\n{stdout}"
        assert all(figure > 0 for figure in figures), f"{pattern!r} measured nothing:\n{stdout}"
