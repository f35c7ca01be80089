"""Both site daemons dial: the emulator and both daemons as real subprocesses over real TCP
(``qkdd.demo``), keys fetched through the real Unix sockets.

- Both daemons started together, in either order, round after round (the same stores, so
  the first round bootstraps and later ones use the PSK chain): each round ends with
  exactly one session per link at each site (one ``session_established``, the same
  session at both ends, as the status counts it too) and keys made in that round,
  delivered by enc_keys at one site and dec_keys at the other, both ways.
- The master cannot reach the slave (its configured address for the slave goes nowhere,
  as behind a NAT): the link comes up from the slave's dial; the slave restarted while
  the master is down brings it back when the master returns, and so does a restarted
  master.
- The slave restarts while the master's session looks alive (the master dialled it through
  a proxy that went silent, so the slave's close never reaches it): the slave's new dial
  waits at the master and is taken up once the master declares the old session dead; it
  is not refused and dialled again."""

from __future__ import annotations

import contextlib
import random
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from daemon_process import stop_all
from mitm_proxy import MitmProxy, point_a_at, set_peer_address, unused_port
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.demo import RunningSite, prepare_directory, start_emulator, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B, SITES

ESTABLISHED = re.compile(
    r"event=session_established peer=(\S+) role=(\w+) auth=(\S+) dialled_by=(\S+)"
)


@dataclass
class Link:
    directory: Path
    configs: dict[str, Path]
    emulator: subprocess.Popen[bytes]
    sites: dict[str, RunningSite] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)  # log offsets where a phase began

    @property
    def a(self) -> RunningSite:
        return self.sites[SITE_A.site_id]

    @property
    def b(self) -> RunningSite:
        return self.sites[SITE_B.site_id]

    def start(self, site_id: str) -> None:
        site = next(s for s in SITES if s.site_id == site_id)
        if site_id in self.sites:
            self.sites[site_id].spawn()
        else:
            self.sites[site_id] = RunningSite.start(site, self.configs[site_id])

    def stop(self, site_id: str, sig: signal.Signals = signal.SIGTERM) -> None:
        process = self.sites[site_id].process
        process.send_signal(sig)
        assert process.wait(timeout=timeout(30)) == (0 if sig == signal.SIGTERM else -sig)

    def mark(self) -> None:
        """Logs from here on are the next phase's (``since``)."""
        for site_id, site in self.sites.items():
            self.marks[site_id] = site.log_file.stat().st_size if site.log_file.exists() else 0

    def since(self, site_id: str) -> str:
        data = self.sites[site_id].log_file.read_bytes()
        return data[self.marks.get(site_id, 0) :].decode(errors="replace")


@contextlib.contextmanager
def running_link(directory: Path, tamper: Callable[[Path], object] | None = None) -> Iterator[Link]:
    """The emulator runs; the daemons start when the test says (``Link.start``)."""
    configs = prepare_directory(directory)
    if tamper is not None:
        tamper(directory)
    link = Link(directory, configs, start_emulator(directory))
    try:
        yield link
    finally:
        processes = [s.process for s in link.sites.values()] + [link.emulator]
        stop_all(processes)


def peer_status(site: RunningSite) -> dict[str, object] | None:
    peer = SITE_B.site_id if site.site.site_id == SITE_A.site_id else SITE_A.site_id
    try:
        with BlockingKeyClient(str(site.socket_path), timeout=timeout(5)) as client:
            status: dict[str, object] = client.site_status()["peers"][peer]
        return status
    except (ClientError, OSError):
        return None


def session_up(link: Link) -> bool:
    return all((peer_status(site) or {}).get("session") == "up" for site in link.sites.values())


def describe(link: Link) -> str:
    lines = []
    for site_id, site in link.sites.items():
        lines.append(f"{site_id}: {peer_status(site)}")
        lines += [f"  {line[:240]}" for line in link.since(site_id).splitlines()[-30:]]
    return "\n".join(lines)


def drain_and_refill(link: Link) -> None:
    """Both ways: hand out every key a site holds for the other (each is delivered at the
    other site with the same material), then wait for new keys (made by this session) and
    check those too."""
    for sender, receiver in ((link.a, link.b), (link.b, link.a)):
        to_sae, from_sae = receiver.site.sae_id, sender.site.sae_id
        for _ in range(2):
            with BlockingKeyClient(str(sender.socket_path), timeout=timeout(20)) as app:
                ready = int(app.status(to_sae)["stored_key_count"])
                sent = app.enc_keys(to_sae, number=min(ready, 64)) if ready else []
            if sent:
                with BlockingKeyClient(str(receiver.socket_path), timeout=timeout(20)) as app:
                    got = app.dec_keys(from_sae, [k.key_id for k in sent])
                assert [k.material for k in got] == [k.material for k in sent]
            if not sent:
                break
        wait_for_keys(sender, to_sae, 4, timeout=timeout(60))
        with BlockingKeyClient(str(sender.socket_path), timeout=timeout(20)) as app:
            sent = app.enc_keys(to_sae, number=4)
        with BlockingKeyClient(str(receiver.socket_path), timeout=timeout(20)) as app:
            got = app.dec_keys(from_sae, [k.key_id for k in sent])
        assert [k.material for k in got] == [k.material for k in sent]


def one_session_each(link: Link) -> str:
    """Exactly one session was taken up at each site since the mark, the same at both
    ends; returns who dialled it."""
    found = {site_id: ESTABLISHED.findall(link.since(site_id)) for site_id in link.sites}
    assert all(len(lines) == 1 for lines in found.values()), describe(link)
    (dialled_by,) = {lines[0][3] for lines in found.values()}
    for site in link.sites.values():
        status = peer_status(site)
        assert status is not None and status["session"] == "up", describe(link)
        assert status["sessions_established"] == 1, describe(link)
    for site_id in link.sites:
        assert "event=session_replaced" not in link.since(site_id), describe(link)
    return dialled_by


@pytest.mark.parametrize("rounds", [pytest.param(5), pytest.param(40, marks=pytest.mark.slow)])
def test_both_daemons_started_together_in_either_order(tmp_path: Path, rounds: int) -> None:
    rng = random.Random(5)
    winners: list[str] = []
    with running_link(tmp_path) as link:
        for _ in range(rounds):
            link.mark()
            order = rng.sample([SITE_A.site_id, SITE_B.site_id], 2)
            gap = rng.choice([0.0, rng.uniform(0.0, 0.5)])
            link.start(order[0])
            time.sleep(gap)
            link.start(order[1])
            wait_until(lambda: session_up(link), "the session", 60, lambda: describe(link))
            drain_and_refill(link)
            winners.append(one_session_each(link))
            for site_id in order:
                link.stop(site_id)
    assert len(winners) == rounds


def master_cannot_reach_slave(directory: Path) -> None:
    """Site A's address for site B goes nowhere (a port nothing listens on): only B's
    dials can bring the link up."""
    set_peer_address(directory / f"{SITE_A.site_id}.toml", f"127.0.0.1:{unused_port()}")


def test_the_slave_brings_the_link_up_when_the_master_cannot_reach_it(tmp_path: Path) -> None:
    with running_link(tmp_path, master_cannot_reach_slave) as link:
        link.start(SITE_A.site_id)
        link.start(SITE_B.site_id)
        wait_until(lambda: session_up(link), "the slave's session", 60, lambda: describe(link))
        drain_and_refill(link)
        assert one_session_each(link) == SITE_B.site_id

        # The slave restarts while the master is down; the master comes back.
        link.stop(SITE_A.site_id)
        link.mark()
        link.stop(SITE_B.site_id)
        link.start(SITE_B.site_id)
        wait_until(lambda: "event=ready" in link.since(SITE_B.site_id), "the slave's start", 30)
        link.start(SITE_A.site_id)
        wait_until(lambda: session_up(link), "the link back", 60, lambda: describe(link))
        drain_and_refill(link)
        assert one_session_each(link) == SITE_B.site_id

        # The master restarts (killed): the slave dials it again.
        link.mark()
        link.stop(SITE_A.site_id, signal.SIGKILL)
        link.start(SITE_A.site_id)
        wait_until(lambda: session_up(link), "the link back", 60, lambda: describe(link))
        drain_and_refill(link)
        found = ESTABLISHED.findall(link.since(SITE_A.site_id))
        assert [line[3] for line in found] == [SITE_B.site_id], describe(link)


def test_a_restarted_slaves_dial_waits_until_the_old_session_is_declared_dead(
    tmp_path: Path,
) -> None:
    proxy = MitmProxy()
    try:
        with running_link(tmp_path, point_a_at(proxy)) as link:
            # The session the master dialled, through the proxy (the slave's dials go nowhere).
            link.start(SITE_A.site_id)
            link.start(SITE_B.site_id)
            wait_until(lambda: session_up(link), "the session", 60, lambda: describe(link))
            assert one_session_each(link) == SITE_A.site_id
            # The path goes silent, the slave is killed (its close never reaches the master,
            # which still holds the old session) and comes back able to dial the master.
            link.mark()
            proxy.freeze()
            listen_a = re.search(
                r'^listen = "(.*)"$', link.configs[SITE_A.site_id].read_text(), re.M
            )
            assert listen_a is not None
            set_peer_address(link.configs[SITE_B.site_id], listen_a.group(1))
            link.stop(SITE_B.site_id, signal.SIGKILL)
            link.start(SITE_B.site_id)
            # Generous: the old session is declared dead only after the 15 s silence
            # deadline, and a restarted daemon on a loaded machine is slow to dial.
            wait_until(lambda: session_up(link), "the new session", 180, lambda: describe(link))
            drain_and_refill(link)
            log_a, log_b = link.since(SITE_A.site_id), link.since(SITE_B.site_id)
            assert "event=session_ended" in log_a, describe(link)  # declared dead
            # The slave's first dial was the one taken up: none was closed unused.
            assert [line[3] for line in ESTABLISHED.findall(log_a)] == [SITE_B.site_id]
            assert [line[3] for line in ESTABLISHED.findall(log_b)] == [SITE_B.site_id]
            assert "event=session_unused" not in log_a + log_b, describe(link)
            assert log_b.count("event=session_established") == 1
    finally:
        proxy.close()
