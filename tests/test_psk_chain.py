"""Bootstrap once, then PSKs from the QKD stream, through real daemons and restarts; a lost
PSK chain fails closed until the operators allow a new bootstrap, whichever site lost its
state, and the allowances are used up by the new chain."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from site_logs import established_sessions
from timeouts import timeout, wait_until

from qkdd.client import BlockingKeyClient
from qkdd.demo import RunningSite, exchange_keys, running_demo, wait_for_keys
from qkdd.demo_sites import SITE_A, SITE_B


def wait_for_log(path: Path, text: str, count: int = 1, seconds: float = 30.0) -> None:
    wait_until(
        lambda: path.read_text().count(text) >= count,
        f"{text!r} x{count} in {path}",
        seconds,
        path.read_text,
        interval=0.1,
    )


def restart(site, *, wipe_state: bool = False) -> None:
    if wipe_state:
        site.process.send_signal(signal.SIGTERM)
        assert site.process.wait(timeout=timeout(20)) == 0
        shutil.rmtree(site.config_file.parent / site.site.directory / "state")
        site.spawn()
    else:
        site.restart()


def test_psk_after_bootstrap_and_fail_closed_when_the_chain_is_lost(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        wait_for_log(site_a.log_file, "auth=ml-dsa-bootstrap")
        wait_for_log(site_a.log_file, "event=auth_key_rotated")

        # A restart of either side: the next session is authenticated by the PSK.
        restart(site_b)
        wait_for_log(site_a.log_file, "auth=psk:")
        wait_for_log(site_b.log_file, "auth=psk:")
        wait_for_log(site_a.log_file, "event=auth_key_rotated", count=2)
        established = established_sessions(site_a.log_file, "ml-dsa-bootstrap")
        assert len(established) == 1, established
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))

        # Site B loses its state, PSK chain included: no silent fallback to signatures.
        restart(site_b, wipe_state=True)
        wait_for_log(site_b.log_file, "event=peer_authentication_failed")
        wait_for_log(site_b.log_file, "PSK chains are out of step")
        wait_for_log(site_a.log_file, "closed the connection during the handshake")
        sessions = site_a.log_file.read_text().count("event=session_established")

        # Both operators allow one new bootstrap (B's store is new, so only A's consent is
        # needed); the link comes back and re-keys.
        allow_bootstrap(site_b, SITE_A.site_id)
        allow_bootstrap(site_a, SITE_B.site_id)
        wait_for_log(site_a.log_file, "event=bootstrap peer=site-b reason=allowed-by-operator")
        wait_for_log(site_a.log_file, "auth=ml-dsa-bootstrap", count=2)
        assert site_a.log_file.read_text().count("event=session_established") == sessions + 1
        # A learns that B's store is new and withdraws the keys B lost; only then are the
        # keys in A's pool ones B holds (keys handed out before that are lost with B's state).
        wait_for_log(site_a.log_file, "event=peer_state_lost")
        wait_for_log(site_a.log_file, "event=auth_key_rotated", count=3)
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))
        # The new chain used both allowances up.
        wait_for_allowance_used_up(site_a, SITE_B.site_id)
        wait_for_allowance_used_up(site_b, SITE_A.site_id)


def test_a_master_that_lost_its_state_is_let_in_only_with_the_slaves_consent(tmp_path):
    with running_demo(tmp_path) as (site_a, site_b):
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        wait_for_log(site_a.log_file, "event=auth_key_rotated")

        # A has no PSK any more, and B refuses its bootstrap: B still holds the chain.
        restart(site_a, wipe_state=True)
        wait_for_log(site_b.log_file, "asked for a signature bootstrap, but we share a PSK chain")
        sessions = site_b.log_file.read_text().count("event=session_established")

        allow_bootstrap(site_a, SITE_B.site_id)
        allow_bootstrap(site_b, SITE_A.site_id)
        wait_for_log(site_b.log_file, "auth=ml-dsa-bootstrap", count=2)
        assert site_b.log_file.read_text().count("event=session_established") == sessions + 1
        wait_for_log(site_b.log_file, "event=peer_state_lost")
        wait_for_log(site_a.log_file, "event=auth_key_rotated", count=2)
        wait_for_allowance_used_up(site_a, SITE_B.site_id)
        wait_for_allowance_used_up(site_b, SITE_A.site_id)
        wait_for_keys(site_a, SITE_B.sae_id, 4, timeout=timeout(30))
        assert all(row["match"] for row in exchange_keys(site_a, site_b, 4))


def allow_bootstrap(site: RunningSite, peer: str) -> None:
    allowed = subprocess.run(
        [sys.executable, "-m", "qkdd", "allow-bootstrap", "--config", str(site.config_file), peer],
        capture_output=True,
        text=True,
        timeout=timeout(30),
    )
    assert allowed.returncode == 0, allowed.stderr


def wait_for_allowance_used_up(site: RunningSite, peer: str) -> None:
    """Until the site's status shows the PSK chain established and no allowance left."""
    deadline = time.monotonic() + timeout(30)
    while True:
        with BlockingKeyClient(str(site.socket_path)) as client:
            status = client.site_status()["peers"][peer]
        if status["psk_chain_established"] and status["bootstrap_allowed"] is False:
            return
        if time.monotonic() >= deadline:  # only a hang gets here
            raise AssertionError(f"allowance not used up at {site.site.site_id}")
        time.sleep(0.1)
