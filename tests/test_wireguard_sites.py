"""WireGuard PSKs through two real daemons: the emulator and both sites as subprocesses, the
rotation agreed over the real peer session, and `wg` run by the daemons.

`wg` here is the recording stand-in of `wg_standin` first on PATH, not the real wg(8), so
these tests run on any machine; the stand-in records what each daemon installed on which
interface, so the tests can compare the two sites' PSKs. tests/test_wireguard_real.py runs
the same daemons against real userspace WireGuard interfaces where the machine allows."""

from __future__ import annotations

import base64
import signal
import time

from timeouts import timeout, wait_until
from wg_standin import StandinWg, install_standin, path_with, wireguard_bindings

from qkdd.client import BlockingKeyClient
from qkdd.demo import running_demo

# Any canonical WireGuard public keys will do: the stand-in has no peers to check them.
PUB_A = base64.b64encode(bytes(range(32))).decode()
PUB_B = base64.b64encode(bytes(range(32, 64))).decode()

BINDINGS = wireguard_bindings(("wga", "wgb"), (PUB_A, PUB_B))


def _wait(condition, what: str, seconds: float = 40.0) -> None:  # type: ignore[no-untyped-def]
    wait_until(condition, what, seconds, interval=0.1)


def test_both_sites_install_the_same_psks_and_fail_closed_without_the_peer(tmp_path, monkeypatch):
    wg: StandinWg = install_standin(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(wg.directory))  # the daemons inherit it
    with running_demo(tmp_path, BINDINGS) as (site_a, site_b):
        # Several rotations: each PSK is installed at B (the slave) first, then at A.
        _wait(lambda: len(wg.installed("wga")) >= 3, "three rotations at site A")
        at_a, at_b = wg.installed("wga"), wg.installed("wgb")
        assert at_a == at_b[: len(at_a)]
        assert len(set(at_a)) == len(at_a)  # a new PSK every time
        for call in wg.calls():
            assert call["argv"][2:] in (  # type: ignore[index]
                ["peer", PUB_B, "preshared-key", "/dev/stdin"],
                ["peer", PUB_A, "preshared-key", "/dev/stdin"],
            )
        rotations = len(wg.calls())
        # The first PSK was in place before either site reported ready.
        for site in (site_a, site_b):
            log = site.log_file.read_text()
            assert 0 <= log.index("event=wireguard_ready") < log.index("event=ready site=")
            assert "installed='fresh key" in log
        with BlockingKeyClient(str(site_a.socket_path)) as client:
            (row,) = client.site_status()["wireguard"]
        assert row["state"] == "fresh" and row["interface"] == "wga"

        # Without site B no fresh key can be agreed: A keeps its last PSK until it is too
        # old (max_key_age), then replaces it with a random one, failing closed.
        site_b.process.send_signal(signal.SIGKILL)
        site_b.process.wait(timeout(10))
        _wait(
            lambda: "event=wireguard_fail_closed" in site_a.log_file.read_text(),
            "site A fails closed",
        )
        last_a = wg.installed("wga")[-1]
        assert last_a not in wg.installed("wgb")
        # Failing closed re-created the peer (ending WireGuard's current session) with the
        # random key: `wg show wga dump` for its settings, then one `wg set`.
        show, fail_closed = [c["argv"] for c in wg.calls()[rotations:] if c["argv"][1] == "wga"]
        assert show == ["show", "wga", "dump"]
        assert fail_closed[2:] == [
            "peer",
            PUB_B,
            "remove",
            "peer",
            PUB_B,
            "preshared-key",
            "/dev/stdin",
        ]
        logs = site_a.log_file.read_text() + site_b.log_file.read_text()
        for psk in wg.installed("wga") + wg.installed("wgb"):
            assert base64.b64encode(psk).decode() not in logs and psk.hex() not in logs


def _status(site) -> dict:  # type: ignore[no-untyped-def,type-arg]
    with BlockingKeyClient(str(site.socket_path)) as client:
        return client.site_status()


def _wg_pool(status: dict) -> int:  # type: ignore[type-arg]
    (pool,) = [
        level
        for level in status["peers"]["site-b"]["pools"]
        if (level["master_SAE_ID"], level["slave_SAE_ID"]) == ("wg-a", "wg-b")
    ]
    return int(pool["ready"])


def _rotation_errors_since(status: dict, since: float) -> list[str]:  # type: ignore[type-arg]
    return [
        event["message"]
        for event in status["recent_errors"]
        if event["time"] >= since and "event=wireguard_rotation_failed" in event["message"]
    ]


def test_a_peer_outage_consumes_no_keys_and_is_logged_once(tmp_path, monkeypatch):
    """With the peer site down no rotation can complete: the driving site takes no hybrid
    key for it, and the status view's recent errors hold one entry for the whole outage,
    however many attempts it makes."""
    wg: StandinWg = install_standin(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(wg.directory))
    with running_demo(tmp_path, BINDINGS) as (site_a, site_b):
        _wait(lambda: len(wg.installed("wga")) >= 2, "two rotations at site A")
        down_since = time.time()
        site_b.process.send_signal(signal.SIGKILL)
        site_b.process.wait(timeout(10))

        def outage_noticed() -> bool:
            status = _status(site_a)
            return status["peers"]["site-b"]["session"] == "down" and bool(
                _rotation_errors_since(status, down_since)
            )

        _wait(outage_noticed, "site A's rotations fail without site B")
        before = _status(site_a)
        (row,) = before["wireguard"]
        attempts = int(row["consecutive_failures"])
        _wait(
            lambda: _status(site_a)["wireguard"][0]["consecutive_failures"] >= attempts + 3,
            "three more failed rotations at site A",
        )
        after = _status(site_a)
        assert _wg_pool(after) == _wg_pool(before)  # no key taken for an attempt
        (entry,) = _rotation_errors_since(after, down_since)  # one entry for the outage
        assert "site-b" in entry
        assert after["wireguard"][0]["last_error"]  # the status row still says why
