"""bench/bench_relay.py runs in its quick mode and prints its tables: on a line of 3 sites,
the direct link's key rate (the floor) and the relayed one with their ratios, the QKD
material each hop spent per relayed and per end-to-end key, and on a ring of 4 how long
the network took to route around a SIGKILLed relay. A bench that crashes, or measures
nothing (a zero where a rate, a count or a time should be), fails here; no figure is
compared with a speed (the machine is shared)."""

from __future__ import annotations

import re

from bench_quick import cells, number, run_quick


def test_quick_mode_prints_the_relay_tables() -> None:
    stdout = run_quick("bench_relay.py", 600)
    rows = [cells(line) for line in stdout.splitlines() if line.startswith("| ")]

    rates = [row for row in rows if row[:2] == ["3", "1"]]
    assert len(rates) == 1 and len(rates[0]) == 13, stdout
    _, _, floor, link, relayed, per_floor, received, bound, per_bound, checked = rates[0][:10]
    for figure in (floor, link, relayed, per_floor, received, bound, per_bound, checked):
        assert number(figure) > 0, stdout
    busiest, busiest_cpu, all_cpu = rates[0][10:]
    assert re.fullmatch(r"site-\d|link \d-\d", busiest), stdout
    assert number(busiest_cpu) > 0 and number(all_cpu) >= number(busiest_cpu), stdout

    material = {row[1]: row[3:] for row in rows if row[0] == "3" and len(row) == 10}
    assert set(material) == {"direct", "hop 0", "hop 1"}, stdout
    assert number(material["direct"][5]) > 0, stdout  # QKD keys per key, devices
    for hop in ("hop 0", "hop 1"):
        transfers, counted, devices, used, per_key, per_key_devices, expected = material[hop]
        assert number(transfers) > 0, stdout
        # Each hop spends at least a relayed byte's worth of QKD per relayed byte.
        assert number(counted) >= 1 and number(expected) >= 1, stdout
        for figure in (devices, used, per_key, per_key_devices):
            assert number(figure) > 0, stdout

    changes = [row for row in rows if row[0] in ("1", "median") and len(row) == 8]
    assert [row[0] for row in changes] == ["1", "median"], stdout
    for _, victim, before, after, route, confirmed, again, checked in changes[:1]:
        before_path, after_path = before.split(" > "), after.split(" > ")
        assert victim in before_path and victim not in after_path, stdout
        assert before_path[::2] == after_path[::2] == ["site-1", "site-3"], stdout
        for figure in (route, confirmed, again, checked):
            assert number(figure) > 0, stdout
    assert re.search(r"^load [\d.]+ [\d.]+ [\d.]+ at the end", stdout, re.M), stdout
