"""``qkdd demo --sites N``: the network demo as an operator runs it (the command line, real
daemons and emulators), and its refusals of arguments it cannot honour."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from timeouts import timeout

from qkdd.demo_network import NetworkPlan, render_site


def _demo(*args: str, seconds: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qkdd", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout(seconds),
    )


def test_three_sites_in_a_line_give_the_ends_the_same_keys_through_the_relay() -> None:
    proc = _demo("--sites", "3", "--keys", "4", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["all_match"] is True and len(report["keys"]) == 4
    sites = report["sites"]
    assert sites["site-1"]["routes"]["site-3"] == ["site-1", "site-2", "site-3"]
    assert sites["site-1"]["transfers_confirmed"] >= 1
    assert sites["site-2"]["transfers_relayed"] >= 1  # the relay's view: it relayed
    assert sites["site-2"]["transfers_started"] == 0  # and started nothing of its own
    assert sites["site-3"]["transfers_delivered"] >= 1


@pytest.mark.parametrize(
    "args,expected",
    [
        (("--sites", "2"), "3 to 8 sites"),
        (("--sites", "9"), "3 to 8 sites"),
        (("--topology", "ring"), "--topology needs --sites"),
        (("--sites", "3", "--serve"), "--serve runs the two-site demo only"),
        (("--sites", "3", "--keys", "65"), "--keys must be from 1 to 64"),
    ],
)
def test_arguments_it_cannot_honour_are_refused(args: tuple[str, ...], expected: str) -> None:
    proc = _demo(*args, seconds=30)
    assert proc.returncode == 2
    assert expected in proc.stderr


def test_a_ring_puts_the_ends_opposite_with_two_ways_between_them() -> None:
    plan = NetworkPlan(5, "ring")
    assert plan.links == [(1, 2), (2, 3), (3, 4), (4, 5), (1, 5)]
    assert plan.ends == (1, 3)
    ports = {i: 47000 + i for i in range(1, 6)}
    first = render_site(plan, 1, ports)
    assert '[[remote]]\nsite_id = "site-3"' in first
    assert first.count("[[peers]]") == 2  # site-2 and site-5
    relay = render_site(plan, 4, ports)
    assert "[[remote]]" not in relay and "talks_to = []" in relay and "[relay]" in relay
