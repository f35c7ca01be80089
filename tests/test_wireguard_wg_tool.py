"""Ending a WireGuard session when failing closed: reading the peer's settings from
`wg show IFACE dump`, and re-creating the peer with them and a new PSK in one `wg set`.

Against the recording stand-in for wg(8) (tests/wg_standin.py), which keeps each
interface's peers the way `wg set` leaves them; tests/test_wireguard_real.py does the
same on real interfaces where the machine allows.
"""

from __future__ import annotations

import base64
import os
import subprocess
from pathlib import Path

import pytest
from wg_standin import StandinWg, install_standin, path_with

from qkdd.wg_tool import PeerSettings, WgCommandError, WgInstaller, peer_settings_from_dump

PEER = base64.b64encode(bytes(range(100, 132))).decode()
OTHER = base64.b64encode(bytes(range(50, 82))).decode()
PSK = base64.b64encode(bytes(32)).decode()

DUMP = (
    "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n"
    f"{OTHER}\t(none)\t(none)\t(none)\t0\t0\t0\toff\n"
    f"{PEER}\t{PSK}\t[fd00::2]:51820\t10.0.0.2/32,fd00:1::/64\t1700000000\t10\t20\t25\n"
)


def test_dump_gives_the_peers_settings():
    assert peer_settings_from_dump(DUMP, PEER) == PeerSettings(
        endpoint="[fd00::2]:51820",
        allowed_ips="10.0.0.2/32,fd00:1::/64",
        persistent_keepalive="25",
    )
    assert peer_settings_from_dump(DUMP, OTHER) == PeerSettings(None, None, None)
    assert peer_settings_from_dump(DUMP, base64.b64encode(bytes(32)).decode()) is None
    # The interface's own line is never read as a peer, whatever it holds.
    assert peer_settings_from_dump(DUMP, "cHJpdmF0ZQ==") is None


def test_settings_become_wg_set_arguments():
    settings = peer_settings_from_dump(DUMP, PEER)
    assert settings is not None
    assert settings.arguments() == [
        "endpoint",
        "[fd00::2]:51820",
        "persistent-keepalive",
        "25",
        "allowed-ips",
        "10.0.0.2/32,fd00:1::/64",
    ]
    assert PeerSettings(None, None, None).arguments() == []


@pytest.fixture
def standin_wg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandinWg:
    standin = install_standin(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(standin.directory))
    return standin


async def test_ending_the_session_re_creates_the_peer_with_its_settings(standin_wg):
    subprocess.run(
        ["wg", "set", "wg0", "peer", PEER, "endpoint", "192.0.2.1:51820", "allowed-ips",
         "10.9.0.2/32", "persistent-keepalive", "25"],
        check=True,
    )  # fmt: skip
    first = os.urandom(32)
    await WgInstaller().install("wg0", PEER, first)
    random_psk = os.urandom(32)
    await WgInstaller().install_ending_session("wg0", PEER, random_psk)
    show, remove_and_add = [call["argv"] for call in standin_wg.calls()[-2:]]
    assert show == ["show", "wg0", "dump"]
    assert remove_and_add == [
        "set", "wg0", "peer", PEER, "remove", "peer", PEER, "preshared-key", "/dev/stdin",
        "endpoint", "192.0.2.1:51820", "persistent-keepalive", "25", "allowed-ips",
        "10.9.0.2/32",
    ]  # fmt: skip
    assert standin_wg.peers("wg0") == {
        PEER: {
            "endpoint": "192.0.2.1:51820",
            "allowed-ips": "10.9.0.2/32",
            "persistent-keepalive": "25",
            "psk": base64.b64encode(random_psk).decode(),
        }
    }
    assert standin_wg.installed("wg0") == [first, random_psk]  # on stdin, never in argv


async def test_ending_the_session_of_a_peer_not_on_the_interface_just_sets_the_psk(
    standin_wg,
):
    psk = os.urandom(32)
    await WgInstaller().install_ending_session("wg0", PEER, psk)
    assert standin_wg.calls()[-1]["argv"] == [
        "set", "wg0", "peer", PEER, "preshared-key", "/dev/stdin",
    ]  # fmt: skip
    assert standin_wg.installed("wg0") == [psk]


async def test_a_failing_wg_show_is_reported_and_nothing_is_set(standin_wg):
    standin_wg.fail("wg0", "Unable to access interface: No such device\n")
    with pytest.raises(WgCommandError) as caught:
        await WgInstaller().install_ending_session("wg0", PEER, os.urandom(32))
    assert "wg show wg0 dump" in str(caught.value) and "No such device" in str(caught.value)
    assert caught.value.returncode == 3
    assert [call["argv"][0] for call in standin_wg.calls()] == ["show"]
