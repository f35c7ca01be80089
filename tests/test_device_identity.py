"""A QKD device says which end of which link it is (serial protocol v2, IDENTITY), and a
daemon attached to another site's end refuses it before taking a single key: in memory,
on a real pty, and with the emulator and both daemons as real processes whose device
paths were swapped (as stale links left behind after a crash did)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import trio
from qkdd_drivers.serial.driver import SerialDevice
from qkdd_drivers.serial.protocol import (
    DeviceProtocol,
    HostProtocol,
    HostState,
    KeysReceived,
    SerialHandshakeComplete,
)
from qkdd_drivers.serial.serial_messages import Identity
from test_drivers_serial import FAST, Pty, RecordingSink, new_half, running, wait_for
from timeouts import timeout

from qkdd.client import BlockingKeyClient, ClientError
from qkdd.config import SerialDeviceConfig, load_config
from qkdd.demo import prepare_directory, running_demo
from qkdd.demo_sites import SITE_A, SITE_B

OURS = Identity("site-a", "site-b")
THEIRS = Identity("site-b", "site-a")


def keys(n: int) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(16), os.urandom(32)) for _ in range(n)]


def test_the_device_says_which_end_it_is_before_any_key() -> None:
    host, device = HostProtocol(), DeviceProtocol(identity=OURS)
    device.add_keys(keys(3))
    host.start()
    device.receive_data(host.data_to_send())
    device.poll(0.0)
    events = host.receive_data(device.data_to_send())
    done = [e for e in events if isinstance(e, SerialHandshakeComplete)]
    assert done and done[0].identity == OURS and host.identity == OURS
    assert sum(len(e.keys) for e in events if isinstance(e, KeysReceived)) == 3


def test_no_key_is_taken_until_the_identity_has_come() -> None:
    host, device = HostProtocol(), DeviceProtocol(identity=OURS)
    device.add_keys(keys(3))
    host.start()
    device.receive_data(host.data_to_send())
    # On the wire: 0x00, HELLO, 0x00, IDENTITY, 0x00 (COBS frames never contain 0x00).
    _, hello, identity, _ = device.data_to_send().split(b"\x00")
    host.receive_data(b"\x00" + hello + b"\x00")
    assert host.state is HostState.AWAIT_IDENTITY
    device.poll(0.0)
    stale = device.data_to_send()
    assert not [e for e in host.receive_data(stale) if isinstance(e, KeysReceived)]
    host.receive_data(identity + b"\x00")
    assert host.state is HostState.READY and host.identity == OURS


def test_a_version_1_device_says_nothing_and_still_works() -> None:
    host, device = HostProtocol(), DeviceProtocol(max_version=1, identity=OURS)
    device.add_keys(keys(2))
    host.start()
    device.receive_data(host.data_to_send())
    device.poll(0.0)
    events = host.receive_data(device.data_to_send())
    assert SerialHandshakeComplete(1, "qkd-device", device._window) in events
    assert sum(len(e.keys) for e in events if isinstance(e, KeysReceived)) == 2


async def test_the_driver_refuses_the_other_sites_end(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half(identity=THEIRS)
    half.add_keys(keys(5))
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **FAST, expected_identity=OURS)  # type: ignore[arg-type]
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: "wrong device" in device.status.detail)
            assert device.status.state in ("down", "connecting")
            await trio.sleep(0.3)  # a few reconnects: still nothing taken
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert sink.keys == [] and half.proto.held == 5
    assert "'site-b'" in device.status.detail and "[peers.device] path" in device.status.detail


async def test_the_driver_warns_about_a_device_that_says_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half()  # not told which end it is
    half.add_keys(keys(5))
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **FAST, expected_identity=OURS)  # type: ignore[arg-type]
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: len(sink.keys) == 5)
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert "device.identity-unknown" in caplog.text


def swap_device_paths(directory: Path) -> None:
    """Each site's config names the other site's end of the emulated link."""
    for site, other in ((SITE_A, SITE_B), (SITE_B, SITE_A)):
        config = directory / f"{site.site_id}.toml"
        config.write_text(config.read_text().replace(site.device_link, other.device_link))


def test_daemons_attached_to_the_wrong_ends_refuse_them(tmp_path: Path) -> None:
    with running_demo(tmp_path, swap_device_paths) as (site_a, site_b):
        deadline = time.monotonic() + timeout(60)
        status = None
        while time.monotonic() < deadline:
            try:
                with BlockingKeyClient(str(site_a.socket_path), timeout=timeout(5)) as client:
                    status = client.site_status()
            except (ClientError, OSError):
                status = None
            if status and "wrong device" in status["peers"]["site-b"]["device"]["detail"]:
                break
            time.sleep(0.1)
        assert status is not None, "site A's status never said why its device is refused"
        peer = status["peers"]["site-b"]
        assert "wrong device" in peer["device"]["detail"]
        assert "wrong device" in (peer["keys_unavailable_because"] or "")
        assert peer["qkd_keys_buffered"] == 0 and peer["device"]["keys_received"] == 0
        for site in (site_a, site_b):
            assert site.process.poll() is None  # refusing the device, not crashing
        log_a = site_a.log_file.read_text()
        assert "WrongDeviceError" in log_a
        assert "is 'site-b''s end of the QKD link to 'site-a'" in log_a


def test_the_device_link_is_followed_at_each_open_not_once_at_start(tmp_path: Path) -> None:
    """The emulator makes new ptys when it restarts and re-points its links: a daemon that
    resolved its device link when it read its config would open whatever pty now has the
    old number (another site's end, once)."""
    configs = prepare_directory(tmp_path)
    os.symlink("/dev/null", tmp_path / SITE_A.device_link)
    (peer,) = load_config(configs[SITE_A.site_id]).peers
    assert isinstance(peer.device, SerialDeviceConfig)
    assert peer.device.path == tmp_path / SITE_A.device_link
