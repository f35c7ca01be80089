"""WireGuard PSKs through two real daemons: the emulator and both sites as subprocesses, the
rotation agreed over the real peer session, and `wg` run by the daemons.

`wg` here is the recording stand-in of `wg_standin` first on PATH, not the real wg(8): a
real `wg set` needs a WireGuard interface, which this machine's kernel cannot create (no
wireguard module, as test_wireguard.test_real_wg_interface reports when it skips). The
stand-in records what each daemon installed on which interface, so the test can compare
the two sites' PSKs."""

from __future__ import annotations

import base64
import signal
import time
from pathlib import Path

from wg_standin import StandinWg, install_standin, path_with

from qkdd.client import BlockingKeyClient
from qkdd.demo import running_demo

# Any canonical WireGuard public keys will do: the stand-in has no peers to check them.
PUB_A = base64.b64encode(bytes(range(32))).decode()
PUB_B = base64.b64encode(bytes(range(32, 64))).decode()


def _binding(local: str, remote: str, peer_site: str, interface: str, peer_key: str) -> str:
    return f"""
[[wireguard]]
name = "tunnel-a-b"
interface = "{interface}"
peer_public_key = "{peer_key}"
peer_site = "{peer_site}"
local_sae = "{local}"
remote_sae = "{remote}"
interval = 1
max_key_age = 4
startup_timeout = 20
"""


def _with_wireguard(directory: Path) -> None:
    for name, local, remote, peer, interface, peer_key in (
        ("site-a.toml", "wg-a", "wg-b", "site-b", "wga", PUB_B),
        ("site-b.toml", "wg-b", "wg-a", "site-a", "wgb", PUB_A),
    ):
        path = directory / name
        text = path.read_text()
        text = text.replace("remote_sae_ids = [", f'remote_sae_ids = ["{remote}", ')
        text = text.replace("[[peers]]", f'[[consumers]]\nsae_id = "{local}"\n\n[[peers]]')
        path.write_text(text + _binding(local, remote, peer, interface, peer_key))


def _wait(condition, what: str, timeout: float = 40.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_both_sites_install_the_same_psks_and_fail_closed_without_the_peer(tmp_path, monkeypatch):
    wg: StandinWg = install_standin(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(wg.directory))  # the daemons inherit it
    with running_demo(tmp_path, _with_wireguard) as (site_a, site_b):
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
        site_b.process.wait(10)
        _wait(
            lambda: "event=wireguard_fail_closed" in site_a.log_file.read_text(),
            "site A fails closed",
        )
        last_a = wg.installed("wga")[-1]
        assert last_a not in wg.installed("wgb")
        logs = site_a.log_file.read_text() + site_b.log_file.read_text()
        for psk in wg.installed("wga") + wg.installed("wgb"):
            assert base64.b64encode(psk).decode() not in logs and psk.hex() not in logs
