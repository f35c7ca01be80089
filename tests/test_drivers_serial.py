"""SerialDevice against the device side of the protocol on real ptys, in-process with Trio.

Each test builds a pty pair with ``os.openpty()``, links a path to its slave (as the
emulator does) and serves ``DeviceHalf`` on the master, then runs ``SerialDevice.run`` on
the path and watches what reaches the sink and what the device is told.
"""

from __future__ import annotations

import contextlib
import os
import tty
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import trio
from pty_pair import Pty
from qkdd_drivers.base import QkdKey
from qkdd_drivers.device_errors import DeviceBusyError, DeviceNotFoundError, NotATtyError
from qkdd_drivers.emulator.device_side import DeviceHalf
from qkdd_drivers.serial.driver import SerialDevice, open_serial_port
from qkdd_drivers.serial.framing import encode_frame
from qkdd_drivers.serial.serial_constants import PROTOCOL_VERSION_MAX as VERSION
from qkdd_drivers.serial.serial_messages import KeyEntry, Keys, encode_message
from timeouts import timeout

FAST = dict(
    reconnect_initial_delay=0.05,
    reconnect_max_delay=0.2,
    hello_timeout=0.5,
    idle_timeout=1.0,
    stall_timeout=0.3,
)
# For tests that watch a transient "down" detail: it stays up for the whole retry delay.
WATCHABLE = dict(FAST, reconnect_initial_delay=0.4, reconnect_max_delay=0.4)


def new_half(**kw: object) -> DeviceHalf:
    params: dict[str, object] = dict(window=16, retransmit_timeout=0.3, status_interval=0.2)
    params.update(kw)
    return DeviceHalf("test-device", **params)  # type: ignore[arg-type]


def make_keys(n: int, size: int = 32) -> list[tuple[bytes, bytes]]:
    return [(os.urandom(16), os.urandom(size)) for _ in range(n)]


class RecordingSink:
    """Stores keys in memory; records whether the device still held each key (i.e. had
    not been told) while it was being stored."""

    def __init__(self, half: DeviceHalf | None = None, delay: float = 0.0) -> None:
        self.half = half
        self.delay = delay
        self.batches: list[list[QkdKey]] = []
        self.acked_before_stored: list[str] = []
        self.fail_next = 0

    @property
    def keys(self) -> list[QkdKey]:
        return [k for batch in self.batches for k in batch]

    def ids(self) -> list[str]:
        return [k.key_id for k in self.keys]

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("disk full")
        await trio.sleep(self.delay)
        if self.half is not None:
            for key in keys:
                if not self.half.proto.holds(key.key_id_bytes):
                    self.acked_before_stored.append(key.key_id)
        self.batches.append(list(keys))


async def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    with trio.fail_after(timeout(seconds)):
        while not predicate():
            await trio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(device: SerialDevice, sink: RecordingSink) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        await nursery.start(device.run, sink)
        yield nursery
        nursery.cancel_scope.cancel()


def as_dict(keys: list[tuple[bytes, bytes]]) -> dict[str, bytes]:
    return {QkdKey.from_wire(k, m).key_id: m for k, m in keys}


# -- delivery ----------------------------------------------------------------------------


async def test_keys_arrive_and_are_acked_only_after_the_sink_returns(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half()
    sink = RecordingSink(half, delay=0.05)
    keys = make_keys(50)
    half.add_keys(keys)
    device = SerialDevice(str(pty.path), **FAST)
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: half.proto.held == 0)
            assert device.status.state == "up"
            await wait_for(lambda: device.status.keys_buffered == 0)
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert {k.key_id: k.material for k in sink.keys} == as_dict(keys)
    assert len(sink.ids()) == len(set(sink.ids())) == 50
    assert sink.acked_before_stored == []
    assert half.keys_acked == 50
    assert device.status.keys_received == 50
    assert "test-device" in device.status.detail


async def test_garbage_truncated_and_corrupt_frames_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half()
    sink = RecordingSink(half)
    device = SerialDevice(str(pty.path), **FAST)
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            first = make_keys(5)
            half.add_keys(first)
            await wait_for(lambda: len(sink.keys) == 5)
            sessions = half.sessions

            # A KEYS frame whose material is damaged in transit: its CRC fails.
            forged_id, forged_material = os.urandom(16), b"\x11" * 32
            msg_type, payload = encode_message(Keys((KeyEntry(forged_id, forged_material),)))
            corrupt = bytearray(encode_frame(VERSION, msg_type, 999, payload))
            corrupt[30] = corrupt[30] ^ 0x04 or 0x01
            truncated = encode_frame(VERSION, msg_type, 1000, payload)[:25]
            await half.send_raw(b"line noise \x00\xff\x13\x37" + os.urandom(300), pty.stream)
            await half.send_raw(bytes(corrupt), pty.stream)
            await half.send_raw(truncated, pty.stream)
            second = make_keys(5)
            half.add_keys(second)
            await wait_for(lambda: half.proto.held == 0 and len(sink.keys) == 10)
            assert half.sessions == sessions  # the link continued: no new HELLO
            assert device.status.state == "up"
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert {k.key_id: k.material for k in sink.keys} == as_dict(first + second)
    assert QkdKey.from_wire(forged_id, forged_material).key_id not in sink.ids()
    assert "device.frames-dropped" in caplog.text and "device.down" not in caplog.text


async def test_device_restart_resending_stored_keys_gives_no_duplicates(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    before = new_half()
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **FAST)
    stored_first = make_keys(20)
    async with running(device, sink):
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(before.serve, pty.stream)
            before.add_keys(stored_first)
            await wait_for(lambda: len(sink.keys) == 20)
            dev_nursery.cancel_scope.cancel()  # the device crashes...
        # ...and reboots having lost the ACKs: it resends all it had, plus new keys.
        after = new_half()
        new_keys = make_keys(10)
        after.add_keys(stored_first + new_keys)
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(after.serve, pty.stream)
            await wait_for(lambda: after.proto.held == 0)
            assert device.status.state == "up"
            dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert len(sink.ids()) == len(set(sink.ids())) == 30
    assert {k.key_id: k.material for k in sink.keys} == as_dict(stored_first + new_keys)
    assert after.keys_acked == 30  # duplicates were acknowledged, so the device let go
    assert device.status.keys_received == 30


async def test_sink_failure_leaves_keys_on_the_device_until_stored(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half()
    sink = RecordingSink(half)
    sink.fail_next = 1
    keys = make_keys(8)
    half.add_keys(keys)
    device = SerialDevice(str(pty.path), **WATCHABLE)
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: "storing" in device.status.detail)
            assert device.status.state == "down"
            assert "will be resent" in device.status.detail
            assert half.proto.held == 8
            await wait_for(lambda: half.proto.held == 0)
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert {k.key_id: k.material for k in sink.keys} == as_dict(keys)
    assert sink.acked_before_stored == []


# -- faults and reconnection -------------------------------------------------------------


async def test_pty_closed_and_reopened_reconnects(tmp_path: Path) -> None:
    path = tmp_path / "qkd"
    pty = Pty(path)
    half = new_half()
    sink = RecordingSink()
    device = SerialDevice(str(path), **WATCHABLE)
    async with running(device, sink):
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            half.add_keys(make_keys(3))
            await wait_for(lambda: len(sink.keys) == 3)
            dev_nursery.cancel_scope.cancel()
        await pty.close()  # the device side goes away: the driver sees a hangup
        await wait_for(lambda: device.status.state != "up")
        await wait_for(
            lambda: "hung up" in device.status.detail or "no such" in device.status.detail
        )
        pty = Pty(path)  # a new pty at the same path
        half = new_half()
        half.add_keys(make_keys(4))
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            await wait_for(lambda: len(sink.keys) == 7 and half.proto.held == 0)
            assert device.status.state == "up"
            dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert len(set(sink.ids())) == 7


async def test_path_disappearing_and_coming_back(tmp_path: Path) -> None:
    path = tmp_path / "ttyQKD0"
    pty = Pty(path)
    half = new_half()
    sink = RecordingSink()
    device = SerialDevice(str(path), **FAST)
    async with running(device, sink):
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            half.add_keys(make_keys(2))
            await wait_for(lambda: len(sink.keys) == 2)
            dev_nursery.cancel_scope.cancel()
        await pty.close(unlink=True)  # unplugged: the path is gone
        await wait_for(lambda: device.status.detail.startswith(f"no such device {path}"))
        assert device.status.state == "down"
        assert "retrying in" in device.status.detail
        await trio.sleep(0.5)  # several failed attempts; run keeps going
        pty = Pty(path)
        half = new_half()
        half.add_keys(make_keys(2))
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            await wait_for(lambda: len(sink.keys) == 4)
            assert device.status.state == "up"
            dev_nursery.cancel_scope.cancel()
    await pty.close()


async def test_regular_file_gives_a_clear_status_and_retrying_continues(tmp_path: Path) -> None:
    path = tmp_path / "not-a-tty"
    path.write_bytes(b"")
    device = SerialDevice(str(path), **FAST)
    sink = RecordingSink()
    async with running(device, sink):
        await wait_for(lambda: device.status.state == "down")
        assert device.status.detail.startswith(
            f"{path} is not a serial device (it is a regular file); check the device path"
        )
        assert "retrying in" in device.status.detail
        # The operator fixes it: the same path now leads to a device.
        path.unlink()
        pty = Pty(path)
        half = new_half()
        half.add_keys(make_keys(1))
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            await wait_for(lambda: len(sink.keys) == 1)
            dev_nursery.cancel_scope.cancel()
    await pty.close()


async def test_device_stalling_mid_frame_recovers(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half()
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **WATCHABLE)
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            half.add_keys(make_keys(2))
            await wait_for(lambda: len(sink.keys) == 2)
            half.silenced = True  # the device hangs half-way through a frame
            msg_type, payload = encode_message(Keys((KeyEntry(os.urandom(16), b"k" * 32),)))
            await half.send_raw(encode_frame(VERSION, msg_type, 77, payload)[:20], pty.stream)
            await wait_for(lambda: "stalled in the middle of a frame" in device.status.detail)
            assert device.status.state in ("down", "connecting")
            half.silenced = False
            half.add_keys(make_keys(3))
            await wait_for(lambda: len(sink.keys) == 5 and device.status.state == "up")
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert len(set(sink.ids())) == 5


async def test_silent_device_and_unanswered_hello_cause_reconnects(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **WATCHABLE)
    async with running(device, sink):
        # Nobody serves the master yet: HELLO goes unanswered.
        await wait_for(lambda: "did not answer HELLO" in device.status.detail)
        half = new_half()
        async with trio.open_nursery() as dev_nursery:
            dev_nursery.start_soon(half.serve, pty.stream)
            await wait_for(lambda: device.status.state == "up")
            half.silenced = True  # no heartbeat any more
            await wait_for(lambda: "no frame from the device" in device.status.detail)
            half.silenced = False
            half.add_keys(make_keys(1))
            await wait_for(lambda: len(sink.keys) == 1 and device.status.state == "up")
            dev_nursery.cancel_scope.cancel()
    await pty.close()


async def test_wrong_baud_rate_is_named_as_the_likely_cause(tmp_path: Path) -> None:
    """A device at another line speed shows up as bytes that never form a valid frame. (A
    pty ignores the baud rate, so the device side sends what a mismatched UART delivers:
    noise.)"""
    pty = Pty(tmp_path / "qkd")
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), baudrate=9600, **WATCHABLE)

    async def noise() -> None:
        while True:
            await pty.stream.send_all(os.urandom(200))
            await trio.sleep(0.05)

    async with running(device, sink) as nursery:
        nursery.start_soon(noise)
        await wait_for(lambda: "is the baud rate (9600)" in device.status.detail)
        assert device.status.state != "up" and sink.keys == []
    await pty.close()


async def test_status_carries_device_figures(tmp_path: Path) -> None:
    from qkdd_drivers.serial.serial_messages import LinkState

    pty = Pty(tmp_path / "qkd")
    half = DeviceHalf("figures", status_interval=0.05, stats=lambda: (LinkState.UP, 0.0312, 12345))
    half.add_keys(make_keys(3))
    device = SerialDevice(str(pty.path), **FAST)
    sink = RecordingSink(delay=10)  # keys stay buffered on the device
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: device.status.qber is not None)
            status = device.status
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert status.qber == pytest.approx(0.0312)
    assert status.secret_key_rate == 12345
    assert status.keys_buffered == 3
    assert "QKD link up" in status.detail


# -- opening the port --------------------------------------------------------------------


def test_open_errors_are_plain_words(tmp_path: Path) -> None:
    with pytest.raises(DeviceNotFoundError, match=f"no such device {tmp_path}/missing"):
        open_serial_port(str(tmp_path / "missing"), 115200)
    with pytest.raises(NotATtyError, match="it is a directory"):
        open_serial_port(str(tmp_path), 115200)
    with pytest.raises(NotATtyError, match="not a serial port"):
        open_serial_port("/dev/null", 115200)


async def test_second_opener_is_told_the_port_is_busy(tmp_path: Path) -> None:
    pty = Pty(tmp_path / "qkd")
    port = open_serial_port(str(pty.path), 115200)
    try:
        with pytest.raises(DeviceBusyError, match="in use by another process"):
            open_serial_port(str(pty.path), 115200)
    finally:
        port.close()
    await pty.close()


# -- secrets stay out of logs ------------------------------------------------------------


async def test_logs_and_reprs_never_show_key_material(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    pty = Pty(tmp_path / "qkd")
    half = new_half()
    keys = make_keys(20)
    half.add_keys(keys)
    sink = RecordingSink()
    device = SerialDevice(str(pty.path), **FAST)
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: half.proto.held == 0)
            # A device bug: the same ID again, with other material. The first copy stays.
            key_id, material = keys[0]
            msg_type, payload = encode_message(Keys((KeyEntry(key_id, b"\x42" * 32),)))
            await half.send_raw(b"\x00" + encode_frame(VERSION, msg_type, 500, payload), pty.stream)
            await wait_for(lambda: "device.key-id-conflict" in caplog.text)
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    stored = {k.key_id: k.material for k in sink.keys}
    assert stored[QkdKey.from_wire(key_id, material).key_id] == material
    assert len(sink.keys) == 20
    assert "device.up" in caplog.text and "device.keys" in caplog.text
    for record in caplog.records:
        line = record.getMessage()
        assert "\n" not in line
        for _, secret in keys:
            assert secret.hex() not in line and repr(secret)[2:-1] not in line
    for key in sink.keys:
        assert key.material.hex() not in repr(key) and "material" not in repr(key)


async def test_slow_sink_is_not_mistaken_for_a_stalled_or_silent_device(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pty = Pty(tmp_path / "qkd")
    half = new_half(status_interval=5.0)  # no heartbeat during the test
    sink = RecordingSink(delay=1.2)  # longer than the idle and stall timeouts
    params = dict(FAST, stall_timeout=0.5, idle_timeout=1.0)
    device = SerialDevice(str(pty.path), **params)
    x_id, y_id = os.urandom(16), os.urandom(16)
    frames = []
    for seq, key_id in ((1, x_id), (2, y_id)):
        msg_type, payload = encode_message(Keys((KeyEntry(key_id, b"k" * 32),)))
        frames.append(encode_frame(VERSION, msg_type, seq, payload))
    async with trio.open_nursery() as dev_nursery:
        dev_nursery.start_soon(half.serve, pty.stream)
        async with running(device, sink):
            await wait_for(lambda: device.status.state == "up")
            # One complete frame and the start of the next arrive together; the sink
            # then takes its time over the first before the rest of the second arrives.
            await half.send_raw(frames[0] + frames[1][:12], pty.stream)
            await wait_for(lambda: len(sink.keys) == 1)
            await half.send_raw(frames[1][12:], pty.stream)
            await wait_for(lambda: len(sink.keys) == 2)
            assert device.status.state == "up"
        dev_nursery.cancel_scope.cancel()
    await pty.close()
    assert "device.down" not in caplog.text
    assert sink.ids() == [QkdKey.from_wire(k, b"k").key_id for k in (x_id, y_id)]


def test_no_permission_on_the_device_is_named(tmp_path: Path) -> None:
    """Opened by a user without rights to the device node (a forked child that drops to
    uid 65534 when run as root, as the tests here are)."""
    from qkdd_drivers.device_errors import DevicePermissionError

    master, slave = os.openpty()
    name = os.ttyname(slave)
    # As root, the child drops to nobody and meets 0600; otherwise the owner meets 0000.
    os.chmod(name, 0o600 if os.geteuid() == 0 else 0)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        message = "opened"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            open_serial_port(name, 115200)
        except DevicePermissionError as exc:
            message = f"refused: {exc}"
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            message = f"other: {exc!r}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    os.close(master)
    os.close(slave)
    assert message.startswith("refused: permission denied opening"), message
    assert "group" in message


async def test_one_read_takes_every_frame_waiting_in_the_pty(tmp_path: Path) -> None:
    """A pty hands out at most 4 KiB a read; frames that queued up while the sink was busy
    are taken in one read (one store and one durable commit for all of them). The kernel
    moves queued bytes into the pty's read buffer in the background, so a read may see
    less than all of them: the test asks for more than one read's worth in one of a few
    tries."""
    device = SerialDevice(str(tmp_path / "qkd.tty"))
    longest = 0
    for _ in range(5):
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(slave, False)
        os.set_blocking(master, False)  # a full pty must not block the test
        try:
            waiting = b""
            with contextlib.suppress(BlockingIOError):
                for _ in range(3):
                    block = os.urandom(4000)
                    waiting += block[: os.write(master, block)]
            await trio.sleep(0.05)
            with trio.fail_after(timeout(10)):
                got = await device._read(slave)
            assert waiting.startswith(got)  # in order, nothing made up
            longest = max(longest, len(got))
        finally:
            os.close(master)
            os.close(slave)
        if longest > 4096:
            break
    assert longest > 4096, f"no read took more than {longest} bytes"
