"""``qkd-emulator pty`` as a real subprocess: two SerialDevice instances, one per link path,
receive identical keys with identical IDs; signals stop it cleanly; it refuses to replace
a file that is not a symlink; ``--help`` documents every flag."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from qkdd_drivers.base import QkdKey
from qkdd_drivers.serial.driver import SerialDevice
from timeouts import timeout

EMULATOR = [sys.executable, "-m", "qkdd_drivers.emulator.command"]
FLAGS = [
    "--link-a",
    "--link-b",
    "--key-bits",
    "--rate",
    "--buffer",
    "--window",
    "--retransmit-timeout",
    "--status-interval",
    "--json",
    "--log-level",
]


class ListSink:
    def __init__(self) -> None:
        self.keys: list[QkdKey] = []

    async def store_qkd_keys(self, keys: Sequence[QkdKey]) -> None:
        self.keys += keys


async def start_emulator(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    # Its log goes to a file beside the links, not to a pipe nobody reads.
    log = Path(args[args.index("--link-a") + 1]).with_suffix(".emulator.log")
    with log.open("wb") as stderr:
        proc = subprocess.Popen([*EMULATOR, "pty", *args], stdout=subprocess.PIPE, stderr=stderr)
    assert proc.stdout is not None
    with trio.fail_after(timeout(10)):
        line = await trio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    return proc, line.decode()


async def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    with trio.fail_after(timeout(10)):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)


async def test_both_links_receive_identical_keys(tmp_path: Path) -> None:
    link_a, link_b = tmp_path / "qkd-a", tmp_path / "qkd-b"
    proc, line = await start_emulator(
        "--link-a",
        str(link_a),
        "--link-b",
        str(link_b),
        "--json",
        "--key-bits",
        "512",
        "--rate",
        "3000",
        "--buffer",
        "1000",
        "--status-interval",
        "0.2",
    )
    try:
        assert json.loads(line) == {"link_a": str(link_a), "link_b": str(link_b)}
        assert os.readlink(link_a).startswith("/dev/pts/")
        assert os.readlink(link_a) != os.readlink(link_b)
        sink_a, sink_b = ListSink(), ListSink()
        dev_a, dev_b = SerialDevice(str(link_a)), SerialDevice(str(link_b))
        async with trio.open_nursery() as nursery:
            await nursery.start(dev_a.run, sink_a)
            await nursery.start(dev_b.run, sink_b)
            with trio.fail_after(timeout(15)):
                while min(len(sink_a.keys), len(sink_b.keys)) < 1500 or not (
                    dev_a.status.secret_key_rate
                ):
                    await trio.sleep(0.05)
            status_a = dev_a.status
            nursery.cancel_scope.cancel()
    finally:
        code = await stop(proc)
    assert code == 0
    n = min(len(sink_a.keys), len(sink_b.keys))
    # Both sides see the same keys in the same order: same IDs, same material.
    assert [(k.key_id, k.material) for k in sink_a.keys[:n]] == [
        (k.key_id, k.material) for k in sink_b.keys[:n]
    ]
    for sink in (sink_a, sink_b):
        ids = [k.key_id for k in sink.keys]
        assert len(ids) == len(set(ids))
        assert all(len(k.material) == 64 for k in sink.keys)
    assert status_a.state == "up"
    assert status_a.secret_key_rate and status_a.secret_key_rate > 0
    assert status_a.keys_buffered is not None
    assert not link_a.exists() and not os.path.lexists(link_b)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_zero_and_removes_links(tmp_path: Path, sig: int) -> None:
    link_a, link_b = tmp_path / "a", tmp_path / "b"
    proc, line = await start_emulator("--link-a", str(link_a), "--link-b", str(link_b))
    assert line == "ready\n"
    assert os.path.islink(link_a) and os.path.islink(link_b)
    assert await stop(proc, sig) == 0
    assert not os.path.lexists(link_a) and not os.path.lexists(link_b)


async def test_stale_symlink_is_replaced(tmp_path: Path) -> None:
    link_a, link_b = tmp_path / "a", tmp_path / "b"
    os.symlink("/dev/pts/does-not-exist", link_a)
    proc, line = await start_emulator("--link-a", str(link_a), "--link-b", str(link_b))
    assert line == "ready\n"
    assert os.readlink(link_a) != "/dev/pts/does-not-exist"
    assert await stop(proc) == 0


async def test_refuses_to_overwrite_a_regular_file(tmp_path: Path) -> None:
    victim = tmp_path / "important"
    victim.write_text("keep me")
    proc = await trio.run_process(
        [*EMULATOR, "pty", "--link-a", str(victim), "--link-b", str(tmp_path / "b")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert proc.returncode == 2
    assert b"refusing to replace" in proc.stderr and b"not a symlink" in proc.stderr
    assert proc.stdout == b""
    assert victim.read_text() == "keep me"
    assert not os.path.lexists(tmp_path / "b")


async def test_help_documents_every_flag() -> None:
    proc = await trio.run_process([*EMULATOR, "pty", "--help"], capture_stdout=True)
    text = proc.stdout.decode()
    for flag in FLAGS:
        assert flag in text
    assert "unpaced" in text and "SIGTERM" in text
    top = await trio.run_process([*EMULATOR, "--help"], capture_stdout=True)
    assert b"pty" in top.stdout


async def test_daemon_restart_on_one_side_keeps_both_sides_identical(tmp_path: Path) -> None:
    """Side A's daemon goes away for a while (the emulator keeps sending into the pty until
    it fills) and comes back with a new driver and an empty memory of key IDs."""
    link_a, link_b = tmp_path / "qkd-a", tmp_path / "qkd-b"
    proc, _ = await start_emulator(
        "--link-a",
        str(link_a),
        "--link-b",
        str(link_b),
        "--rate",
        "2000",
        "--buffer",
        "600",
        "--retransmit-timeout",
        "0.3",
        "--status-interval",
        "0.1",
    )
    sink_a1, sink_a2, sink_b = ListSink(), ListSink(), ListSink()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(SerialDevice(str(link_b)).run, sink_b)
            async with trio.open_nursery() as first:
                await first.start(SerialDevice(str(link_a)).run, sink_a1)
                with trio.fail_after(timeout(10)):
                    while len(sink_a1.keys) < 200:
                        await trio.sleep(0.02)
                first.cancel_scope.cancel()
            await trio.sleep(1.5)  # unacknowledged keys pile up on side A's device
            await nursery.start(SerialDevice(str(link_a)).run, sink_a2)
            with trio.fail_after(timeout(15)):
                while len(sink_a2.keys) < 800 or len(sink_b.keys) < 1200:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        assert await stop(proc) == 0
    a = [(k.key_id, k.material) for k in sink_a1.keys + sink_a2.keys]
    b = [(k.key_id, k.material) for k in sink_b.keys]
    # Keys stored before the restart may come again (the daemon's key store drops those);
    # apart from them side A gets side B's keys, in order, none lost.
    first_ids = {key_id for key_id, _ in a[: len(sink_a1.keys)]}
    resent = [item for item in a[len(sink_a1.keys) :] if item[0] in first_ids]
    assert len(resent) <= 128  # at most one window was in flight at the restart
    deduplicated = a[: len(sink_a1.keys)] + [
        item for item in a[len(sink_a1.keys) :] if item[0] not in first_ids
    ]
    n = min(len(deduplicated), len(b))
    assert n >= 800
    assert deduplicated[:n] == b[:n]
