"""bench/bench_end_to_end.py runs in its quick mode and prints its tables: at 53k keys/s,
the floors (the emulator into counting serial drivers, with and without an fdatasync per
delivery), the daemons' ingest and the master's ready keys with their ratios, and the CPU of
every process of each run. A bench that crashes or measures nothing fails here; no figure
is compared with a speed (the machine is shared)."""

from __future__ import annotations

import re

from bench_quick import cells, number, run_quick

RATE = "53,000"


def test_quick_mode_prints_the_end_to_end_tables() -> None:
    stdout = run_quick("bench_end_to_end.py", 600)
    rows = [cells(line) for line in stdout.splitlines() if line.startswith(f"| {RATE} |")]

    rates = [row for row in rows if len(row) == 14]
    assert len(rates) == 1, stdout
    (
        _,
        floor,
        floor_per_delivery,
        synced,
        synced_per_delivery,
        device,
        ingest_master,
        ingest_slave,
        ready,
        ready_per_device,
        ready_per_floor,
        _backlog_master,
        _backlog_slave,
        ready_at_end,
    ) = rates[0]
    measured = [floor, floor_per_delivery, synced, synced_per_delivery, device]
    measured += [ingest_master, ingest_slave, ready, ready_at_end]
    assert all(number(figure) > 0 for figure in measured), stdout
    assert number(ready_per_device) > 0 and number(ready_per_floor) > 0, stdout

    cpu = {(row[1], row[2]): row[3:] for row in rows if len(row) == 6}
    processes = {
        "floor": ("emulator", "counting host site-a", "counting host site-b"),
        "floor + fdatasync": ("emulator", "counting host site-a", "counting host site-b"),
        "daemons": ("emulator", "site-a", "site-b"),
    }
    for kind, names in processes.items():
        for name in names:
            share, per_key, saturated = cpu[(kind, name)]
            assert number(share) > 0 and number(per_key) > 0, stdout
            assert saturated in ("yes", "no"), stdout
        assert (kind, "these three") in cpu and (kind, "other processes") in cpu, stdout
    assert re.search(r"^load [\d.]+ [\d.]+ [\d.]+ at the end", stdout, re.M), stdout
