"""Running wg(8) (``qkdd.wireguard.wg_tool``): a PSK fed on stdin and never in argv, errors that say
what failed without showing the PSK, and ending a WireGuard session when failing closed
(reading the peer's settings from `wg show IFACE dump`, and re-creating the peer with them
and a new PSK in one `wg set`).

Against the recording stand-in for wg(8) (tests/wg_standin.py), which keeps each
interface's peers the way `wg set` leaves them; tests/test_wireguard_real.py does the
same on real interfaces where the machine allows, and test_real_wg_reads_the_psk_from_stdin
runs the real `wg` where it is installed.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from wg_standin import StandinWg, install_standin, path_with

from qkdd.rotation.tunnel_binding import KeyMaterialError
from qkdd.wireguard.wg_tool import (
    PeerSettings,
    WgCommandError,
    WgInstaller,
    WgNotFoundError,
    peer_settings_from_dump,
)

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


async def test_standin_installer_feeds_the_psk_on_stdin(standin_wg):
    psk = os.urandom(32)
    await WgInstaller().install("wg0", PEER, psk)
    (call,) = standin_wg.calls()
    assert call["argv"] == ["set", "wg0", "peer", PEER, "preshared-key", "/dev/stdin"]
    assert call["key_file"] == base64.b64encode(psk).decode() + "\n"


async def test_standin_wg_failure_is_reported_with_stderr_and_status(standin_wg):
    standin_wg.fail("wg0", "Unable to modify interface: No such device\n")
    psk = os.urandom(32)
    with pytest.raises(WgCommandError) as caught:
        await WgInstaller().install("wg0", PEER, psk)
    error = caught.value
    assert error.returncode == 3
    assert error.stderr == "Unable to modify interface: No such device"
    assert "status 3" in str(error) and "No such device" in str(error)
    assert "wg set wg0" in str(error)


async def test_standin_psk_echoed_by_wg_is_hidden(standin_wg):
    # wg prints a key it cannot parse; that text must not carry the PSK into a log.
    standin_wg.fail("wg0", "Key is not the correct length or format: `{key}'\n")
    psk = os.urandom(32)
    with pytest.raises(WgCommandError) as caught:
        await WgInstaller().install("wg0", PEER, psk)
    assert "<psk hidden>" in str(caught.value)
    shown = base64.b64encode(psk).decode()
    assert shown not in str(caught.value) and shown not in caught.value.stderr


async def test_missing_wg_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without wg
    with pytest.raises(WgNotFoundError, match="cannot run 'wg': not found.*wireguard-tools"):
        await WgInstaller().install("wg0", PEER, os.urandom(32))
    with pytest.raises(WgNotFoundError, match="not found"):
        await WgInstaller(str(tmp_path / "no-such-wg")).install("wg0", PEER, os.urandom(32))


async def test_wg_that_is_not_executable_gives_a_clear_error(tmp_path):
    not_executable = tmp_path / "wg"
    not_executable.write_text("#!/bin/sh\n")
    not_executable.chmod(0o644)
    with pytest.raises(WgNotFoundError, match="permission denied"):
        await WgInstaller(str(not_executable)).install("wg0", PEER, os.urandom(32))


async def test_installer_refuses_a_psk_of_the_wrong_size(standin_wg):
    with pytest.raises(KeyMaterialError):
        await WgInstaller().install("wg0", PEER, os.urandom(16))
    assert standin_wg.calls() == []


async def test_real_wg_reads_the_psk_from_stdin():
    """The real parser accepts what WgInstaller feeds it (needs only the binary)."""
    wg = shutil.which("wg")
    if wg is None:
        pytest.skip("the real `wg` (wireguard-tools) is not installed")
    with pytest.raises(WgCommandError) as caught:
        await WgInstaller(wg).install("qkdd-nosuch0", PEER, os.urandom(32))
    # It got past reading the key and failed only at the missing interface.
    assert "Unable to modify interface" in caught.value.stderr
    assert "key" not in caught.value.stderr.lower()


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
