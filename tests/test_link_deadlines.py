"""Every wait in the key agreement has a deadline: a session whose peer went silent in one
direction (a black hole: the connection stays open, nothing arrives) is declared dead by
the sans-IO agreement within the batch deadline, and the next session makes keys again.
Two LinkAgreements over real SQLite stores, a simulated clock (link_pair); and (slow) the
daemons as processes behind a proxy that goes silent."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from link_pair import LinkPair, qkd_keys
from mitm_proxy import MitmProxy, point_a_at
from timeouts import timeout

from qkdd.demo import exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_B
from qkdd.link_params import LinkError
from qkdd.peer.agreement import BATCH_REPLY_TIMEOUT

STEP = 0.25  # simulated seconds between polls


def black_hole(message):  # type: ignore[no-untyped-def]
    return []


def run_until_dead(pair: LinkPair, **fates) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """Step until one side's agreement gives up; return (which side, simulated time)."""
    start = pair.now
    while pair.now - start < 10 * BATCH_REPLY_TIMEOUT:
        try:
            pair.step(**fates)
        except LinkError as exc:
            side = "master" if "BATCH_ACK" in str(exc) or "RESYNC" in str(exc) else "either"
            return side, pair.now - start
        pair.now += STEP
    raise AssertionError(f"no side noticed the black hole in {pair.now - start:g} simulated s")


def fill_pools(pair: LinkPair) -> None:
    for _ in range(200):
        if pair.ready() == (pair.pool_size, pair.pool_size):
            return
        pair.step()
        pair.now += STEP
    raise AssertionError(f"pools did not fill: {pair.ready()}")


def test_slave_to_master_black_holed_right_after_the_handshake(stores, backend):
    """The master never gets RESYNC: it waited for it without a deadline before."""
    a, b = stores
    pair = LinkPair(a, b, backend)
    pair.feed(qkd_keys(32))
    _side, took = run_until_dead(pair, fate_to_a=black_hole)
    assert took <= BATCH_REPLY_TIMEOUT + 1
    pair.new_session()  # the I/O layer ends the session; the master dials again
    fill_pools(pair)


def test_master_to_slave_black_holed_right_after_the_handshake(stores, backend):
    a, b = stores
    pair = LinkPair(a, b, backend)
    pair.feed(qkd_keys(32))
    _side, took = run_until_dead(pair, fate_to_b=black_hole)
    assert took <= BATCH_REPLY_TIMEOUT + 1
    pair.new_session()
    fill_pools(pair)


def test_a_quiet_session_with_a_silenced_direction_is_noticed(stores, backend):
    """Pools full, nothing to do: then B's application drains B's pool and B's demand
    never reaches A. Without a heartbeat nobody waits for anything, and B stays empty."""
    a, b = stores
    pair = LinkPair(a, b, backend, pool_size=4)
    pair.feed(qkd_keys(64))
    fill_pools(pair)
    for _ in range(40):  # quiet for a while: a healthy idle session stays up
        pair.step()
        pair.now += STEP
    b.take_ready("sae-b", "sae-a", 4)
    _side, took = run_until_dead(pair, fate_to_a=black_hole)
    assert took <= BATCH_REPLY_TIMEOUT + 1
    pair.new_session()
    fill_pools(pair)


def test_next_deadline_tells_the_caller_when_to_poll(stores, backend):
    """Polling exactly at each deadline the agreement names is never too late: the
    session is declared dead just after the RESYNC deadline, not before it."""
    a, b = stores
    pair = LinkPair(a, b, backend)
    pair.feed(qkd_keys(8))
    pair.step(fate_to_a=black_hole)
    deadlines: list[float] = []
    with pytest.raises(LinkError, match="RESYNC"):
        while len(deadlines) < 20:
            deadline = pair.master.next_deadline()
            assert deadline is not None and deadline >= (deadlines or [pair.now])[-1]
            pair.master.poll(deadline)  # on time
            deadlines.append(deadline)
            pair.master.poll(deadline + 0.01)  # just late: dead only past a reply deadline
    assert deadlines[-1] <= pair.now + BATCH_REPLY_TIMEOUT


def wait_for_text(path: Path, start: int, text: str, what: str) -> int:
    """Wait until ``text`` appears in the log after offset ``start``; its end offset."""
    deadline = time.monotonic() + timeout(90)
    while time.monotonic() < deadline:
        with open(path, "rb") as log:
            log.seek(start)
            found = log.read().decode(errors="replace").find(text)
        if found >= 0:
            return start + found + len(text)
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_silent_network_ends_an_idle_session_and_it_comes_back(tmp_path):
    """The daemons as processes, their session through a proxy that stops moving bytes
    both ways while the pools are full (nobody waits for anything): each side notices the
    silence, ends the session, and the link is up again once the network is."""
    proxy = MitmProxy()
    try:
        with running_demo(tmp_path, tamper=point_a_at(proxy)) as (site_a, site_b):
            wait_for_keys(site_a, SITE_B.sae_id, 64, timeout=timeout(60))  # full: idle
            mark = site_a.log_file.stat().st_size
            proxy.freeze()
            ended = wait_for_text(
                site_a.log_file, mark, "nothing from the peer", "A to end the silent session"
            )
            proxy.cut()  # the network is back
            wait_for_text(site_a.log_file, ended, "event=session_established", "a new session")
            rows = exchange_keys(site_a, site_b, 4)
            assert all(row["match"] for row in rows)
    finally:
        proxy.close()
