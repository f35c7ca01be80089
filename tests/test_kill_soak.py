"""Soaks (``slow``): SIGKILL either daemon or the QKD link emulator again and again while an
application takes keys as fast as they come, and measure the longest time without a key
after each restart. A link whose two QKD buffers fell out of step and never lined up
again (the emulator restarted while a daemon was down) shows here as a gap of minutes or
hours; one that recovers by itself stays within seconds. The bound only catches a stuck
link: it is not a speed requirement.

The emulator and both daemons are real processes (``qkdd.demo``), as in the crash-safety
test; the emulator is killed with SIGKILL too, so its key buffers are lost and its pty
links are left behind for the next emulator to replace."""

from __future__ import annotations

import contextlib
import random
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon_process import stop_all
from timeouts import timeout

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.demo import RunningSite, prepare_directory, start_emulator
from qkdd.demo_sites import SITE_B, SITES

# A link stuck for longer than this is stuck: a restart normally costs about a second,
# an emulator restart a few (device reconnect backoff, the first BB84 block).
STUCK = 120.0
KEYS_BETWEEN_KILLS = 8
# Keys taken after a restart before its gap is measured: more than two full QKD buffers
# (4096 each), so keys from the runs the restart left in either buffer come up too.
KEYS_AFTER = 10_000


@dataclass
class Link:
    """The emulated QKD link and both site daemons in one directory; any can be killed."""

    directory: Path
    sites: list[RunningSite] = field(default_factory=list)
    emulator: subprocess.Popen[bytes] | None = None

    def restart_emulator(self) -> None:
        assert self.emulator is not None
        self.emulator.send_signal(signal.SIGKILL)
        self.emulator.wait(timeout=timeout(20))
        self.emulator = start_emulator(self.directory)


@contextlib.contextmanager
def running_link(directory: Path) -> Iterator[Link]:
    configs = prepare_directory(directory)
    link = Link(directory)
    try:
        link.emulator = start_emulator(directory)
        link.sites = [RunningSite.start(site, configs[site.site_id]) for site in SITES]
        yield link
    finally:
        processes = [s.process for s in link.sites] + ([link.emulator] if link.emulator else [])
        stop_all(processes)


def describe(link: Link) -> str:
    """What each site says about its link, and the tail of its log: for a stuck link."""
    lines = []
    for site in link.sites:
        peer = "site-b" if site.site.site_id == "site-a" else "site-a"
        try:
            with BlockingKeyClient(str(site.socket_path), timeout=timeout(5)) as client:
                status = client.site_status()["peers"][peer]
            lines.append(
                f"{site.site.site_id}: session {status['session']}, device "
                f"{status['device']['state']} ({status['device']['detail']}), "
                f"{status['qkd_keys_buffered']} QKD keys buffered, "
                f"unavailable: {status['keys_unavailable_because']}"
            )
        except (ClientError, OSError, KeyError) as exc:
            lines.append(f"{site.site.site_id}: no status ({exc})")
        tail = site.log_file.read_text(errors="replace").splitlines()[-25:]
        lines += [f"  {line[:300]}" for line in tail]
    return "\n".join(lines)


class KeyTaker:
    """An application at A taking keys as fast as they come; remembers when each came."""

    def __init__(self, site: RunningSite) -> None:
        self.site = site
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with BlockingKeyClient(str(self.site.socket_path), timeout=timeout(5)) as app:
                    while not self.stop.is_set():
                        got = app.enc_keys(SITE_B.sae_id, number=8)
                        self.times += [time.monotonic()] * len(got)
                        time.sleep(0.002)  # a busy application, not a CPU hog
            except ClientError:
                time.sleep(0.02)  # down, or the pool is empty: try again

    def longest_gap_after(self, moment: float, limit: float) -> float | None:
        """The longest time without a key from ``moment`` until ``KEYS_AFTER`` more keys
        came; None if they did not come within ``limit`` of the last key."""
        called = time.monotonic()
        while True:
            times = list(self.times)
            before = [t for t in times[-KEYS_AFTER * 2 :] if t <= moment][-1:] or [moment]
            after = [t for t in times[-KEYS_AFTER * 2 :] if t > moment]
            if len(after) >= KEYS_AFTER:
                series = before + after[:KEYS_AFTER]
                return max(b - a for a, b in zip(series, series[1:], strict=False))
            last = max((before + after)[-1], called)
            if time.monotonic() > last + limit:
                return None  # stuck
            time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("kills", [60])
def test_no_restart_leaves_the_link_without_keys_for_long(tmp_path, kills):
    rng = random.Random(7)
    gaps: list[tuple[str, float]] = []
    with running_link(tmp_path) as link:
        site_a, site_b = link.sites
        taker = KeyTaker(site_a)
        taker.thread.start()
        try:
            assert taker.longest_gap_after(0.0, timeout(60)) is not None, "no first keys"
            for kill in range(kills):
                target = len(taker.times) + KEYS_BETWEEN_KILLS
                deadline = time.monotonic() + timeout(STUCK)
                while len(taker.times) < target:
                    if time.monotonic() >= deadline:  # only a hang gets here
                        raise AssertionError(f"no traffic before kill {kill}")
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.5))
                victim = rng.choice(["site-a", "site-b", "emulator"])
                moment = time.monotonic()
                if victim == "emulator":
                    link.restart_emulator()
                else:
                    (site_a if victim == "site-a" else site_b).restart(kill=True)
                gap = taker.longest_gap_after(moment, timeout(STUCK))
                assert gap is not None, (
                    f"no key for {STUCK:g} s after killing {victim} (kill {kill}); "
                    f"gaps so far: {gaps}\n{describe(link)}"
                )
                gaps.append((victim, gap))
        finally:
            taker.stop.set()
            taker.thread.join(timeout(30))
    worst = max(gaps, key=lambda g: g[1])
    print(
        f"\n{kills} kills: gap after restart median {statistics.median(g for _, g in gaps):.2f} s,"
        f" longest {worst[1]:.2f} s (after killing {worst[0]}); per victim: "
        + ", ".join(
            f"{v} max {max(g for w, g in gaps if w == v):.2f} s"
            for v in sorted({v for v, _ in gaps})
        )
    )


@pytest.mark.slow
def test_emulator_restarts_while_both_daemons_run(tmp_path):
    """The reproduction of the stuck link: restart the QKD device a few times in quick
    succession while both daemons run. Each daemon's driver reconnects after its own
    backoff, so one may store keys of a new device run that the other never gets before
    the next restart: both buffers end up with runs the other lacks."""
    rng = random.Random(3)
    recoveries: list[float] = []
    with running_link(tmp_path) as link:
        taker = KeyTaker(link.sites[0])
        taker.thread.start()
        try:
            assert taker.longest_gap_after(0.0, timeout(60)) is not None, "no first keys"
            for burst in range(4):
                for _ in range(3):
                    time.sleep(rng.uniform(0.3, 2.5))
                    link.restart_emulator()
                moment = time.monotonic()
                gap = taker.longest_gap_after(moment, timeout(STUCK))
                assert gap is not None, (
                    f"no keys for {STUCK:g} s after burst {burst}\n{describe(link)}"
                )
                recoveries.append(gap)
        finally:
            taker.stop.set()
            taker.thread.join(timeout(30))
    print(
        "\nafter each burst of emulator restarts, longest time without a key: "
        + ", ".join(f"{g:.2f}" for g in recoveries)
        + " s"
    )
