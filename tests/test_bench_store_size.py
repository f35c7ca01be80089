"""bench/bench_store_size.py runs in its quick mode and prints its table: the store keeps
only a bounded number of batch records while keys flow."""

from __future__ import annotations

from bench_quick import run_quick


def test_quick_mode_prints_the_store_size_table() -> None:
    stdout = run_quick("bench_store_size.py", 300, quick=False)
    lines = stdout.splitlines()
    header = lines[1].split()
    assert header[:4] == ["keys", "site", "bytes", "B/key"] and "used" in header
    last = dict(zip(header, lines[-1].split(), strict=True))
    assert int(last["keys"].replace(",", "")) >= 20_000
    assert int(last["batch"].replace(",", "")) <= 4  # decided batches are forgotten
    assert int(last["bytes"].replace(",", "")) > 0
