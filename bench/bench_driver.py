"""Keys per second through SerialDevice over a pty, against a floor measured in the same run.

Both measurements use a fresh pty pair with the device end in a child process (as with
``qkd-emulator``) and the host end read by Trio in this process:

- floor: the child writes raw bytes to the pty master as fast as it can; this process
  reads them from the slave with the same wait_readable + read loop as the driver. Bytes/s
  are converted to keys/s using the wire size per key of a full KEYS frame;
- driver: the child runs the emulator's device side (DeviceHalf, random keys, unpaced);
  this process runs ``SerialDevice`` with a sink that only counts.

Usage: python bench/bench_driver.py [--seconds 5] [--key-bits 256] [--window 128] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import tty
import uuid
from collections.abc import Sequence
from pathlib import Path

import trio
from qkdd_drivers.base import KeyDelivery, QkdKey
from qkdd_drivers.device_errors import DeviceError
from qkdd_drivers.emulator.device_side import DeviceHalf
from qkdd_drivers.emulator.key_source import RandomKeySource
from qkdd_drivers.serial.driver import SerialDevice
from qkdd_drivers.serial.framing import encode_frame
from qkdd_drivers.serial.serial_constants import MAX_FRAME_SIZE, MAX_KEYS_PER_FRAME, MIN_FRAME_SIZE
from qkdd_drivers.serial.serial_messages import KeyEntry, Keys, encode_message

# Only catches a child that never writes: it waits for the first byte, however slowly the
# child starts on a loaded machine.
FIRST_BYTE_HANG_SECONDS = 120.0


def wire_bytes_per_key(key_bytes: int) -> float:
    """Bytes on the wire per key when KEYS frames are full, as the device sends them."""
    per_frame = min(MAX_KEYS_PER_FRAME, (MAX_FRAME_SIZE - MIN_FRAME_SIZE - 1) // (18 + key_bytes))
    entries = tuple(KeyEntry(uuid.uuid4().bytes, os.urandom(key_bytes)) for _ in range(per_frame))
    msg_type, payload = encode_message(Keys(entries))
    return len(encode_frame(1, msg_type, 0, payload)) / per_frame


def make_pty(path: Path) -> tuple[int, int]:
    master, slave = os.openpty()
    tty.setraw(slave)
    if path.is_symlink():
        path.unlink()
    os.symlink(os.ttyname(slave), path)
    return master, slave


# -- child processes (the device end) ------------------------------------------------------


def _raw_writer(master: int, seconds: float) -> None:
    chunk = bytes(range(1, 256)) * 257  # ~64 KiB without 0x00, like COBS output
    # Until killed (seconds <= 0), or for that long.
    deadline = time.monotonic() + seconds if seconds > 0 else float("inf")
    while time.monotonic() < deadline:
        try:
            os.write(master, chunk)
        except OSError:
            return


def _device(master: int, key_bits: int, window: int, seconds: float) -> None:
    async def main() -> None:
        half = DeviceHalf("bench-device", window=window, capacity=8192)
        source = RandomKeySource(key_bits)
        stream = trio.lowlevel.FdStream(master)

        async def produce() -> None:
            while True:
                room = half.proto.room
                if room:
                    half.add_keys(await source.next_block(min(room, 512)))
                await trio.sleep(0.001)

        # Until killed (seconds <= 0), or for that long.
        with trio.move_on_after(seconds if seconds > 0 else float("inf")):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                await half.serve(stream)

    trio.run(main)


def spawn_child(role: str, master: int, *params: float) -> subprocess.Popen[bytes]:
    """Run the device end in its own process (its own core), as qkd-emulator does."""
    argv = [sys.executable, __file__, "--child", role, str(master), *map(str, params)]
    return subprocess.Popen(argv, pass_fds=[master])


def child_main(argv: list[str]) -> None:
    role, master = argv[0], int(argv[1])
    if role == "raw":
        _raw_writer(master, float(argv[2]))
    else:
        _device(master, int(float(argv[3])), int(float(argv[4])), float(argv[2]))


# -- measurements (the host end) -------------------------------------------------------------


async def measure_floor(path: Path, seconds: float) -> float:
    master, slave = make_pty(path)
    # The child writes until it is killed: how long it takes to start (imports on a loaded
    # machine) must not eat into the window, which starts at the first byte read.
    child = spawn_child("raw", master, 0.0)
    os.close(master)
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    total = 0
    start = None
    with trio.fail_after(seconds + FIRST_BYTE_HANG_SECONDS):
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if start is None:
                start = time.perf_counter()  # from the first byte, like the driver
                continue
            total += len(data)
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - (start or time.perf_counter())
    trio.lowlevel.notify_closing(fd)
    os.close(fd)
    child.kill()
    child.wait()
    os.close(slave)
    return total / elapsed


class CountingSink:
    def __init__(self) -> None:
        self.count = 0

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        self.count += len(keys)


async def measure_driver(path: Path, seconds: float, key_bits: int, window: int) -> float:
    master, slave = make_pty(path)
    child = spawn_child("device", master, 0.0, key_bits, window)  # until killed
    os.close(master)
    sink = CountingSink()
    device = SerialDevice(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(device.run, sink)
        with trio.fail_after(FIRST_BYTE_HANG_SECONDS):
            while sink.count < 1000:  # warm-up: handshake done, keys flowing
                await trio.sleep(0.01)
        first, start = sink.count, time.perf_counter()
        await trio.sleep(seconds)
        rate = (sink.count - first) / (time.perf_counter() - start)
        nursery.cancel_scope.cancel()
    child.kill()
    child.wait()
    os.close(slave)
    return rate


async def measure_cpu_only(key_bits: int, n: int = 20_000) -> tuple[float, float]:
    """Keys/s of the protocol work alone, no I/O: (device side encoding, host side
    decoding + dedup + QkdKey). Tells which end bounds the pty measurement."""
    from qkdd_drivers.serial.protocol import DeviceProtocol, HostProtocol, KeysReceived

    host, dev = HostProtocol(), DeviceProtocol(window=n, capacity=n)
    host.start()
    dev.receive_data(host.data_to_send())
    host.receive_data(dev.data_to_send())
    keys = [(uuid.uuid4().bytes, os.urandom(key_bits // 8)) for _ in range(n)]
    start = time.perf_counter()
    dev.add_keys(keys)
    dev.poll(0.0)
    wire = dev.data_to_send()
    device_kps = n / (time.perf_counter() - start)
    # The driver's own delivery step (drop resent keys, store, remember), into a sink that
    # only counts.
    delivery = KeyDelivery(SerialDevice("/dev/null"))
    sink = CountingSink()

    start = time.perf_counter()
    for event in host.receive_data(wire):
        if isinstance(event, KeysReceived):
            keys = (QkdKey.from_wire(e.key_id, e.material) for e in event.keys)
            await delivery.store(sink, delivery.sort(keys).keys, DeviceError)
    host_kps = n / (time.perf_counter() - start)
    assert sink.count == n, "the host side stored fewer keys than the device sent"
    return device_kps, host_kps


async def main_async(args: argparse.Namespace) -> None:
    key_bytes = args.key_bits // 8
    per_key = wire_bytes_per_key(key_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        floor_bps = await measure_floor(Path(tmp) / "floor", args.seconds)
        driver_kps = await measure_driver(
            Path(tmp) / "qkd", args.seconds, args.key_bits, args.window
        )
    floor_kps = floor_bps / per_key
    device_cpu, host_cpu = await measure_cpu_only(args.key_bits, args.cpu_keys)
    rows = [
        ("floor: raw pty bytes", f"{floor_bps / 1e6:.2f} MB/s", f"{floor_kps:,.0f}", "1.00"),
        (
            "SerialDevice keys",
            f"{driver_kps * per_key / 1e6:.2f} MB/s",
            f"{driver_kps:,.0f}",
            f"{driver_kps / floor_kps:.3f}",
        ),
        ("(no I/O) device encode", "-", f"{device_cpu:,.0f}", f"{device_cpu / floor_kps:.3f}"),
        ("(no I/O) host decode", "-", f"{host_cpu:,.0f}", f"{host_cpu / floor_kps:.3f}"),
    ]
    print(
        f"key size {args.key_bits} bits, {per_key:.1f} wire bytes per key in full KEYS frames, "
        f"window {args.window}, {args.seconds:g} s per measurement"
    )
    header = ("measurement", "throughput", "keys/s", "ratio to floor")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measurement")
    parser.add_argument("--key-bits", type=int, default=256, help="key size (default 256)")
    parser.add_argument("--window", type=int, default=128, help="device window (default 128)")
    parser.add_argument(
        "--quick", action="store_true", help="half-second measurements (a smoke test)"
    )
    args = parser.parse_args()
    args.cpu_keys = 20_000
    if args.quick:
        args.seconds, args.cpu_keys = 0.5, 2_000
    trio.run(main_async, args)


if __name__ == "__main__":
    main()
